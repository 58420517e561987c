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
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .errors import WireError
from .wire import parse_json, quote

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
# A model's header is about 1 KiB (8 tensors); 64 KiB leaves room for a strategy's extra groups
# and metadata, and bounds what a crafted header can cost (issue 12: 16 MiB took minutes).
MAX_HEADER = 64 << 10
MAX_NDIM = 8
# Largest dimension, and largest product of an empty tensor's non-zero dimensions (torch builds
# strides from them, which must fit int64).
MAX_ELEMENTS = 1 << 40


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

    Every bound holds before any work proportional to what the header claims: the header length
    (MAX_HEADER) from the 8-byte prefix, the JSON's depth and number sizes while it is parsed
    (`wire.parse_json`), then per tensor its rank (MAX_NDIM), each dimension (MAX_ELEMENTS) and
    their product, with an early exit once it passes the bytes present.

    Raises:
        WireError: truncated data, a malformed or oversized header, an unknown dtype, a shape
            past the caps, or offsets that do not tile the data exactly. The message names the
            tensor and shows at most `wire.CLIP` characters of what was received.
    """
    if len(data) < 8:
        raise WireError(f"tensor data truncated: {len(data)} bytes, need at least 8")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > MAX_HEADER:
        raise WireError(
            f"tensor header announces {n} bytes, limit {MAX_HEADER} (a model's header is ~1 KiB)"
        )
    if 8 + n > len(data):
        raise WireError(f"tensor header announces {n} bytes but only {len(data) - 8} follow")
    header = parse_json(bytes(data[8 : 8 + n]), "tensor header")
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
        dtype, shape, begin, end = _entry(name, info, len(body))
        spans.append((begin, end))
        if end > begin:
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


def _entry(name: str, info: object, available: int) -> Tuple[torch.dtype, List[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked against `available` body bytes.

    Types and ranges are checked before any arithmetic; the element count stops growing as soon
    as it passes what the body could hold, so no shape costs more than MAX_NDIM small products.
    """
    what = f"tensor {quote(name)}"
    if not isinstance(info, dict):
        raise WireError(f"{what}: header entry must be an object, got {quote(info)}")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info.get("dtype"), str) else None
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if dtype is None:
        raise WireError(f"{what}: dtype {quote(info.get('dtype'))} is not one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise WireError(
            f"{what}: shape must be a list of at most {MAX_NDIM} dimensions, got {quote(shape)}"
        )
    if not all(type(d) is int and 0 <= d <= MAX_ELEMENTS for d in shape):
        raise WireError(
            f"{what}: dimensions must be integers in 0..{MAX_ELEMENTS}, got {quote(shape)}"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and 0 <= o <= available for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise WireError(
            f"{what}: data_offsets must be [begin, end] with 0 <= begin <= end <= {available}, "
            f"got {quote(offsets)}"
        )
    begin, end = offsets
    size = _element_size(dtype)
    # With a zero dimension the tensor is empty whatever the others say, but torch still builds
    # its strides from them: their product is capped so that it cannot overflow int64.
    empty = 0 in shape
    limit = MAX_ELEMENTS if empty else (end - begin) // size
    product = 1  # of the non-zero dimensions
    for d in shape:
        if d:
            product *= d
            if product > limit:
                break
    if product > limit or (0 if empty else product) * size != end - begin:
        raise WireError(
            f"{what}: offsets {begin}..{end} ({end - begin} bytes) do not hold a "
            f"{info['dtype']} tensor of shape {quote(shape)}"
        )
    return dtype, shape, begin, end


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
