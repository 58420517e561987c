"""Valid-looking input for the fuzz tests, and the mutations that make it subtly wrong.

What a peer would send, built with hypothesis: safetensors files of every dtype the codec knows
(real header, offsets that tile the data), and every protocol message as a frame (real magic,
lengths that match). Then one mutation at a time: a header entry's dtype, shape or offsets, the
header or metadata JSON, a declared length, a message field, each set to another JSON value. Used
by test_fuzz_protocol.py; kept apart so that file reads as the properties it checks.

Values include what a hostile peer would write into otherwise valid JSON (`Raw` tokens, spliced
into the text as is): NaN and Infinity, floats that overflow, integers of thousands of digits or
past int64, and brackets nested deeper than Python's parser recurses.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from fedcore import protocol, tensorcodec, wire
from fedcore.errors import WireError
from fedcore.evaluation import EvalResult
from fedcore.protocol import Hello, TrainRequest, Update
from fedcore.training import TrainMetrics, TrainPlan

# -- valid input ----------------------------------------------------------------------------

NAMES = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=8)
DTYPE_NAMES = sorted(tensorcodec.DTYPES)
FINITE = st.floats(allow_nan=False, allow_infinity=False)


@dataclass(frozen=True)
class Raw:
    """JSON text written as is where a value goes (what `json.dumps` would never write)."""

    text: str


RAW_TOKENS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    str(2**64),
    str(2**66),
    "9" * 4000,  # under Python's own 4300-digit limit: the decoder must bound it itself
    "[" * 5000 + "]" * 5000,  # deeper than Python's recursion limit
    '{"a":' * 40 + "0" + "}" * 40,
]
RAW = st.sampled_from(RAW_TOKENS).map(Raw)


def dumps(value: object) -> bytes:
    """`value` as compact JSON, with each `Raw` inside it spliced in as its text."""
    raws: list[str] = []

    def mark(obj: object) -> str:
        if not isinstance(obj, Raw):
            raise TypeError(f"not JSON: {obj!r}")
        raws.append(obj.text)
        return f"\0raw{len(raws) - 1}\0"

    text = json.dumps(value, separators=(",", ":"), allow_nan=False, default=mark)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\0raw{i}\0"), raw)
    return text.encode()


# Any JSON value a peer might put where another was expected.
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    FINITE,
    st.text(max_size=8),
    st.lists(st.integers(-3, 12), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(-3, 12), max_size=3),
    RAW,
)


@st.composite
def tensor_sets(draw: st.DrawFn, max_tensors: int = 4) -> dict[str, torch.Tensor]:
    """1..max_tensors named tensors of any dtype the codec knows, 0-3 dims, any bytes."""
    out = {}
    for name in draw(st.lists(NAMES, min_size=1, max_size=max_tensors, unique=True)):
        dtype = tensorcodec.DTYPES[draw(st.sampled_from(DTYPE_NAMES))]
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        t = torch.zeros(shape, dtype=dtype)
        n = t.numel() * t.element_size()
        raw = draw(st.binary(min_size=n, max_size=n))
        if dtype == torch.bool:
            raw = bytes(b & 1 for b in raw)
        if n:
            t = torch.frombuffer(bytearray(raw), dtype=dtype).view(shape).clone()
        out[name] = t
    return out


METADATA = st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bytes (bytes, not values: NaN != NaN)."""
    return set(a) == set(b) and tensorcodec.dumps(a) == tensorcodec.dumps(b)


# -- safetensors files ----------------------------------------------------------------------


def split_file(data: bytes) -> tuple[Any, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def safetensors_file(header: object, body: bytes) -> bytes:
    text = dumps(header)
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


DIMS = st.one_of(st.integers(-2, 6), st.sampled_from([2**31, 2**40, 2**41, 2**62, 2**66]), RAW)
OFFSETS = st.one_of(st.integers(-4, 160), st.just(2**64), RAW)
ENTRY_VALUES = {
    "dtype": st.one_of(st.sampled_from([*DTYPE_NAMES, "F8", "f32", "", "C64"]), JSON_VALUES),
    "shape": st.one_of(st.lists(DIMS, max_size=10), JSON_VALUES),
    "data_offsets": st.one_of(st.lists(OFFSETS, max_size=3), JSON_VALUES),
}
HEADER_MUTATIONS = [
    *["entry field"] * 3,
    "shift offsets",
    "drop field",
    "entry not an object",
    "extra entry",
    "drop entry",
    "metadata",
    "header not an object",
    "header length",
    "body length",
    "json byte",
    "json cut",
]


def mutate_file(data: st.DataObject, header: dict[str, Any], body: bytes) -> bytes:
    """One mutation of a valid safetensors file (header entry, header JSON or a length)."""
    kind = data.draw(st.sampled_from(HEADER_MUTATIONS), label="file mutation")
    name = data.draw(st.sampled_from([k for k in header if k != "__metadata__"]), label="tensor")
    entry = header[name]
    if kind == "entry field":
        key = data.draw(st.sampled_from(sorted(ENTRY_VALUES)), label="field")
        entry[key] = data.draw(ENTRY_VALUES[key], label="value")
    elif kind == "shift offsets":
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and all(type(o) is int for o in offsets):
            d = data.draw(st.integers(-9, 9).filter(bool), label="shift")
            which = data.draw(st.sampled_from([(0,), (1,), (0, 1)]), label="which")
            entry["data_offsets"] = [o + d if i in which else o for i, o in enumerate(offsets)]
    elif kind == "drop field" and entry:
        del entry[data.draw(st.sampled_from(sorted(entry)), label="field")]
    elif kind == "entry not an object":
        header[name] = data.draw(JSON_VALUES, label="value")
    elif kind == "extra entry":  # a second tensor claiming the same bytes
        header[name + "~"] = dict(entry)
    elif kind == "drop entry":  # its bytes become a gap or trailing data
        del header[name]
    elif kind == "metadata":
        header["__metadata__"] = data.draw(
            st.one_of(JSON_VALUES, st.dictionaries(st.text(max_size=3), JSON_VALUES, max_size=2)),
            label="metadata",
        )
    elif kind == "header not an object":
        return safetensors_file(data.draw(JSON_VALUES, label="header"), body)
    raw = safetensors_file(header, body)
    n = len(raw) - 8 - len(body)
    if kind == "header length":  # a few bytes off: into the body, or short of the JSON's end
        delta = data.draw(st.integers(-16, 16).filter(bool), label="delta")
        return struct.pack("<Q", max(0, n + delta)) + raw[8:]
    if kind == "body length":
        cut = data.draw(st.integers(-16, 16).filter(bool), label="cut")
        return raw[:cut] if cut < 0 else raw + bytes(cut)
    if kind == "json byte":
        pos = data.draw(st.integers(8, 8 + n - 1), label="pos")
        value = data.draw(st.integers(0, 255), label="byte")
        return raw[:pos] + bytes([value]) + raw[pos + 1 :]
    if kind == "json cut":  # the JSON ends early and the declared length says so
        keep = data.draw(st.integers(0, n - 1), label="keep")
        return struct.pack("<Q", keep) + raw[8 : 8 + keep] + body
    return raw


def mutable(raw: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(header, body) of a file that still has a tensor entry to mutate, else None."""
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header, body = wire.parse_json(raw[8 : 8 + n], "header"), raw[8 + n :]
    except (WireError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    entries = [v for k, v in header.items() if k != "__metadata__"]
    if not entries or not all(isinstance(v, dict) for v in entries):
        return None
    return header, body


# -- frames and messages --------------------------------------------------------------------

HELLOS = st.builds(
    Hello,
    worker=st.text(max_size=8),
    shard=st.text(max_size=8),
    label_counts=st.dictionaries(st.integers(0, 9), st.integers(0, 10**6), max_size=10),
    python=st.text(max_size=6),
    torch=st.text(max_size=6),
    device=st.sampled_from(["cpu", "cuda"]),
    threads=st.integers(0, 64),
    pid=st.integers(1, 2**31),
)
PLANS = st.builds(
    TrainPlan,
    steps=st.integers(1, 50),
    batch_size=st.integers(1, 128),
    lr=st.floats(1e-6, 10),
    momentum=st.floats(0, 0.99),
    weight_decay=st.floats(0, 1),
    label_smoothing=st.floats(0, 0.5),
    prox_mu=st.floats(0, 1),
    scaffold=st.booleans(),
)
METRICS = st.builds(
    TrainMetrics,
    loss=FINITE,
    samples=st.integers(0, 10**6),
    steps=st.integers(0, 10**4),
    seconds=st.floats(0, 1e6),
)


@st.composite
def eval_results(draw: st.DrawFn) -> EvalResult:
    """A consistent result: 10x10 confusion, `total` its sum, `correct` its diagonal."""
    confusion = draw(
        st.lists(
            st.lists(st.integers(0, 10**4), min_size=10, max_size=10), min_size=10, max_size=10
        )
    )
    return EvalResult(
        correct=sum(confusion[d][d] for d in range(10)),
        total=sum(map(sum, confusion)),
        loss=draw(st.floats(0, 1e6)),
        seed_loss=draw(st.floats(0, 1e6)),
        confusion=confusion,
        group_shares=draw(st.lists(st.floats(0, 1), max_size=3)),
    )


EVAL_RESULTS = eval_results()
ROUNDS = st.integers(0, 10**4)


def _extras(reserved: str) -> st.SearchStrategy[dict[str, dict[str, torch.Tensor]]]:
    """A strategy's extra tensor groups (never the group the message itself uses)."""
    names = st.sampled_from(["control", "control_base", "control_delta", reserved])
    groups = st.dictionaries(names, tensor_sets(2), max_size=2)
    return groups.map(lambda g: {k: v for k, v in g.items() if k != reserved})


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, Any, bytes]:
    """(kind, the message as its decoder returns it, its frame), for every protocol message."""
    kinds = ["hello?", "hello", "train", "update", "evaluate", "evaluation", "bye"]
    kind = draw(st.sampled_from(kinds))
    if kind == "hello?":
        return kind, None, protocol.encode_hello_request()
    if kind == "bye":
        return kind, None, protocol.encode_simple("bye")
    if kind == "hello":
        hello = draw(HELLOS)
        return kind, hello, protocol.encode_hello(hello)
    if kind == "train":
        seed = draw(st.integers(0, 2**63 - 1))
        req = TrainRequest(
            draw(ROUNDS), draw(PLANS), seed, draw(tensor_sets()), draw(_extras("global"))
        )
        return kind, req, protocol.encode_train(req)
    if kind == "update":
        worker, rnd, n = draw(st.text(max_size=8)), draw(ROUNDS), draw(st.integers(0, 10**6))
        upd = Update(worker, rnd, draw(tensor_sets()), n, draw(METRICS), draw(_extras("weights")))
        return kind, upd, protocol.encode_update(upd)
    if kind == "evaluate":
        names = st.sampled_from(["federated", "alice"])
        models = draw(st.dictionaries(names, tensor_sets(2), max_size=2))
        rnd = draw(ROUNDS)
        groups = draw(st.lists(st.lists(st.integers(0, 9), max_size=4), max_size=3))
        return kind, (rnd, models, groups), protocol.encode_evaluate(rnd, models, groups)
    names = st.sampled_from(["federated", "bob"])
    results = draw(st.dictionaries(names, EVAL_RESULTS, max_size=2))
    return kind, results, protocol.encode_evaluation(results)


# How the receiving side decodes each kind (the worker a request, the coordinator a reply).
DECODERS: dict[str, Callable[[wire.Meta, bytes], Any]] = {
    "hello?": lambda meta, payload: protocol.expect(meta, "hello"),
    "bye": lambda meta, payload: protocol.expect(meta, "bye"),
    "hello": lambda meta, payload: protocol.decode_hello(meta),
    "train": protocol.decode_train,
    "update": protocol.decode_update,
    "evaluate": protocol.decode_evaluate,
    "evaluation": lambda meta, payload: protocol.decode_evaluation(meta),
}


def frame_with(text: bytes, payload: bytes) -> bytes:
    """A frame of raw metadata bytes and a payload, with lengths that match them."""
    return wire.PREFIX.pack(wire.MAGIC, len(text), len(payload)) + text + payload


def mutate_meta(data: st.DataObject, meta: dict[str, Any]) -> dict[str, Any]:
    """One field of the metadata, or of an object inside it, set to another value or dropped."""
    target = meta
    while True:  # maybe descend: plan, metrics, label_counts, results, one result
        inner = [k for k, v in target.items() if isinstance(v, dict) and v]
        if not inner or not data.draw(st.booleans(), label="descend"):
            break
        target = target[data.draw(st.sampled_from(inner), label="into")]
    key = data.draw(st.sampled_from([*sorted(target), "zz"]), label="key")
    if key != "zz" and data.draw(st.booleans(), label="drop"):
        del target[key]
    elif key == "type":
        kinds = sorted({*DECODERS, "error", "update"} - {"hello?"})
        target[key] = data.draw(st.one_of(st.sampled_from(kinds), JSON_VALUES), label="type")
    else:
        target[key] = data.draw(JSON_VALUES, label="value")
    return meta


FRAME_MUTATIONS = [
    *["field"] * 4,
    "meta not an object",
    "json byte",
    "json cut",
    "boundary",
    "payload length",
    *["payload"] * 2,
]


def mutate_frame(data: st.DataObject, frame: bytes) -> bytes:
    """One mutation of a valid frame: its metadata, its declared lengths or its payload."""
    _, n_json, n_payload = wire.PREFIX.unpack(frame[: wire.PREFIX.size])
    text = frame[wire.PREFIX.size : wire.PREFIX.size + n_json]
    payload = frame[wire.PREFIX.size + n_json :]
    rest = frame[wire.PREFIX.size :]
    kind = data.draw(st.sampled_from(FRAME_MUTATIONS), label="frame mutation")
    if kind == "field":
        return frame_with(dumps(mutate_meta(data, json.loads(text))), payload)
    if kind == "meta not an object":
        return frame_with(dumps(data.draw(JSON_VALUES, label="meta")), payload)
    if kind == "json byte":
        pos = data.draw(st.integers(0, len(text) - 1), label="pos")
        value = data.draw(st.integers(0, 255), label="byte")
        return frame_with(text[:pos] + bytes([value]) + text[pos + 1 :], payload)
    if kind == "json cut":
        return frame_with(text[: data.draw(st.integers(0, len(text) - 1), label="keep")], payload)
    if kind == "boundary":  # the JSON length moves into the payload or back; the total holds
        d = max(-n_json, min(data.draw(st.integers(-16, 16).filter(bool), label="d"), n_payload))
        return wire.PREFIX.pack(wire.MAGIC, n_json + d, n_payload - d) + rest
    if kind == "payload length":
        d = data.draw(st.integers(-16, 16).filter(bool), label="d")
        return wire.PREFIX.pack(wire.MAGIC, n_json, max(0, n_payload + d)) + rest
    parts = mutable(payload) if payload else None
    return frame_with(text, mutate_file(data, *parts)) if parts else frame
