"""Global model files: safetensors with what is needed to rebuild the model, written atomically."""

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


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and validate a model file written by `save_weights` (or any safetensors of the Net)."""
    weights, meta = tensorcodec.loads(Path(path).read_bytes())
    validate_tensors(str(path), weights, weight_spec(), "model file")
    return weights, meta
