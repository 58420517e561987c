"""A lab device's shard: idx files written and read back through fedcore.mnist, no sshd needed.

The lab cuts each emulated device's data down to its shard; these tests pin the bytes it writes
(the idx header, then one byte per label or pixel) and that the worker reads back exactly the
images and labels of its shard.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch
from conftest import ALICE_COUNTS

from fedcore.errors import ShardError
from fedcore.mnist import (
    FILES,
    IMAGE_MAGIC,
    LABEL_MAGIC,
    label_counts,
    load_shard,
    read_images,
    read_labels,
    write_split,
)
from fedcore.shards import ShardSpec
from fedlab import LabError
from fedlab.provision import Split, make_home, provision_shard


def _synthetic(n: int = 50, rows: int = 4, cols: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (n, rows, cols), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    return images, labels


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    """A folder with a small synthetic train split (50 images of 4x3, labels 0..9 in turn)."""
    folder = tmp_path / "full"
    folder.mkdir()
    write_split(str(folder), "train", *_synthetic())
    return folder


@pytest.mark.parametrize("split", ["train", "test"])
def test_write_then_read_round_trips(tmp_path: Path, split: str) -> None:
    images, labels = _synthetic()
    write_split(str(tmp_path), split, images, labels)
    assert torch.equal(read_labels(str(tmp_path), split), labels)
    assert torch.equal(read_images(str(tmp_path), split), images)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES[split])


def test_written_bytes_are_the_idx_format(tmp_path: Path) -> None:
    images, labels = _synthetic(n=5, rows=2, cols=2)
    write_split(str(tmp_path), "test", images, labels)
    images_name, labels_name = FILES["test"]
    assert (tmp_path / labels_name).read_bytes() == struct.pack(">II", LABEL_MAGIC, 5) + bytes(
        labels.tolist()
    )
    assert (tmp_path / images_name).read_bytes() == struct.pack(
        ">IIII", IMAGE_MAGIC, 5, 2, 2
    ) + bytes(images.flatten().tolist())


def test_gzip_files_read_the_same(tmp_path: Path, split_dir: Path) -> None:
    for name in FILES["train"]:
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((split_dir / name).read_bytes()))
    assert torch.equal(read_labels(str(tmp_path), "train"), read_labels(str(split_dir), "train"))
    assert torch.equal(read_images(str(tmp_path), "train"), read_images(str(split_dir), "train"))


def test_write_refuses_mismatched_counts(tmp_path: Path) -> None:
    images, labels = _synthetic()
    with pytest.raises(ValueError, match="50 images but 49 labels"):
        write_split(str(tmp_path), "train", images, labels[:-1])


def test_a_truncated_image_file_is_refused(split_dir: Path) -> None:
    path = split_dir / FILES["train"][0]
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ShardError, match="not an MNIST image file"):
        read_images(str(split_dir), "train")


def test_a_label_shard_holds_only_its_digits(tmp_path: Path, split_dir: Path) -> None:
    spec = ShardSpec.by_labels([2, 7])
    launch = provision_shard(Split(split_dir, "train"), spec, tmp_path)
    assert launch == spec
    assert label_counts(read_labels(str(tmp_path), "train")) == {2: 5, 7: 5}
    full_images, full_labels = (
        read_images(str(split_dir), "train"),
        read_labels(str(split_dir), "train"),
    )
    kept = (full_labels == 2) | (full_labels == 7)
    assert torch.equal(read_images(str(tmp_path), "train"), full_images[kept])
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in tmp_path.iterdir())


def test_an_iid_part_is_launched_as_all_it_holds(tmp_path: Path, split_dir: Path) -> None:
    spec = ShardSpec.iid(1, 3, seed=5)
    launch = provision_shard(Split(split_dir, "train"), spec, tmp_path)
    assert launch == ShardSpec(split="train")
    # The worker loading "all" of the device's files sees exactly the part it would have cut.
    x_device, y_device = load_shard(str(tmp_path), launch)
    x_full, y_full = load_shard(str(split_dir), spec)
    assert torch.equal(x_device, x_full) and torch.equal(y_device, y_full)


def test_an_empty_shard_is_a_lab_error(tmp_path: Path) -> None:
    folder = tmp_path / "full"
    folder.mkdir()
    images, labels = _synthetic()
    kept = labels < 5
    write_split(str(folder), "train", images[kept], labels[kept])
    with pytest.raises(LabError, match="holds no images"):
        provision_shard(Split(folder, "train"), ShardSpec.by_labels([9]), tmp_path)


def test_missing_files_are_a_lab_error_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="fedmnist data --dir"):
        Split(tmp_path, "train")


def test_a_device_home_is_closed_to_others(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    authorized_keys, data_dir = make_home(home, "ssh-ed25519 AAAA lab\n")
    assert authorized_keys.read_text() == "ssh-ed25519 AAAA lab\n"
    assert authorized_keys.stat().st_mode & 0o777 == 0o600
    assert data_dir == home / "data" / "mnist"
    for folder in (home / ".ssh", home / "tmp", home / "data", data_dir):
        assert folder.stat().st_mode & 0o777 == 0o700


def test_alices_device_on_real_mnist_holds_exactly_her_digits(
    tmp_path: Path, mnist_dir: Path
) -> None:
    spec = ShardSpec.by_labels(range(0, 4))
    provision_shard(Split(mnist_dir, "train"), spec, tmp_path)
    raw = (tmp_path / "train-labels-idx1-ubyte").read_bytes()
    assert struct.unpack(">II", raw[:8]) == (LABEL_MAGIC, sum(ALICE_COUNTS.values()))
    x_device, y_device = load_shard(str(tmp_path), spec)
    x_full, y_full = load_shard(str(mnist_dir), spec)
    assert label_counts(y_device) == ALICE_COUNTS
    assert torch.equal(x_device, x_full) and torch.equal(y_device, y_full)
