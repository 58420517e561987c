"""The wire format: length-prefixed frames of JSON metadata plus safetensors bytes.

Frame: magic `FMW1` (4 bytes), JSON length (u32 LE), payload length (u64 LE), the JSON object,
then the payload (a safetensors file, possibly empty). Receivers bound both lengths before reading,
so a garbled or hostile peer costs at most one bounded read and a `WireError`, never an unpickle
or an allocation it chose. Updates are validated (names, shapes, dtypes, finite values) before
anything aggregates them. Runs on the device (Python 3.8).
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO, Callable, Dict, Mapping, Optional, Tuple

import torch

from .errors import FrameTooLarge, UpdateRejected, WireError

MAGIC = b"FMW1"
PREFIX = struct.Struct("<4sIQ")
MAX_JSON = 1 << 20
MAX_PAYLOAD = 256 << 20

Meta = Dict[str, Any]


def encode_frame(meta: Mapping[str, Any], payload: bytes = b"") -> bytes:
    """One frame holding `meta` (a JSON object) and `payload` bytes."""
    text = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > MAX_JSON:
        raise FrameTooLarge(f"frame metadata is {len(text)} bytes, limit {MAX_JSON}")
    return PREFIX.pack(MAGIC, len(text), len(payload)) + text + payload


def decode_prefix(prefix: bytes, max_payload: int = MAX_PAYLOAD) -> Tuple[int, int]:
    """(json length, payload length) from a frame's 16-byte prefix, bounds checked."""
    if len(prefix) != PREFIX.size:
        raise WireError(f"frame truncated: {len(prefix)} of {PREFIX.size} prefix bytes")
    magic, n_json, n_payload = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise WireError(f"not a frame: magic {magic!r}, expected {MAGIC!r} (garbled stream?)")
    if n_json > MAX_JSON:
        raise FrameTooLarge(f"frame metadata announces {n_json} bytes, limit {MAX_JSON}")
    if n_payload > max_payload:
        raise FrameTooLarge(f"frame payload announces {n_payload} bytes, limit {max_payload}")
    return n_json, n_payload


def decode_meta(text: bytes) -> Meta:
    """The JSON object of a frame."""
    try:
        meta = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"frame metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("type"), str):
        raise WireError("frame metadata must be a JSON object with a string 'type'")
    return meta


def decode_frame(data: bytes, max_payload: int = MAX_PAYLOAD) -> Tuple[Meta, bytes]:
    """Split one complete frame into (meta, payload)."""
    n_json, n_payload = decode_prefix(data[: PREFIX.size], max_payload)
    expected = PREFIX.size + n_json + n_payload
    if len(data) != expected:
        raise WireError(f"frame truncated or padded: {len(data)} bytes, expected {expected}")
    meta = decode_meta(data[PREFIX.size : PREFIX.size + n_json])
    return meta, data[PREFIX.size + n_json :]


def read_frame(
    read_exact: Callable[[int], bytes], max_payload: int = MAX_PAYLOAD
) -> Tuple[Meta, bytes]:
    """Read one frame with `read_exact(n)`, which returns n bytes or raises.

    `read_exact` raises EOFError when the stream ends before any byte of a read; an end inside a
    frame is a truncated frame (WireError). EOFError before a frame starts means the peer left.
    """
    n_json, n_payload = decode_prefix(read_exact(PREFIX.size), max_payload)
    try:
        meta = decode_meta(read_exact(n_json))
        payload = read_exact(n_payload) if n_payload else b""
    except EOFError:
        raise WireError("frame truncated: stream closed inside a frame") from None
    return meta, payload


def stream_reader(stream: BinaryIO) -> Callable[[int], bytes]:
    """A `read_exact` over a blocking binary stream."""

    def read_exact(n: int) -> bytes:
        chunks = []
        left = n
        while left:
            chunk = stream.read(left)
            if not chunk:
                if left == n:
                    raise EOFError("stream closed")
                raise WireError(f"frame truncated: stream closed after {n - left} of {n} bytes")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    return read_exact


def validate_tensors(
    worker: str,
    tensors: Mapping[str, torch.Tensor],
    spec: Mapping[str, Tuple[tuple, torch.dtype]],
    what: str = "weights",
) -> None:
    """Check `tensors` against `spec` (name -> (shape, dtype)) and for finite values.

    Raises:
        UpdateRejected: names missing or unexpected, a shape or dtype differs, or a value is
            NaN/Inf.
    """
    missing = sorted(set(spec) - set(tensors))
    extra = sorted(set(tensors) - set(spec))
    if missing or extra:
        raise UpdateRejected(
            worker,
            f"{what} names differ: missing {missing or 'none'}, unexpected {extra or 'none'}",
        )
    for name, (shape, dtype) in spec.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise UpdateRejected(
                worker, f"{what} {name!r} has shape {list(t.shape)}, expected {list(shape)}"
            )
        if t.dtype != dtype:
            raise UpdateRejected(worker, f"{what} {name!r} has dtype {t.dtype}, expected {dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UpdateRejected(worker, f"{what} {name!r} has {bad} non-finite values (NaN/Inf)")


def split_prefixed(
    tensors: Mapping[str, torch.Tensor], sep: str = "/"
) -> Dict[str, Dict[str, torch.Tensor]]:
    """{'a/x': t} -> {'a': {'x': t}}: several named tensor sets travel in one payload."""
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        group, _, name = key.partition(sep)
        if not name:
            raise WireError(f"tensor name {key!r} lacks a '{sep}' group prefix")
        out.setdefault(group, {})[name] = t
    return out


def join_prefixed(
    groups: Mapping[str, Mapping[str, torch.Tensor]], sep: str = "/"
) -> Dict[str, torch.Tensor]:
    """Inverse of `split_prefixed`."""
    return {f"{g}{sep}{k}": t for g, ts in groups.items() for k, t in ts.items()}


def optional(meta: Meta, key: str, kind: type, default: Optional[Any] = None) -> Any:
    """`meta[key]` checked to be a `kind` (or `default` when absent)."""
    value = meta.get(key, default)
    if value is not None and not isinstance(value, kind):
        raise WireError(f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value
