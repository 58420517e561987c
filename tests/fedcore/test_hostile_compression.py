"""Hostile compressed frames (fedcore.compressed_form, fedcore.compression.decode): every malformed
part refused with a WireError naming the tensor, before any work the frame's claims would cause;
flipped bytes of a valid reply raise nothing else; a session drops the connection on one; and a
worker of protocol 1 is never sent a compressed request. The arithmetic and the worker's side are
tests/fedcore/test_compression.py's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_compression import FC2, I8, SCHEMES, SPEC, W, changed, compressed_reply, plan
from test_hostile_wire import HELLO, NAME, Device, assert_dropped_then_reopened

from fedcore import compression, protocol, tensorcodec, wire
from fedcore.compression import decode
from fedcore.errors import WireError, WorkerFailed
from fedcore.protocol import TrainRequest, Update
from fedcore.training import TrainMetrics

TOPK = compressed_reply("topk")
HOSTILE = [
    pytest.param(
        "fp16",
        changed(compressed_reply("fp16"), "weights", FC2, torch.zeros(10)),
        r"'weights'/'fc2.bias' is torch.float32 in a f16 compressed frame \(allowed: float16\)",
        id="f32-in-fp16",
    ),
    pytest.param(
        "fp16",
        changed(compressed_reply("fp16"), "weights", FC2, torch.full((10,), float("inf")).half()),
        "'weights'/'fc2.bias' holds NaN or Inf values",
        id="fp16-inf",
    ),
    pytest.param(
        "int8",
        changed(I8, "weights", FC2, torch.zeros(10, dtype=torch.float16)),
        "is torch.float16 in a i8 compressed frame",
        id="f16-in-int8",
    ),
    pytest.param(
        "int8",
        changed(I8, "weights~scale", FC2, torch.tensor(float("nan"))),
        r"int8 scale of 'weights'/'fc2.bias' is nan",
        id="scale-nan",
    ),
    pytest.param(
        "int8",
        changed(I8, "weights~scale", FC2, torch.tensor(float("inf"))),
        "int8 scale of 'weights'/'fc2.bias' is inf",
        id="scale-inf",
    ),
    pytest.param(
        "int8",
        changed(I8, "weights~scale", FC2, torch.tensor(1e38)),
        r"int8 scale of 'weights'/'fc2.bias' is 9.99\d*e\+37, expected 0..2.6",
        id="scale-huge",
    ),
    pytest.param(
        "int8",
        changed(I8, "weights~scale", FC2, torch.tensor(-0.5)),
        "int8 scale of 'weights'/'fc2.bias' is -0.5",
        id="scale-negative",
    ),
    pytest.param(
        "int8",
        changed(I8, "weights~scale", FC2, torch.ones(2)),
        r"int8 scale 'weights'/'fc2.bias': torch.float32 \[2\], expected one float32 scalar",
        id="scale-not-a-scalar",
    ),
    pytest.param(
        "int8",
        changed(I8, "weights~scale", FC2, None),
        r"int8 group 'weights': scales for .*, values for .*'fc2.bias'",
        id="scale-missing",
    ),
    pytest.param(
        "int8",
        changed(I8, "weights", FC2, torch.full((10,), -128, dtype=torch.int8)),
        "holds -128, outside the scheme's -127..127",
        id="int8-minus-128",
    ),
    pytest.param(
        "int8",
        changed(I8, "weights", FC2, torch.zeros(11, dtype=torch.int8)),
        r"'weights'/'fc2.bias' has shape \[11\], expected \[10\]",
        id="int8-wrong-shape",
    ),
    pytest.param(
        "int8",
        changed(I8, "weights", "fc3.weight", torch.zeros(10, dtype=torch.int8)),
        "'weights'/'fc3.weight' is not one of the model's floating-point tensors",
        id="int8-unknown-name",
    ),
    pytest.param(
        "int8",
        {**I8, "weights~zip": {FC2: torch.zeros(1)}},
        r"tensor group 'weights~zip' is not a part of a i8 compressed group",
        id="unknown-part",
    ),
    pytest.param(
        "int8",
        {**I8, "control_delta": I8["weights"], "control_delta~scale": I8["weights~scale"]},
        r"2 compressed tensor groups, at most 1 expected",
        id="more-groups-than-asked",
    ),
    pytest.param(
        "topk",
        changed(TOPK, "weights~index", FC2, torch.tensor([10], dtype=torch.int32)),
        r"top-k indices of 'weights'/'fc2.bias' leave 0..9: 10..10",
        id="topk-index-past-the-end",
    ),
    pytest.param(
        "topk",
        changed(TOPK, "weights~index", FC2, torch.tensor([-1], dtype=torch.int32)),
        r"leave 0..9: -1..-1",
        id="topk-index-negative",
    ),
    pytest.param(
        "topk",
        changed(
            changed(TOPK, "weights~index", "conv1.bias", torch.tensor([3], dtype=torch.int32)),
            "weights~index",
            "fc2.weight",
            torch.tensor([7] * 50, dtype=torch.int32),
        ),
        "top-k indices of 'weights'/'fc2.weight' must increase strictly",
        id="topk-duplicate-index",
    ),
    pytest.param(
        "topk",
        changed(TOPK, "weights~index", "fc2.weight", torch.arange(49, -1, -1, dtype=torch.int32)),
        "must increase strictly",
        id="topk-unsorted",
    ),
    pytest.param(
        "topk",
        changed(TOPK, "weights~index", FC2, torch.tensor([1, 2], dtype=torch.int32)),
        r"top-k 'weights'/'fc2.bias' index: torch.int32 \[2\], expected torch.int32 \[1\]",
        id="topk-count-not-k",
    ),
    pytest.param(
        "topk",
        changed(TOPK, "weights~index", FC2, torch.tensor([1], dtype=torch.int64)),
        r"index: torch.int64 \[1\], expected torch.int32 \[1\]",
        id="topk-index-int64",
    ),
    pytest.param(
        "topk",
        changed(TOPK, "weights~value", FC2, torch.tensor([float("nan")])),
        "top-k values of 'weights'/'fc2.bias' hold NaN or Inf",
        id="topk-value-nan",
    ),
    pytest.param(
        "topk",
        changed(TOPK, "weights~value", FC2, None),
        "top-k group 'weights': index and value names differ",
        id="topk-value-missing",
    ),
    pytest.param(
        "topk",
        {**TOPK, "weights": {FC2: torch.zeros(10)}},
        "is torch.float32 in a topk compressed frame",
        id="topk-and-dense",
    ),
]


@pytest.mark.parametrize(("scheme", "groups", "message"), HOSTILE)
def test_hostile_compressed_updates_are_wire_errors(
    scheme: str, groups: dict, message: str
) -> None:
    meta, _ = wire.decode_frame(
        protocol.encode_update(Update(NAME, 1, W, 9, TrainMetrics(0.5, 48, 3, 0.1)))
    )
    payload = tensorcodec.dumps(wire.join_prefixed(groups))
    with pytest.raises(WireError, match=message):
        protocol.decode_update(meta, payload, plan=plan(scheme), reference=W)


def test_checks_come_before_any_allocation_the_frame_claims() -> None:
    """A model tensor of 2^40 entries (4 TiB as float32): decoding a top-k frame for it would
    allocate it; every malformed frame is refused before that, which the WireError (not a
    RuntimeError from the allocator) shows."""
    huge = {"x": ((1 << 40,), torch.float32)}
    k = compression.topk_count(1 << 40, 1e-12)
    index = torch.arange(k, dtype=torch.int32)
    good = {"d~index": {"x": index}, "d~value": {"x": torch.ones(k)}}
    bad_index = {"d~index": {"x": index - 1}, "d~value": {"x": torch.ones(k)}}
    with pytest.raises(WireError, match="leave 0"):
        decode(compression.TOPK, bad_index, huge, 1e-12)
    two = {**good, "e~index": good["d~index"], "e~value": good["d~value"]}
    with pytest.raises(WireError, match="2 compressed tensor groups, at most 1"):
        decode(compression.TOPK, two, huge, 1e-12)
    wrong_count = {"d~index": {"x": index[:1]}, "d~value": {"x": torch.ones(1)}}
    with pytest.raises(WireError, match=rf"expected torch.int32 \[{k}\]"):
        decode(compression.TOPK, wrong_count, huge, 1e-12)
    with pytest.raises(RuntimeError):  # the well-formed frame does get decoded: 4 TiB
        decode(compression.TOPK, good, huge, 1e-12)


REPLY_META, _ = wire.decode_frame(
    protocol.encode_update(Update(NAME, 1, W, 9, TrainMetrics(0.5, 48, 3, 0.1)))
)
PAYLOADS = {s: tensorcodec.dumps(wire.join_prefixed(compressed_reply(s))) for s in SCHEMES}


@settings(max_examples=150, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=8),
    near_header=st.booleans(),
)
def test_flipped_bytes_in_a_compressed_reply_raise_only_wire_error(
    scheme: str, flips: list[tuple[int, int]], near_header: bool
) -> None:
    """Any byte of a valid compressed reply changed: a WireError, or an update whose weights
    are finite float32 tensors of the model's shapes (a flipped value is still a value)."""
    data = bytearray(PAYLOADS[scheme])
    span = 4096 if near_header else len(data)  # the header, indices and scales come first
    for pos, xor in flips:
        data[pos % span] ^= xor
    try:
        u = protocol.decode_update(REPLY_META, bytes(data), plan=plan(scheme), reference=W)
    except WireError:
        return
    for k, (shape, dtype) in SPEC.items():
        if k in u.weights:
            assert tuple(u.weights[k].shape) == shape and u.weights[k].dtype == dtype
            assert bool(torch.isfinite(u.weights[k]).all())


def test_a_hostile_compressed_reply_drops_the_connection(tmp_path: Path, mnist_dir: Path) -> None:
    device = Device(tmp_path, mnist_dir)
    try:
        device.queue_replies(protocol.encode_hello(HELLO))
        device.session.hello(timeout=30)
        req = TrainRequest(1, plan("int8", steps=1, batch_size=8), 7, W)
        bad = changed(I8, "weights~scale", FC2, torch.tensor(float("nan")))
        metrics = TrainMetrics(0.5, 8, 1, 0.1)
        device.queue_replies(protocol.encode_update(Update(NAME, 1, W, 1009, metrics), bad))
        with pytest.raises(WorkerFailed, match="sent a bad update: int8 scale of .* is nan"):
            device.session.train(req, timeout=30)
        assert_dropped_then_reopened(device)
        # an uncompressed reply (4x the int8 size) is refused from its prefix
        device.queue_replies(protocol.encode_update(Update(NAME, 1, W, 1009, metrics)))
        limit = protocol.reply_limit(W, 0, req.plan)
        with pytest.raises(WorkerFailed, match=rf"payload announces \d+ bytes, limit {limit}$"):
            device.session.train(req, timeout=30)
        assert_dropped_then_reopened(device)
    finally:
        device.session.kill()


def test_a_worker_of_protocol_1_is_never_sent_a_compressed_request(
    tmp_path: Path, mnist_dir: Path
) -> None:
    device = Device(tmp_path, mnist_dir)
    try:
        device.queue_replies(protocol.encode_hello(dataclasses.replace(HELLO, protocol=1)))
        assert device.session.hello(timeout=30).protocol == 1
        with pytest.raises(WorkerFailed, match="runs worker protocol 1, which cannot decode"):
            device.session.train(TrainRequest(1, plan("fp16"), 7, W), timeout=30)
        assert device.senders() == device.senders()[:1]  # nothing was sent, nothing answered
    finally:
        device.session.kill()
