"""A lab device's home and data: its .ssh, scratch folder, and its shard as MNIST idx files.

A real Jetson holds only its own images, so each emulated device gets idx files cut down to its
shard (a label shard: only those digits; an IID part: only that part) rather than the full
dataset with a filter. The files are read and written through `fedcore.mnist`, the one place that
knows the idx format, and are readable only by the device's user (mode 600 in a 700 home).
"""

from __future__ import annotations

from pathlib import Path

from fedcore.errors import ShardError
from fedcore.mnist import read_images, read_labels, shard_index, write_split
from fedcore.shards import ShardSpec

from .commands import LabError


class Split:
    """One MNIST split read once, to cut every device's shard of that split from it."""

    def __init__(self, mnist_dir: Path, split: str) -> None:
        """Read `split`'s labels and images from `mnist_dir` (raw or .gz idx files).

        Raises:
            LabError: a file is missing or malformed, or the two files do not match.
        """
        try:
            self.labels = read_labels(str(mnist_dir), split)
            self.images = read_images(str(mnist_dir), split)
        except ShardError as exc:
            raise LabError(str(exc)) from None
        if self.labels.numel() != self.images.shape[0]:
            raise LabError(f"{mnist_dir}: the {split} label and image files do not match")


def make_home(home: Path, pubkey: str) -> tuple[Path, Path]:
    """Fill the (existing) home of a device: .ssh/authorized_keys, tmp/ and data/mnist/.

    Args:
        home: the device's home folder.
        pubkey: the coordinator's public key, the one key that may log in.

    Returns:
        (the authorized_keys file, the data folder for the shard).
    """
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    authorized_keys = ssh_dir / "authorized_keys"
    authorized_keys.write_text(pubkey)
    authorized_keys.chmod(0o600)
    (home / "tmp").mkdir(mode=0o700)
    data_dir = home / "data" / "mnist"
    data_dir.mkdir(parents=True, mode=0o700)
    (home / "data").chmod(0o700)
    return authorized_keys, data_dir


def provision_shard(split: Split, spec: ShardSpec, out: Path) -> ShardSpec:
    """Write `spec`'s images and labels as idx files (mode 600) in `out`.

    Args:
        split: the split `spec` names, already read.
        spec: the device's shard.
        out: the device's data folder.

    Returns:
        the spec to launch the worker with: an IID part becomes "all of the split", since the
        device holds only its part.

    Raises:
        LabError: the shard holds no images.
    """
    index = shard_index(split.labels, spec)
    if index.numel() == 0:
        raise LabError(f"shard {spec.describe()} holds no images")
    images = split.images.index_select(0, index)
    write_split(str(out), spec.split, images, split.labels.index_select(0, index))
    for f in out.iterdir():
        f.chmod(0o600)
    if spec.iid_count is not None:
        return ShardSpec(split=spec.split)
    return spec
