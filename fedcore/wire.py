"""The wire format: length-prefixed frames of JSON metadata plus safetensors bytes.

Frame: magic `FMW1` (4 bytes), JSON length (u32 LE), payload length (u64 LE), the JSON object,
then the payload (a safetensors file, possibly empty). Receivers bound both lengths before reading,
so a garbled or hostile peer costs at most one bounded read and a `WireError`, never an unpickle
or an allocation it chose. Updates are validated (names, shapes, dtypes, finite values) before
anything aggregates them. Runs on the device (Python 3.8).

Every JSON text from a peer (frame metadata, a safetensors header) goes through `parse_json`,
which bounds it before and while parsing: nesting depth and the digits of a number by a scan of
the raw bytes (Python's parser recurses, so 100,000 brackets would raise RecursionError; and
turning digits into an int costs time quadratic in their number), floats finite, no NaN or
Infinity, no duplicate keys. The field checkers below (`integer`, `number`, `text`, `mapping`,
`array`) then take only real ints (a bool is not one) and finite floats, in range. Messages quote
at most `CLIP` characters of what was received (`quote`): a hostile value never becomes a
MiB-long log line.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import struct
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Tuple

import torch

from .errors import FrameTooLarge, UpdateRejected, WireError

MAGIC = b"FMW1"
PREFIX = struct.Struct("<4sIQ")
MAX_JSON = 1 << 20
MAX_PAYLOAD = 256 << 20
MAX_DEPTH = 16  # our deepest message (an evaluation's confusion matrix) nests 5 levels
MAX_DIGITS = 20  # digits in a row in a number: every int64 and uint64 fits
MAX_INT = 2**63 - 1
CLIP = 200  # characters of a received value quoted in an error message

Meta = Dict[str, Any]


def clip(text: str, limit: int = CLIP) -> str:
    """`text`, cut to `limit` characters with the number of the rest."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 10, 8
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = CLIP


def quote(value: Any) -> str:
    """A received value for an error message: its repr, at most `CLIP` characters, built
    without walking the rest of a long list or string."""
    return clip(_REPR.repr(value))


class _Refused(ValueError):
    """Raised inside the JSON parser's hooks; parse_json turns it into a WireError."""


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {clip(text, 24)} is not finite")
    return value


def _constant(name: str) -> float:
    raise _Refused(f"{name} is not a number this protocol accepts (finite numbers only)")


def _object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"key {clip(repr(key), 40)} appears twice in one object")
        out[key] = value
    return out


_STRING = re.compile(rb'"[^"]*"')
_LONG_NUMBER = re.compile(rb"[0-9]{%d}" % (MAX_DIGITS + 1))
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACES_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")


def prescan(raw: bytes, what: str, depth: int = MAX_DEPTH) -> None:
    """Refuse JSON text with a number of more than MAX_DIGITS digits, or whose brackets nest
    deeper than `depth` or do not pair up, before a parser sees it.

    Linear in len(raw), in C: escaped backslashes and quotes are cut out (left to right, as a
    parser pairs them), then strings (the regex cannot backtrack). In what is left, a run of
    digits is a number; of the brackets (braces counted as brackets: depth does not depend on
    the kind), each of at most `depth` passes removes the innermost pairs. A valid text within
    the limit ends empty; anything left is too deep or unbalanced (which the parser would refuse
    anyway), so Python's recursive parser never sees it.
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = _STRING.sub(b"", unescaped)
    long_number = _LONG_NUMBER.search(outside)
    if long_number:
        start = long_number.group().decode()
        raise WireError(
            f"{what} is not valid JSON: number {start}... has more than {MAX_DIGITS} digits"
        )
    brackets = outside.translate(_BRACES_AS_BRACKETS, _NOT_BRACKET)
    if b"[" * (depth + 1) not in brackets:  # the usual attack, found by one search
        for _ in range(depth):
            brackets = brackets.replace(b"[]", b"")
            if not brackets:
                return
    raise WireError(
        f"{what} is not valid JSON: its brackets nest deeper than {depth} levels or do not pair up"
    )


def parse_json(raw: bytes, what: str) -> Any:
    """Parse JSON text received from a peer, bounded as the module docstring says.

    Raises:
        WireError: not UTF-8, not JSON, too deep, a number out of bounds, NaN/Infinity, or a
            duplicate key; the message starts with `what`.
    """
    prescan(raw, what)
    try:
        return json.loads(
            raw.decode("utf-8"),
            parse_float=_float,
            parse_constant=_constant,
            object_pairs_hook=_object,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"{what} is not valid JSON: {clip(str(exc))}") from None


def integer(value: Any, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    """`value` if it is an int (not a bool) in lo..hi, else WireError naming `what`."""
    if type(value) is not int or not lo <= value <= hi:
        raise WireError(f"{what} must be an integer in {lo}..{hi}, got {quote(value)}")
    return value


def number(value: Any, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """`value` as a float if it is a finite int or float (not a bool) in lo..hi, else WireError."""
    if type(value) not in (int, float) or not (math.isfinite(value) and lo <= value <= hi):
        raise WireError(f"{what} must be a finite number in {lo}..{hi}, got {quote(value)}")
    return float(value)


def text(value: Any, what: str, limit: int = 256) -> str:
    """`value` if it is a string of at most `limit` characters, else WireError naming `what`."""
    if not isinstance(value, str) or len(value) > limit:
        raise WireError(
            f"{what} must be a string of at most {limit} characters, got {quote(value)}"
        )
    return value


def mapping(value: Any, what: str) -> Dict[str, Any]:
    """`value` if it is a JSON object, else WireError naming `what`."""
    if not isinstance(value, dict):
        raise WireError(f"{what} must be a JSON object, got {quote(value)}")
    return value


def array(value: Any, what: str, limit: int) -> List[Any]:
    """`value` if it is a JSON array of at most `limit` items, else WireError naming `what`."""
    if not isinstance(value, list) or len(value) > limit:
        raise WireError(f"{what} must be a list of at most {limit} items, got {quote(value)}")
    return value


def encode_frame(meta: Mapping[str, Any], payload: bytes = b"") -> bytes:
    """One frame holding `meta` (a JSON object) and `payload` bytes."""
    return encode_head(meta, len(payload)) + payload


def encode_head(meta: Mapping[str, Any], payload_size: int) -> bytes:
    """A frame's prefix and metadata, for a payload of `payload_size` bytes sent after it
    (`encode_frame` without copying a payload that many frames share)."""
    text = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > MAX_JSON:
        raise FrameTooLarge(f"frame metadata is {len(text)} bytes, limit {MAX_JSON}")
    return PREFIX.pack(MAGIC, len(text), payload_size) + text


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


def decode_meta(raw: bytes) -> Meta:
    """The JSON object of a frame (bounded by `parse_json`)."""
    meta = parse_json(raw, "frame metadata")
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
    meta, n_payload = read_head(read_exact, max_payload)
    try:
        payload = read_exact(n_payload) if n_payload else b""
    except EOFError:
        raise WireError("frame truncated: stream closed inside a frame") from None
    return meta, payload


def read_head(
    read_exact: Callable[[int], bytes], max_payload: int = MAX_PAYLOAD
) -> Tuple[Meta, int]:
    """Read a frame's prefix and metadata with `read_exact` (as `read_frame`), not its payload:
    (meta, payload length, within max_payload), for a reader that puts the payload elsewhere."""
    n_json, n_payload = decode_prefix(read_exact(PREFIX.size), max_payload)
    try:
        meta = decode_meta(read_exact(n_json))
    except EOFError:
        raise WireError("frame truncated: stream closed inside a frame") from None
    return meta, n_payload


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
            f"{what} names differ: missing {missing or 'none'}, "
            f"unexpected {quote(extra) if extra else 'none'}",
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
