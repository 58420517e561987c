"""The round's global model encoded once for all its trainers (fedcore.protocol.encode_train).

Every frame is byte for byte the frame encoded afresh (today's encoder, written out here),
for every compression scheme and with SCAFFOLD's per-worker extras; a payload is reused only
for the same tensor objects unmodified since: an in-place change, a new model of equal values
or another codec gets its own bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fedcore import compression, protocol, tensorcodec, wire
from fedcore.local_algorithms import CONTROL, CONTROL_BASE
from fedcore.model import initial_weights
from fedcore.protocol import TrainRequest
from fedcore.training import TrainPlan


def fresh_frame(req: TrainRequest) -> bytes:
    """The train frame as encode_train made it before the cache (protocol 1's bytes)."""
    groups: dict[str, Mapping[str, torch.Tensor]] = {"global": req.weights, **req.extras}
    down, _ = compression.codecs(req.plan.compression)
    if down != compression.F32:
        groups = dict(compression.encode(down, groups)[0])
    meta = {
        "type": "train",
        "round": req.round,
        "plan": req.plan.to_dict(),
        "sample_seed": req.sample_seed,
    }
    return wire.encode_frame(meta, tensorcodec.dumps(wire.join_prefixed(groups)))


def requests(weights: dict[str, torch.Tensor], plan: TrainPlan, n: int = 5) -> list[TrainRequest]:
    return [TrainRequest(3, plan, 1000 + i, weights, {}) for i in range(n)]


@pytest.mark.parametrize("scheme", ["none", "fp16", "int8", "topk"])
def test_every_workers_frame_is_byte_identical_to_a_fresh_encoding(scheme: str) -> None:
    weights = initial_weights(1)
    plan = TrainPlan(steps=2, batch_size=32, lr=0.1, compression=scheme)
    if scheme == "topk":
        plan = dataclasses.replace(plan, topk_fraction=0.1)
    reqs = requests(weights, plan)
    with ThreadPoolExecutor(5) as pool:  # a round's request threads, all at once
        frames = list(pool.map(protocol.encode_train, reqs))
    for req, frame in zip(reqs, frames, strict=True):
        assert frame == fresh_frame(req)
        meta, payload = wire.decode_frame(frame)
        assert protocol.decode_train(meta, payload).sample_seed == req.sample_seed
    payloads = {wire.decode_frame(f)[1] for f in frames}
    assert len(payloads) == 1  # one model, one payload; only the seeds differ


def test_a_changed_model_is_encoded_again() -> None:
    weights = initial_weights(1)
    plan = TrainPlan(steps=2, batch_size=32, lr=0.1)
    first = protocol.encode_train(requests(weights, plan, 1)[0])
    weights["fc2.bias"].add_(1.0)  # in place: the same tensor object, a new version
    again = requests(weights, plan, 1)[0]
    assert protocol.encode_train(again) == fresh_frame(again) != first
    copied = {k: t.clone() for k, t in weights.items()}  # equal values, other tensors
    assert protocol.encode_train(requests(copied, plan, 1)[0]) == protocol.encode_train(again)
    half = requests(weights, dataclasses.replace(plan, compression="fp16"), 1)[0]
    assert protocol.encode_train(half) == fresh_frame(half)


def test_scaffold_requests_with_per_worker_extras_are_byte_identical() -> None:
    weights = initial_weights(1)
    plan = TrainPlan(steps=2, batch_size=32, lr=0.1, scaffold=True)
    c = {k: torch.full_like(t, 0.01) for k, t in weights.items() if t.is_floating_point()}
    reqs = [
        TrainRequest(2, plan, i, weights, {CONTROL_BASE: {"round": torch.tensor(i)}, CONTROL: c})
        for i in range(3)
    ]
    for req in reqs + reqs[::-1]:
        assert protocol.encode_train(req) == fresh_frame(req)
