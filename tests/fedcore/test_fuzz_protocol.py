"""Fuzzing the worker's protocol decoder: random and mutated frames end in a clean rejection.

Hypothesis feeds (a) random bytes and (b) valid frames with bytes flipped, cut or inserted to the
worker's real request loop (`fedcore.worker.serve`, on an in-memory stream). Whatever arrives, the
worker either answers each frame (an answer or an `error` frame) or stops with exit code 2 after
an error frame; it never raises, hangs or executes anything.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore import protocol, tensorcodec, wire
from fedcore.errors import WireError
from fedcore.model import initial_weights
from fedcore.protocol import TrainRequest
from fedcore.shards import ShardSpec
from fedcore.training import TrainPlan
from fedcore.worker import Worker, serve

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
@given(st.binary(max_size=2048))
def test_random_bytes(worker: Worker, data: bytes) -> None:
    _check(worker, data)


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
@given(st.binary(max_size=512))
def test_tensor_decoder_only_raises_wire_error(data: bytes) -> None:
    try:
        tensorcodec.loads(data)
    except WireError:
        pass


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
