"""Update compression (fedcore.compression): the arithmetic by hand, the bytes of real frames of
the real model, hostile requests refused by the worker, SCAFFOLD's records kept bit-equal through
a lossy codec, and a real worker process trained with each scheme. The default (`none`) must
leave the seed's frames and weights exactly as they were. Hostile replies (the checks before any
work a frame's claims would cause): test_hostile_compression.py.

One module past 400 lines: the schemes share the real model's frames and one worker fixture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_hostile_wire import NAME

from fedcore import compression, protocol, tensorcodec, wire
from fedcore.compression import ErrorFeedback, decode, encode
from fedcore.config import TrainConfig, load_config
from fedcore.errors import ConfigError, WireError
from fedcore.model import build_model, initial_weights, weight_spec
from fedcore.protocol import TrainRequest, Update
from fedcore.session import WorkerSession
from fedcore.shards import ShardSpec
from fedcore.strategies import Scaffold
from fedcore.training import TrainMetrics, TrainPlan, train_local
from fedcore.transport.base import WorkerLaunch
from fedcore.transport.local import LocalTransport
from fedcore.worker import Worker

ROOT = Path(__file__).resolve().parents[2]
W = initial_weights(1)
SPEC = weight_spec()
MODEL_BYTES = 431_080 * 4
PLAN = TrainPlan(steps=3, batch_size=16, lr=0.1)
SCHEMES = ["fp16", "int8", "topk"]


def plan(scheme: str, fraction: float = 0.01, **fields: Any) -> TrainPlan:
    topk = fraction if scheme == "topk" else 0.0
    return dataclasses.replace(PLAN, compression=scheme, topk_fraction=topk, **fields)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- the arithmetic, by hand ------------------------------------------------------------------


def test_int8_of_a_known_tensor() -> None:
    x = t(0.5, -1.27, 0.0, 0.3, 0.004, 0.006)
    sent, got = encode(compression.I8, {"g": {"x": x}})
    scale = sent["g~scale"]["x"]
    assert scale.dtype == torch.float32 and scale.dim() == 0
    assert float(scale) == pytest.approx(0.01, rel=1e-6)  # max |x| / 127
    assert sent["g"]["x"].dtype == torch.int8
    assert sent["g"]["x"].tolist() == [50, -127, 0, 30, 0, 1]  # round to nearest
    assert torch.equal(got["g"]["x"], sent["g"]["x"].float() * scale)
    # what the receiver decodes is bit-equal to what the sender says it will decode
    assert torch.equal(
        decode(compression.I8, sent, {"x": ((6,), torch.float32)})["g"]["x"], got["g"]["x"]
    )


def test_int8_of_zeros_and_fp16_of_a_third() -> None:
    sent, got = encode(compression.I8, {"g": {"x": torch.zeros(3)}})
    assert float(sent["g~scale"]["x"]) == 0.0 and not got["g"]["x"].any()
    sent, got = encode(compression.F16, {"g": {"x": t(1 / 3, -2.0)}})
    assert sent["g"]["x"].dtype == torch.float16
    assert got["g"]["x"].tolist() == [0.333251953125, -2.0]  # float16's nearest, exactly


def test_fp16_refuses_a_value_beyond_its_range() -> None:
    with pytest.raises(WireError, match=r"g/x as float16: a value of size 7e\+04 exceeds"):
        encode(compression.F16, {"g": {"x": t(1.0, 70000.0)}})


def test_topk_with_error_feedback_over_two_rounds() -> None:
    """Stich et al. 2018: what is not sent is kept and added to the next delta."""
    fb = ErrorFeedback()
    spec = {"x": ((4,), torch.float32)}
    sent, got = encode(compression.TOPK, {"d": {"x": t(1.0, -3.0, 0.5, 2.0)}}, 0.5, fb)
    assert sent["d~index"]["x"].tolist() == [1, 3] and sent["d~index"]["x"].dtype == torch.int32
    assert sent["d~value"]["x"].tolist() == [-3.0, 2.0]
    assert got["d"]["x"].tolist() == [0.0, -3.0, 0.0, 2.0]
    assert fb.norm() == pytest.approx((1.0**2 + 0.5**2) ** 0.5)  # residual (1, 0, 0.5, 0)
    # round 2: v = delta + residual = (1.25, 0, 0.75, -0.5); the two largest are 0 and 2
    sent, got = encode(compression.TOPK, {"d": {"x": t(0.25, 0.0, 0.25, -0.5)}}, 0.5, fb)
    assert sent["d~index"]["x"].tolist() == [0, 2]
    assert sent["d~value"]["x"].tolist() == [1.25, 0.75]
    assert decode(compression.TOPK, sent, spec, 0.5)["d"]["x"].tolist() == [1.25, 0, 0.75, 0]
    assert fb.norm() == pytest.approx(0.5)  # residual (0, 0, 0, -0.5)
    # over both rounds, what was sent plus what is kept is the sum of the deltas: nothing lost
    # (sent: (0, -3, 0, 2) + (1.25, 0, 0.75, 0); kept: (0, 0, 0, -0.5); deltas' sum below)
    assert (t(1.25, -3.0, 0.75, 1.5) == t(1.0, -3.0, 0.5, 2.0) + t(0.25, 0.0, 0.25, -0.5)).all()


def test_int8_error_feedback_sends_what_rounding_dropped() -> None:
    fb = ErrorFeedback()
    # 0.004 is under half a step (0.005): without feedback it would be 0 every round
    totals = torch.zeros(2)
    for _ in range(5):
        _, got = encode(compression.I8, {"d": {"x": t(1.27, 0.004)}}, 0.0, fb)
        totals += got["d"]["x"]
    assert totals[1].item() == pytest.approx(0.02, abs=1e-6)  # 5 x 0.004, sent as 2 x 0.01
    _, plain = encode(compression.I8, {"d": {"x": t(1.27, 0.004)}})
    assert plain["d"]["x"][1].item() == 0.0


def test_topk_count() -> None:
    assert compression.topk_count(431_080 - 400_000, 0.01) == 311  # ceil
    assert compression.topk_count(10, 0.01) == 1  # at least one
    assert compression.topk_count(10, 1.0) == 10 and compression.topk_count(0, 0.5) == 0


# -- real frames of the real model ------------------------------------------------------------


def frame_sizes(scheme: str) -> tuple[int, int]:
    """(request bytes, reply bytes) of a round of the Net under `scheme`, from real frames."""
    p = plan(scheme) if scheme != "none" else PLAN
    request = protocol.encode_train(TrainRequest(1, p, 7, W))
    trained = {
        k: v + 0.001 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
        for k, v in W.items()
    }
    metrics = TrainMetrics(0.5, 48, 3, 0.1)
    if scheme == "none":
        return len(request), len(protocol.encode_update(Update(NAME, 1, trained, 9, metrics)))
    _, up = compression.codecs(scheme)
    sent, _ = encode(up, {"weights": {k: trained[k] - W[k] for k in W}}, p.topk_fraction)
    reply = protocol.encode_update(Update(NAME, 1, trained, 9, metrics), sent)
    return len(request), len(reply)


def test_bytes_per_worker_round_halve_with_fp16_and_quarter_with_int8() -> None:
    down, up = frame_sizes("none")
    assert MODEL_BYTES < down < MODEL_BYTES + 2048 and MODEL_BYTES < up < MODEL_BYTES + 2048
    sizes = {s: frame_sizes(s) for s in SCHEMES}
    assert all(0.49 < d / down < 0.51 and 0.49 < u / up < 0.51 for d, u in [sizes["fp16"]])
    assert all(0.24 < d / down < 0.26 and 0.24 < u / up < 0.26 for d, u in [sizes["int8"]])
    topk_down, topk_up = sizes["topk"]
    assert 0.49 < topk_down / down < 0.51 and topk_up / up < 0.025  # 1% of entries, 8 bytes each


def test_reply_limits_stay_tight_for_each_scheme() -> None:
    header = 8 + tensorcodec.MAX_HEADER
    assert protocol.reply_limit(W, 1) == 2 * MODEL_BYTES + header  # as before
    assert protocol.reply_limit(W, 1, plan("fp16")) == MODEL_BYTES + header
    assert protocol.reply_limit(W, 1, plan("int8")) == 2 * (MODEL_BYTES // 4 + 4 * 8) + header
    k = sum(compression.topk_count(v.numel(), 0.01) for v in W.values())
    assert protocol.reply_limit(W, 0, plan("topk")) == 8 * k + header


def test_the_default_keeps_the_seeds_frames_byte_for_byte() -> None:
    """`none` sends the plan as it was (8 fields, no compression key) and the weights as F32:
    the very bytes protocol 1 sent."""
    assert TrainConfig().plan(1) == PLAN_SEED
    req = TrainRequest(3, PLAN_SEED, 99, W)
    old_meta = {
        "type": "train",
        "round": 3,
        "plan": {
            "steps": 10,
            "batch_size": 32,
            "lr": 0.1,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "label_smoothing": 0.0,
            "prox_mu": 0.0,
            "scaffold": False,
        },
        "sample_seed": 99,
    }
    old = wire.encode_frame(old_meta, tensorcodec.dumps(wire.join_prefixed({"global": W})))
    assert protocol.encode_train(req) == old
    metrics = TrainMetrics(0.5, 320, 10, 0.1)
    u = Update(NAME, 3, W, 9, metrics)
    old_reply = wire.encode_frame(
        {
            "type": "update",
            "worker": NAME,
            "round": 3,
            "num_examples": 9,
            "metrics": {"loss": 0.5, "samples": 320, "steps": 10, "seconds": 0.1},
        },
        tensorcodec.dumps(wire.join_prefixed({"weights": W})),
    )
    assert protocol.encode_update(u) == old_reply
    meta, payload = wire.decode_frame(old_reply)
    back = protocol.decode_update(meta, payload, plan=PLAN_SEED, reference=W)
    assert all(torch.equal(back.weights[k], W[k]) for k in W)  # weights, not a delta


PLAN_SEED = TrainPlan(steps=10, batch_size=32, lr=0.1)


def test_the_config_names_the_scheme_and_the_plan_carries_it() -> None:
    cfg = load_config(ROOT / "configs/best.yaml", {"train.compression.name": "topk"})
    p = cfg.train.plan(2)
    assert (p.compression, p.topk_fraction) == ("topk", 0.01)
    assert TrainPlan.from_dict(p.to_dict()) == p
    assert load_config(ROOT / "configs/seed.yaml").train.plan(1).compression == "none"
    with pytest.raises(ConfigError, match="fraction applies to name: topk only, not int8"):
        load_config(
            ROOT / "configs/seed.yaml", {"train.compression": {"name": "int8", "fraction": 0.1}}
        )
    with pytest.raises(ConfigError, match="train.compression.name"):
        load_config(ROOT / "configs/seed.yaml", {"train.compression.name": "zip"})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"compression": "zip"}, r"unknown compression 'zip', expected one of \['fp16'"),
        ({"compression": 8}, "field 'compression' must be a string of at most 16 characters"),
        ({"compression": "topk"}, r"topk_fraction in \(0, 1\], got 0.0"),
        ({"compression": "topk", "topk_fraction": 1.5}, r"topk_fraction in \(0, 1\], got 1.5"),
        ({"compression": "int8", "topk_fraction": 0.1}, "only topk takes a fraction"),
    ],
)
def test_a_plan_with_a_bad_compression_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(WireError, match=message):
        TrainPlan.from_dict({**PLAN.to_dict(), **fields})


# -- compressed frames, valid and altered (tests/fedcore/test_hostile_compression.py) -------


def compressed_reply(scheme: str, fraction: float = 0.01) -> dict[str, dict[str, torch.Tensor]]:
    """A valid compressed update's tensor groups (the weights' delta only)."""
    _, up = compression.codecs(scheme)
    delta = {k: 0.01 * torch.ones_like(v) for k, v in W.items()}
    return encode(up, {"weights": delta}, fraction)[0]


def changed(groups: dict, key: str, name: str, value: torch.Tensor | None) -> dict:
    out = {g: dict(ts) for g, ts in groups.items()}
    if value is None:
        del out[key][name]
        out = {g: ts for g, ts in out.items() if ts}
    else:
        out.setdefault(key, {})[name] = value
    return out


I8 = compressed_reply("int8")
FC2 = "fc2.bias"  # 10 entries: top-k sends 1


# -- the worker's side ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def charlie(mnist_dir: Path) -> Worker:
    return Worker("charlie", str(mnist_dir), ShardSpec.by_labels([7, 8, 9]), "cpu")


def train_frame(req: TrainRequest, groups: dict | None = None) -> tuple[dict, bytes]:
    meta, payload = wire.decode_frame(protocol.encode_train(req))
    if groups is not None:
        payload = tensorcodec.dumps(wire.join_prefixed(groups))
    return meta, payload


@pytest.mark.parametrize(
    ("scheme", "groups", "message"),
    [
        ("fp16", {"global": W}, "is torch.float32 in a f16 compressed frame"),
        ("int8", {"global": {k: v.half() for k, v in W.items()}}, "in a i8 compressed frame"),
        (
            "int8",
            changed(
                encode(compression.I8, {"global": W})[0], "global~scale", FC2, torch.tensor(1e38)
            ),
            "int8 scale of 'global'/'fc2.bias' is 9.99",
        ),
    ],
)
def test_the_worker_refuses_a_hostile_compressed_request(
    charlie: Worker, scheme: str, groups: dict, message: str
) -> None:
    meta, payload = train_frame(TrainRequest(1, plan(scheme), 7, W), groups)
    with pytest.raises(WireError, match=message):
        charlie.train(meta, payload)


def test_scaffold_records_stay_bit_equal_through_int8(charlie: Worker) -> None:
    """The control delta travels as int8; the worker's c_i moves by what the server decodes,
    so after every round both records are the same bits."""
    worker = Worker.__new__(Worker)
    worker.__dict__.update(charlie.__dict__)
    worker.scaffold = type(charlie.scaffold)(charlie.scaffold.spec)
    worker.feedback = ErrorFeedback()
    s = Scaffold("unweighted")
    x = initial_weights(2)
    p = plan("int8", scaffold=True)
    for rnd in (1, 2, 3):
        req = TrainRequest(rnd, p, 100 + rnd, x, s.extras_for("charlie", rnd))
        meta, payload = train_frame(req)
        rmeta, rpayload = wire.decode_frame(worker.train(meta, payload))
        sent = set(wire.split_prefixed(tensorcodec.loads(rpayload)[0]))
        assert sent == {"weights", "weights~scale", "control_delta", "control_delta~scale"}
        if rnd > 1:  # round r's request acknowledged round r-1's delta: the worker adopted it
            record = s.record("charlie")
            assert record is not None
            assert all(torch.equal(worker.scaffold.c_i[k], record[k]) for k in x)
        u = protocol.decode_update(rmeta, rpayload, plan=p, reference=x, max_groups=2)
        x = s.aggregate(rnd, x, [u], [])
    assert worker.feedback.norm() > 0  # int8 left something for later


# -- a real worker process, each scheme -------------------------------------------------------


@pytest.fixture(scope="module")
def bob(mnist_dir: Path) -> Iterator[WorkerSession]:
    s = WorkerSession(
        WorkerLaunch("bob", str(mnist_dir), ShardSpec.by_labels([4, 5, 6]), threads=1),
        LocalTransport(),
    )
    s.start()
    assert s.hello(timeout=120).protocol == protocol.PROTOCOL_VERSION
    yield s
    s.close()


@pytest.fixture(scope="module")
def bob_shard(mnist_dir: Path) -> Worker:
    """Bob's shard in this process, to compute by hand what the worker process must return."""
    return Worker("bob", str(mnist_dir), ShardSpec.by_labels([4, 5, 6]), "cpu")


def train_here(shard: Worker, start: dict, p: TrainPlan, seed: int) -> dict:
    """`train_local` from `start` with one torch thread, as the worker process (threads=1)."""
    model = build_model(start)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_local(model, shard.images, shard.labels, p, torch.Generator().manual_seed(seed))
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_default_trains_bit_identically_to_train_local(
    bob: WorkerSession, bob_shard: Worker
) -> None:
    u = bob.train(TrainRequest(1, PLAN, 123, W), timeout=60)
    expected = train_here(bob_shard, W, PLAN, 123)
    assert all(torch.equal(u.weights[k], expected[k]) for k in W)
    down = len(protocol.encode_train(TrainRequest(1, PLAN, 123, W)))
    assert u.wire_bytes_down == down and u.wire_bytes - down > MODEL_BYTES


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_worker_process_trains_with_each_scheme(
    bob: WorkerSession, bob_shard: Worker, scheme: str
) -> None:
    """The update is, bit for bit, the global model plus the decoded delta of a training from
    the global model as decoded; and it costs the scheme's share of the bytes."""
    exact = bob.train(TrainRequest(1, PLAN, 123, W), timeout=60)
    p = plan(scheme)
    u = bob.train(TrainRequest(1, p, 123, W), timeout=60)
    assert (u.worker, u.round, u.metrics.samples) == ("bob", 1, 48)
    down, up = compression.codecs(scheme)
    start = encode(down, {"global": W})[1]["global"]
    trained = train_here(bob_shard, start, p, 123)
    delta = encode(up, {"weights": {k: trained[k] - start[k] for k in W}}, p.topk_fraction)[1]
    assert all(torch.equal(u.weights[k], W[k] + delta["weights"][k]) for k in W)
    # the compressed update stays near the uncompressed one (relative to the step taken)
    moved = sum(float((exact.weights[k] - W[k]).norm() ** 2) for k in W) ** 0.5
    error = sum(float((u.weights[k] - exact.weights[k]).norm() ** 2) for k in W) ** 0.5
    assert error < {"fp16": 0.05, "int8": 0.2, "topk": 0.95}[scheme] * moved
    ratio_down = u.wire_bytes_down / exact.wire_bytes_down
    ratio_up = (u.wire_bytes - u.wire_bytes_down) / (exact.wire_bytes - exact.wire_bytes_down)
    assert abs(ratio_down - {"fp16": 0.5, "int8": 0.25, "topk": 0.5}[scheme]) < 0.01
    assert ratio_up < {"fp16": 0.501, "int8": 0.251, "topk": 0.021}[scheme]


def test_a_compressed_scaffold_round_through_the_worker_process(bob: WorkerSession) -> None:
    s = Scaffold("unweighted")
    x = W
    p = plan("fp16", scaffold=True)
    for rnd in (1, 2):
        u = bob.train(TrainRequest(rnd, p, 5 + rnd, x, s.extras_for("bob", rnd)), 60, 1)
        assert set(u.extras) == {"control_delta"}
        s.check_update(u, x)
        x = s.aggregate(rnd, x, [u], [])
    assert s.record("bob") is not None


def test_compression_changes_the_payload_only() -> None:
    """The reply's JSON is the same with or without compression: the plan says how to read it."""
    metrics = TrainMetrics(0.5, 48, 3, 0.1)
    plain, _ = wire.decode_frame(protocol.encode_update(Update(NAME, 1, W, 9, metrics)))
    int8, _ = wire.decode_frame(protocol.encode_update(Update(NAME, 1, W, 9, metrics), I8))
    assert plain == int8
