"""MNIST idx files: read into normalised tensors (one shard's images only), and written back.

The worker calls `load_shard`; the coordinator never does, because the data stays on the device
that holds it. Reads the raw (unpacked) idx files `fedmnist data` prepares, or their `.gz` form.
`write_split` writes the same format back (the lab cuts each emulated device's shard with it), so
the idx layout - file names, magic numbers, headers - is defined here only. Runs on the device
(Python 3.8, torch, standard library).
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from typing import Dict, Tuple

import torch

from .errors import ShardError
from .model import NORMALIZE_MEAN, NORMALIZE_STD
from .seeding import derive_seed
from .shards import ShardSpec

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
LABEL_HEADER = struct.Struct(">II")  # magic, count; then one byte per label
IMAGE_HEADER = struct.Struct(">IIII")  # magic, count, rows, cols; then rows*cols bytes per image


def _read_file(data_dir: str, name: str) -> bytes:
    path = os.path.join(data_dir, name)
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            try:
                if candidate.endswith(".gz"):
                    with gzip.open(candidate, "rb") as f:
                        return f.read()
                with open(candidate, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise ShardError(f"cannot read {candidate}: {exc}") from exc
    if not os.path.isdir(data_dir):
        raise ShardError(
            f"data directory {data_dir} does not exist: prepare it with `fedmnist data --dir "
            f"{data_dir}` (or fix the worker's data_dir)"
        )
    raise ShardError(
        f"{name} is missing in {data_dir}: prepare it with `fedmnist data --dir {data_dir}`"
    )


def _as_uint8(raw: bytes, offset: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns that bytes are read-only; we copy
        return torch.frombuffer(raw, dtype=torch.uint8, offset=offset)


def read_labels(data_dir: str, split: str) -> torch.Tensor:
    """All labels of `split` as int64.

    Raises:
        ShardError: the file is missing, truncated or not an MNIST label file.
    """
    name = FILES[split][1]
    raw = _read_file(data_dir, name)
    if len(raw) < LABEL_HEADER.size:
        raise ShardError(f"{name} in {data_dir} is truncated ({len(raw)} bytes)")
    magic, count = LABEL_HEADER.unpack_from(raw)
    if magic != LABEL_MAGIC or len(raw) != LABEL_HEADER.size + count:
        raise ShardError(f"{name} in {data_dir} is not an MNIST label file (magic {magic})")
    return _as_uint8(raw, LABEL_HEADER.size).to(torch.int64)


def read_images(data_dir: str, split: str) -> torch.Tensor:
    """All images of `split`, (N, rows, cols) uint8: a read-only view of the file's bytes.

    Raises:
        ShardError: the file is missing, truncated or not an MNIST image file.
    """
    name = FILES[split][0]
    raw = _read_file(data_dir, name)
    if len(raw) < IMAGE_HEADER.size:
        raise ShardError(f"{name} in {data_dir} is truncated ({len(raw)} bytes)")
    magic, count, rows, cols = IMAGE_HEADER.unpack_from(raw)
    if magic != IMAGE_MAGIC or len(raw) != IMAGE_HEADER.size + count * rows * cols:
        raise ShardError(f"{name} in {data_dir} is not an MNIST image file (magic {magic})")
    return _as_uint8(raw, IMAGE_HEADER.size).view(count, rows, cols)


def write_split(out_dir: str, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write `split`'s two raw idx files into `out_dir`, as `read_images`/`read_labels` read them.

    Args:
        out_dir: an existing folder; files of the same name are replaced.
        split: "train" or "test" (it names the files).
        images: (N, rows, cols) uint8.
        labels: N digits, any integer dtype.

    Raises:
        ValueError: `images` and `labels` hold different numbers of items.
    """
    count, rows, cols = images.shape
    if labels.numel() != count:
        raise ValueError(f"{count} images but {labels.numel()} labels")
    images_name, labels_name = FILES[split]
    _write_file(os.path.join(out_dir, labels_name), LABEL_HEADER.pack(LABEL_MAGIC, count), labels)
    header = IMAGE_HEADER.pack(IMAGE_MAGIC, count, rows, cols)
    _write_file(os.path.join(out_dir, images_name), header, images)


def _write_file(path: str, header: bytes, items: torch.Tensor) -> None:
    # .numpy() needs numpy, which the coordinator's torch has; a worker never writes idx files.
    with open(path, "wb") as f:
        f.write(header + items.to(torch.uint8).contiguous().numpy().tobytes())


def shard_index(labels: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """Indices of the images in `spec`'s shard, in file order."""
    if spec.labels is not None:
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for d in spec.labels:
            mask |= labels == d
        return mask.nonzero().flatten()
    if spec.iid_count is not None:
        g = torch.Generator().manual_seed(derive_seed(spec.iid_seed, "iid", spec.split))
        perm = torch.randperm(labels.numel(), generator=g)
        part = perm[spec.iid_index :: spec.iid_count]
        return part.sort().values
    return torch.arange(labels.numel())


def load_shard(data_dir: str, spec: ShardSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N,1,28,28 float, normalised) and labels (N int64) of `spec`'s shard only.

    Raises:
        ShardError: the files are missing or malformed, or the shard is empty.
    """
    labels = read_labels(data_dir, spec.split)
    index = shard_index(labels, spec)
    if index.numel() == 0:
        raise ShardError(f"shard {spec.describe()} in {data_dir} holds no images")
    images = read_images(data_dir, spec.split).index_select(0, index)  # only the shard's survive
    x = images.unsqueeze(1).to(torch.float32).div_(255.0)
    x.sub_(NORMALIZE_MEAN).div_(NORMALIZE_STD)
    return x, labels.index_select(0, index)


def label_counts(labels: torch.Tensor) -> Dict[int, int]:
    """Digit -> number of images, for digits present."""
    counts = torch.bincount(labels, minlength=10).tolist()
    return {d: int(c) for d, c in enumerate(counts) if c}
