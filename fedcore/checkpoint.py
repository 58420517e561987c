"""Global model files: safetensors with what is needed to rebuild the model, written atomically.

Atomic and durable: the data goes to a temp file in the same folder, is fsynced, renamed over the
target, and then the folder itself is fsynced. The rename changes the folder, not the file: on
ext4/xfs a crash after `os.replace` but before the folder reaches the disk can bring back the old
name (or none), which for `state.json` would resume from a round whose files are gone (see the
rename/fsync discussion in the Linux `rename(2)` and `fsync(2)` manual pages).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from . import tensorcodec
from .model import weight_spec
from .wire import validate_tensors


def save_weights(
    path: Path, weights: Mapping[str, torch.Tensor], metadata: Mapping[str, object]
) -> Path:
    """Write `weights` to `path` (temp file + rename: never a half-written model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_write(path, tensorcodec.dumps(weights, meta))
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and a rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Flush `folder`'s entries (a rename or an unlink in it) to disk. A no-op where folders
    cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and validate a model file written by `save_weights` (or any safetensors of the Net)."""
    weights, meta = tensorcodec.loads(Path(path).read_bytes())
    validate_tensors(str(path), weights, weight_spec(), "model file")
    return weights, meta
