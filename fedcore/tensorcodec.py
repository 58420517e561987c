"""A small reader and writer of the safetensors format, on torch and the standard library only.

Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes
of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`
padded with spaces to a multiple of 8, then the raw little-endian tensor bytes. We write exactly the
bytes the `safetensors` package writes (a test proves it) so either side can use either; the worker
uses this one because a device gets nothing installed: a Jetson's own Python has torch and the
standard library, not the package (docs/ARCHITECTURE.md, Decisions 1).

Nothing here executes or unpickles what it reads: a header is JSON, the rest is raw numbers.
Runs on the device (Python 3.8).
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
import warnings
from typing import Dict, Mapping, Optional, Tuple

import torch

from .errors import WireError

if sys.byteorder != "little":  # pragma: no cover - every Jetson and x86 host is little-endian
    raise ImportError("fedcore.tensorcodec supports little-endian hosts only")

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 16 * 1024 * 1024


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def dumps(
    tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None
) -> bytes:
    """Serialise named tensors (and string metadata) to safetensors bytes."""
    # Same order as the reference writer: larger alignment first, then by name.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: Dict[str, object] = {}
    if metadata:
        # sorted: the reference writer keeps metadata in a hash map, whose order varies
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    chunks = []
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in NAMES:
            raise WireError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        data = _tensor_bytes(t)
        header[name] = {
            "dtype": NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def loads(data: bytes) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Parse safetensors bytes into (tensors, metadata).

    Raises:
        WireError: truncated data, a malformed header, an unknown dtype, or offsets that do not
            tile the data exactly.
    """
    if len(data) < 8:
        raise WireError(f"tensor data truncated: {len(data)} bytes, need at least 8")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise WireError(f"tensor header announces {n} bytes but only {len(data) - 8} follow")
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"tensor header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("tensor header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise WireError("tensor metadata must map strings to strings")
    body = memoryview(data)[8 + n :]
    spans = []
    out: Dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WireError(f"tensor {name!r}: malformed header entry {info!r}") from None
        numel = 1
        for s in shape:
            if s < 0:
                raise WireError(f"tensor {name!r}: negative dimension in shape {shape}")
            numel *= s
        size = numel * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(body) or end - begin != size:
            raise WireError(
                f"tensor {name!r}: offsets {begin}..{end} do not hold {shape} {info['dtype']} "
                f"in {len(body)} bytes"
            )
        spans.append((begin, end))
        if size:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # read-only buffer: we clone right away
                flat = torch.frombuffer(body[begin:end], dtype=dtype).clone()
            out[name] = flat.view(shape)
        else:
            out[name] = torch.empty(shape, dtype=dtype)
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise WireError("tensor data has gaps or overlaps between tensors")
        pos = end
    if pos != len(body):
        raise WireError(f"tensor data has {len(body) - pos} trailing bytes")
    return out, metadata
