"""Fuzzing the decoders: valid-looking frames and tensor files, mutated, end in a typed rejection.

Random bytes stop at the first magic or length check and say nothing about the code behind it.
These tests build what a peer would send (real magic, lengths that match, well-formed JSON,
safetensors headers whose offsets tile the data), check that it round-trips, then mutate one part
at a time (fuzz_inputs.py): a header entry's dtype, shape or offsets, the header or metadata JSON,
a declared length, a message field. The result goes to the real decoders (`fedcore.wire`,
`fedcore.tensorcodec`, `fedcore.protocol`) and to the worker's request loop, which must accept it
or reject it with `WireError` (or a subclass); anything else is a bug. An `error` reply is the
one other typed outcome: `protocol.expect` raises `RemoteError` for it, by design.

The inputs that escaped as untyped errors before issue 12 (RecursionError, OverflowError,
TypeError, RuntimeError) are pinned one by one in `test_hostile_inputs_are_wire_errors`, each
with the message its rejection must give; the generators make them too (fuzz_inputs.RAW_TOKENS).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzz_inputs import (
    DECODERS,
    METADATA,
    frame_with,
    messages,
    mutable,
    mutate_file,
    mutate_frame,
    same_tensors,
    split_file,
    tensor_sets,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore import protocol, tensorcodec, wire
from fedcore.errors import WireError
from fedcore.model import initial_weights
from fedcore.protocol import Hello, RemoteError, TrainRequest, Update
from fedcore.shards import ShardSpec
from fedcore.training import TrainMetrics, TrainPlan
from fedcore.worker import Worker, serve

FUZZ = settings(max_examples=300, deadline=None)

# -- safetensors files ----------------------------------------------------------------------


@FUZZ
@given(tensor_sets(), METADATA)
def test_valid_tensor_files_round_trip(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    data = tensorcodec.dumps(tensors, meta)
    back, back_meta = tensorcodec.loads(data)
    assert back_meta == meta
    assert all(back[k].shape == tensors[k].shape for k in tensors)
    assert same_tensors(back, tensors)
    assert tensorcodec.dumps(back, back_meta) == data


@FUZZ
@given(tensor_sets(), METADATA, st.integers(1, 3), st.data())
def test_mutated_tensor_headers_raise_only_wire_error(
    tensors: dict[str, torch.Tensor], meta: dict, count: int, data: st.DataObject
) -> None:
    raw = tensorcodec.dumps(tensors, meta)
    for _ in range(count):
        parts = mutable(raw)
        if parts is None:
            break
        raw = mutate_file(data, *parts)
    try:
        back, back_meta = tensorcodec.loads(raw)
    except WireError:
        return
    # Accepted: then it is a consistent file, which writes back and reads again the same.
    _, body = split_file(raw)
    assert sum(t.numel() * t.element_size() for t in back.values()) == len(body)
    again, _ = tensorcodec.loads(tensorcodec.dumps(back, back_meta))
    assert same_tensors(again, back)


# -- frames and messages --------------------------------------------------------------------


@FUZZ
@given(messages())
def test_valid_messages_round_trip(message: tuple[str, Any, bytes]) -> None:
    kind, sent, frame = message
    meta, payload = wire.read_frame(wire.stream_reader(io.BytesIO(frame)))
    assert (meta, payload) == wire.decode_frame(frame)
    got = DECODERS[kind](meta, payload)
    if kind in ("hello", "evaluation"):
        assert got == sent
    elif kind in ("train", "update"):
        fixed = ("round", "plan", "sample_seed") if kind == "train" else ("worker", "round")
        fixed += () if kind == "train" else ("num_examples", "metrics")
        assert [getattr(got, f) for f in fixed] == [getattr(sent, f) for f in fixed]
        assert same_tensors(got.weights, sent.weights)
        assert set(got.extras) == set(sent.extras)
        assert all(same_tensors(got.extras[g], sent.extras[g]) for g in sent.extras)
    elif kind == "evaluate":
        (rnd, models, groups), (sent_rnd, sent_models, sent_groups) = got, sent
        assert (rnd, groups) == (sent_rnd, sent_groups) and set(models) == set(sent_models)
        assert all(same_tensors(models[m], sent_models[m]) for m in models)


@FUZZ
@given(messages(), st.data())
def test_mutated_frames_raise_only_wire_error(
    message: tuple[str, Any, bytes], data: st.DataObject
) -> None:
    kind, _, frame = message
    mutated = mutate_frame(data, frame)
    try:  # read from a stream, as the worker and the session do
        wire.read_frame(wire.stream_reader(io.BytesIO(mutated)))
    except WireError:
        pass
    try:
        meta, payload = wire.decode_frame(mutated)
    except WireError:
        return
    try:  # the message, as its receiver decodes it
        DECODERS[kind](meta, payload)
    except WireError:
        pass
    except RemoteError:
        assert meta["type"] == "error"  # the protocol's error reply, raised on purpose


# -- the worker's request loop --------------------------------------------------------------

W = initial_weights(1)
VALID = [
    protocol.encode_hello_request(),
    protocol.encode_train(TrainRequest(1, TrainPlan(steps=1, batch_size=2), 5, W)),
    protocol.encode_evaluate(1, {"federated": W}, [[0], [1]]),
    protocol.encode_simple("bye"),
]


@pytest.fixture(scope="module")
def worker(mnist_dir: Path) -> Worker:
    return Worker("fuzz", str(mnist_dir), ShardSpec.by_labels([1], split="test"), "cpu")


def _replies(out: bytes) -> list[dict]:
    read = wire.stream_reader(io.BytesIO(out))
    metas = []
    while True:
        try:
            meta, _ = wire.read_frame(read)
        except EOFError:
            return metas
        metas.append(meta)


def _check(worker: Worker, data: bytes) -> None:
    out = io.BytesIO()
    code = serve(worker, io.BytesIO(data), out, max_payload=8 << 20)
    metas = _replies(out.getvalue())  # every reply is itself a well-formed frame
    assert code in (0, 2)
    if code == 2:
        assert metas and metas[-1]["type"] == "error"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), max_size=6),
    st.one_of(st.none(), st.integers(0, 10**7)),
    st.binary(max_size=64),
)
def test_mutated_frames(worker: Worker, frame: bytes, flips, cut, insert: bytes) -> None:
    data = bytearray(frame)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    pos = (flips[0][0] % (len(data) + 1)) if flips else 0
    data[pos:pos] = insert
    _check(worker, bytes(data))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=5),
        st.one_of(st.integers(), st.text(max_size=5), st.none(), st.lists(st.integers())),
        max_size=5,
    )
)
def test_train_plan_decoder_only_raises_wire_error(raw: dict) -> None:
    try:
        TrainPlan.from_dict(raw)
    except WireError:
        pass


# -- the inputs that escaped as untyped errors before issue 12 ---------------------------------

NESTED = b"[" * 100_000 + b"]" * 100_000  # valid JSON, deeper than Python's recursion limit
RANGE = r"must be an integer in 0\.\.2147483647, got"


def _header(entry: bytes, body: bytes = bytes(4)) -> Callable[[], Any]:
    """Decoding a safetensors file whose one entry `x` is the raw JSON `entry`."""
    text = b'{"x":' + entry + b"}"
    return lambda: tensorcodec.loads(struct.pack("<Q", len(text)) + text + body)


def _f32(shape: bytes, offsets: bytes = b"[0,4]") -> bytes:
    return b'{"dtype":"F32","shape":[' + shape + b'],"data_offsets":' + offsets + b"}"


def _meta(text: bytes) -> Callable[[], Any]:
    """Decoding a frame whose metadata is the raw JSON `text`."""
    return lambda: wire.decode_frame(frame_with(text, b""))


def _hello(**fields: str) -> Callable[[], Any]:
    """Decoding a valid hello with `fields` replaced by raw JSON values."""
    meta, _ = wire.decode_frame(
        protocol.encode_hello(Hello("a", "0-3", {0: 5}, "3.8", "2.1", "cpu", 1, 7))
    )
    meta.update({k: json.loads(v) for k, v in fields.items()})
    return lambda: protocol.decode_hello(meta)


def _update(metrics: str) -> Callable[[], Any]:
    """Decoding a valid update with raw JSON `metrics`."""
    upd = Update("a", 1, {"w": torch.ones(1)}, 1, TrainMetrics(1.0, 1, 1, 1.0))
    meta, payload = wire.decode_frame(protocol.encode_update(upd))
    meta["metrics"] = json.loads(metrics)
    return lambda: protocol.decode_update(meta, payload)


def _json(decode: Callable[[wire.Meta], Any], text: str) -> Callable[[], Any]:
    return lambda: decode(json.loads(text))


BAD_EVALUATION = (
    '{"type": "evaluation", "results": {"m": {"correct": 1e400, "total": 1, "loss": 1, '
    '"seed_loss": 1, "confusion": [], "group_shares": []}}}'
)
# (id, decoding a valid-looking file or message, the start of its WireError's message)
HOSTILE_INPUTS = [
    ("shape-infinity", _header(_f32(b"Infinity")), "tensor header is not valid JSON: Infinity"),
    ("offset-1e400", _header(_f32(b"1", b"[0,1e400]")), "number 1e400 is not finite"),
    (
        "empty-dim-past-int64",
        _header(_f32(b"0,%d" % 2**66, b"[0,0]"), b""),
        r"tensor 'x': dimensions must be integers in 0\.\.1099511627776, got \[0, 7378",
    ),
    (
        "empty-stride-overflow",
        _header(_f32(b"0,%d,%d" % (2**40, 2**40), b"[0,0]"), b""),
        r"tensor 'x': offsets 0\.\.0 \(0 bytes\) do not hold a F32 tensor of shape \[0, 1099",
    ),
    ("nine-dims", _header(_f32(b"1," * 8 + b"1")), "tensor 'x': shape must be a list of at most 8"),
    ("4000-digit-dim", _header(_f32(b"9" * 4000)), "number 9999.* has more than 20 digits"),
    ("bool-dim", _header(_f32(b"true")), r"tensor 'x': dimensions must be .*got \[True\]"),
    (
        "more-elements-than-bytes",
        _header(_f32(b"4")),
        r"tensor 'x': offsets 0\.\.4 \(4 bytes\) do not hold a F32 tensor of shape \[4\]",
    ),
    (
        "empty-shape-with-bytes",
        _header(_f32(b"0")),
        r"tensor 'x': offsets 0\.\.4 \(4 bytes\) do not hold a F32 tensor of shape \[0\]",
    ),
    (
        "header-over-64kib",
        lambda: tensorcodec.loads(struct.pack("<Q", (64 << 10) + 8) + bytes((64 << 10) + 8)),
        "tensor header announces 65544 bytes, limit 65536",
    ),
    (
        "nested-header",
        lambda: tensorcodec.loads(struct.pack("<Q", len(NESTED)) + NESTED),
        "tensor header announces 200000 bytes, limit 65536",
    ),
    (
        "nested-entry",
        _header(b"[" * 10_000 + b"]" * 10_000, b""),
        "tensor header is not valid JSON: its brackets nest deeper than 16 levels",
    ),
    (
        "nested-frame-metadata",
        _meta(NESTED),
        "frame metadata is not valid JSON: its brackets nest deeper than 16 levels",
    ),
    (
        # b'"\\\\"' is the JSON string "\\" (one backslash): a scanner reading its \" as an
        # escaped quote would think the string runs on and miss the brackets after it
        "escapes-do-not-hide-brackets",
        _meta(b'{"type": "hello", "a": "\\\\", "b": ' + NESTED + b"}"),
        "frame metadata is not valid JSON: its brackets nest deeper",
    ),
    ("nan", _meta(b'{"type": "hello", "x": NaN}'), "frame metadata is not valid JSON: NaN is not"),
    ("duplicate-key", _meta(b'{"type": "hello", "type": "bye"}'), "key 'type' appears twice"),
    (
        "hello-1e400",
        _hello(threads="1e400"),
        "hello threads must be an integer in 0..65536, got inf",
    ),
    (
        "hello-bool",
        _hello(threads="true"),
        r"hello threads must be an integer in 0\.\.65536, got True",
    ),
    (
        "hello-inf-count",
        _hello(label_counts='{"0": Infinity}'),
        f"hello label count of 0 {RANGE} inf",
    ),
    (
        "hello-10^12",
        _hello(label_counts='{"0": 1000000000000}'),
        f"count of 0 {RANGE} 1000000000000",
    ),
    (
        "update-samples-1e400",
        _update('{"loss": 1, "samples": 1e400, "steps": 1, "seconds": 1}'),
        f"update metric samples {RANGE} inf",
    ),
    (
        "update-loss-1e400",
        _update('{"loss": 1e400, "samples": 1, "steps": 1, "seconds": 1}'),
        "update metric loss must be a finite number",
    ),
    (
        "evaluate-digit-1e400",
        _json(
            lambda m: protocol.decode_evaluate(m, b""),
            '{"type": "evaluate", "round": 1, "groups": [[1e400]]}',
        ),
        r"evaluate request group digit must be an integer in 0\.\.9, got inf",
    ),
    (
        "evaluate-null-round",
        _json(lambda m: protocol.decode_evaluate(m, b""), '{"type": "evaluate", "round": null}'),
        f"evaluate request round {RANGE} None",
    ),
    (
        "evaluation-1e400",
        _json(protocol.decode_evaluation, BAD_EVALUATION),
        "evaluation of 'm': confusion must be 10 rows of 10 counts",
    ),
]


@pytest.mark.parametrize(
    ("decode", "message"), [pytest.param(d, m, id=i) for i, d, m in HOSTILE_INPUTS]
)
def test_hostile_inputs_are_wire_errors(decode: Callable[[], Any], message: str) -> None:
    """Each is a valid-looking file or message that its decoder rejects with WireError."""
    with pytest.raises(WireError, match=message) as err:
        decode()
    assert len(str(err.value)) < 400  # never the whole hostile value


def test_worker_answers_nested_metadata_with_an_error_frame(worker: Worker) -> None:
    out = io.BytesIO()
    assert serve(worker, io.BytesIO(frame_with(NESTED, b"")), out, max_payload=8 << 20) == 2
    (meta,) = _replies(out.getvalue())
    assert meta["type"] == "error" and meta["error"] == "WireError"
    assert "nest deeper than 16 levels" in meta["message"]
