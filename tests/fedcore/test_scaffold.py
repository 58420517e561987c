"""SCAFFOLD (option II): the real worker code path on the real Net (the arithmetic by hand on
tiny tensors is tests/fedcore/test_scaffold_arithmetic.py's).

The worker is `fedcore.worker.Worker` in-process, fed encoded frames exactly as the worker program
reads them; one test goes through a worker subprocess and the session's validation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_scaffold_arithmetic import base

from fedcore import protocol, tensorcodec, wire
from fedcore.errors import WireError
from fedcore.local_algorithms import ScaffoldClient, control_update
from fedcore.model import Net, initial_weights
from fedcore.protocol import TrainRequest, Update
from fedcore.session import WorkerSession
from fedcore.shards import ShardSpec
from fedcore.strategies import Failure, FedAvg, Scaffold, StrategyConfig, build_strategy
from fedcore.training import TrainPlan, train_local
from fedcore.transport.base import WorkerLaunch
from fedcore.transport.local import LocalTransport
from fedcore.worker import Worker

PLAN = TrainPlan(steps=5, batch_size=32, lr=0.05)
SCAFFOLD_PLAN = dataclasses.replace(PLAN, scaffold=True)


# -- the real worker code path on the real Net ----------------------------------------------


@pytest.fixture(scope="module")
def charlie(mnist_dir: Path) -> Worker:
    return Worker("charlie", str(mnist_dir), ShardSpec.by_labels([7, 8, 9]), "cpu")


def call(worker: Worker, req: TrainRequest) -> tuple[Update, set[str]]:
    """Send `req` as the worker program receives it; the decoded update and its tensor groups."""
    meta, payload = wire.decode_frame(protocol.encode_train(req))
    rmeta, rpayload = wire.decode_frame(worker.train(meta, payload))
    groups = set(wire.split_prefixed(tensorcodec.loads(rpayload)[0]))
    return protocol.decode_update(rmeta, rpayload), groups


def fresh(worker: Worker) -> Worker:
    """The same worker as a new process would start: same shard, no control variate."""
    w = Worker.__new__(Worker)
    w.__dict__.update(worker.__dict__)
    w.scaffold = ScaffoldClient(worker.scaffold.spec)
    return w


def request(
    rnd: int, weights: dict, strategy: Scaffold | None, name: str = "charlie"
) -> TrainRequest:
    if strategy is None:
        return TrainRequest(rnd, PLAN, 1000 + rnd, weights)
    return TrainRequest(rnd, SCAFFOLD_PLAN, 1000 + rnd, weights, strategy.extras_for(name, rnd))


def test_first_scaffold_round_is_plain_sgd_and_fedavg(charlie: Worker) -> None:
    w0 = initial_weights(1)
    plain, plain_groups = call(fresh(charlie), request(1, w0, None))
    s = Scaffold("samples")
    scaf, groups = call(fresh(charlie), request(1, w0, s))
    assert plain_groups == {"weights"} and groups == {"weights", "control_delta"}
    assert all(torch.equal(plain.weights[k], scaf.weights[k]) for k in w0)  # c = c_i = 0
    explicit = TrainRequest(
        1,
        SCAFFOLD_PLAN,
        1001,
        w0,
        {"control": {k: torch.zeros_like(v) for k, v in w0.items()}, "control_base": base(0)},
    )
    same, _ = call(fresh(charlie), explicit)
    assert all(torch.equal(plain.weights[k], same.weights[k]) for k in w0)
    # the aggregate of that round is FedAvg's (server SGD lr 1, no momentum)
    s = build_strategy(StrategyConfig.model_validate({"name": "scaffold", "weighting": "samples"}))
    got = s.aggregate(1, w0, [scaf], [])
    expected = FedAvg().aggregate(1, w0, [plain], [])
    assert all(torch.allclose(got[k], expected[k], atol=1e-6, rtol=0) for k in w0)


def test_scaffold_rounds_on_the_real_worker(charlie: Worker) -> None:
    worker = fresh(charlie)
    s = Scaffold("unweighted")
    x = initial_weights(2)
    # round 1: c = c_i = 0, so the delta is (x - y) / (K lr)
    u1, groups = call(worker, request(1, x, s))
    assert groups == {"weights", "control_delta"}
    expected = control_update(
        {k: torch.zeros_like(v) for k, v in x.items()},
        {k: torch.zeros_like(v) for k, v in x.items()},
        x,
        u1.weights,
        PLAN.steps,
        PLAN.lr,
    )
    assert all(torch.allclose(u1.extras["control_delta"][k], expected[k]) for k in x)
    x1 = s.aggregate(
        1, x, [u1], [Failure("alice", 1, "failed", "test"), Failure("bob", 1, "failed", "t")]
    )
    assert all(torch.allclose(s.control[k], u1.extras["control_delta"][k] / 3) for k in x)  # N = 3
    # round 2: the worker steps with c - c_i; its weights equal train_local's with that correction
    req2 = request(2, x1, s)
    u2, groups = call(worker, req2)
    c_i = worker.scaffold.c_i  # round 1's c_i+, adopted when round 2 acknowledged it
    # the server's record of it is the same, bit for bit
    assert all(torch.equal(c_i[k], s.record("charlie")[k]) for k in x)
    ref = Net()
    ref.load_state_dict(x1)
    train_local(
        ref,
        charlie.images,
        charlie.labels,
        SCAFFOLD_PLAN,
        torch.Generator().manual_seed(1002),
        grad_correction={k: s.control[k] - c_i[k] for k in x},
    )
    assert all(torch.equal(u2.weights[k], ref.state_dict()[k]) for k in x)
    # the reply carries the delta, never c_i itself
    assert groups == {"weights", "control_delta"}
    delta = u2.extras["control_delta"]
    assert not any(torch.allclose(delta[k], c_i[k]) for k in x)
    by_hand = {k: -s.control[k] + (x1[k] - u2.weights[k]) / (PLAN.steps * PLAN.lr) for k in x}
    assert all(torch.allclose(delta[k], by_hand[k], atol=1e-5) for k in x)
    x2 = s.aggregate(2, x1, [u2], [])
    assert all(torch.equal(s.record("charlie")[k], c_i[k] + delta[k]) for k in x)

    # A reconnect: a new process holds no c_i. It trains with c_i = 0 and sends weights only.
    before = {k: v.clone() for k, v in s.control.items()}
    new = fresh(charlie)
    req3 = request(3, x2, s)
    assert req3.extras["control_base"]["round"].item() == 2
    u3, groups = call(new, req3)
    assert groups == {"weights"}
    ref = Net()
    ref.load_state_dict(x2)
    gen = torch.Generator().manual_seed(1003)
    train_local(ref, charlie.images, charlie.labels, SCAFFOLD_PLAN, gen, grad_correction=before)
    assert all(torch.equal(u3.weights[k], ref.state_dict()[k]) for k in x)
    x3 = s.aggregate(3, x2, [u3], [])
    # the server drops its record of charlie's c_i: c is the mean of the others' (none: zero)
    assert s.record("charlie") is None and all(not s.control[k].any() for k in x)
    req4 = request(4, x3, s)
    assert req4.extras["control_base"]["round"].item() == 0
    u4, groups = call(new, req4)
    assert groups == {"weights", "control_delta"}  # in step again, from c_i = 0
    s.aggregate(4, x3, [u4], [])
    assert all(torch.equal(s.record("charlie")[k], u4.extras["control_delta"][k]) for k in x)


def test_scaffold_state_resumes_with_a_resynchronising_round(charlie: Worker) -> None:
    cfg = {
        "name": "scaffold",
        "weighting": "unweighted",
        "server_lr": 1.0,
        "momentum": 0.8,
        "nesterov": True,
    }
    a = build_strategy(StrategyConfig.model_validate(cfg))
    assert isinstance(a, Scaffold)
    worker = fresh(charlie)
    x = initial_weights(3)
    u1, _ = call(worker, request(1, x, a))
    x1 = a.aggregate(1, x, [u1], [])
    state = a.state_dict()
    assert {k.split("/")[0] for k in state.tensors} == {"control", "record", "server"}
    assert state.values["bases"] == {"charlie": 1} and state.values["population"] == ["charlie"]
    b = build_strategy(StrategyConfig.model_validate(cfg))
    b.load_state_dict(state)
    assert isinstance(b, Scaffold)
    assert all(torch.equal(b.control[k], a.control[k]) for k in x)
    # Resumed training, new worker process: one round without a delta, then in step again.
    u2, groups = call(fresh(charlie), request(2, x1, b))
    assert groups == {"weights"}
    ua, _ = call(worker, request(2, x1, a))  # the uninterrupted run, for the model's step
    xb = b.aggregate(2, x1, [u2], [])
    assert b.record("charlie") is None
    xa = a.aggregate(2, x1, [dataclasses.replace(u2, extras=ua.extras)], [])
    assert all(torch.equal(xa[k], xb[k]) for k in x)  # same momentum state after the resume


def test_scaffold_with_nesterov_and_label_smoothing_through_a_worker_process(
    mnist_dir: Path,
) -> None:
    session = WorkerSession(
        WorkerLaunch("bob", str(mnist_dir), ShardSpec.by_labels([4, 5, 6]), threads=1),
        LocalTransport(),
    )
    session.start()
    try:
        session.hello(timeout=120)
        s = build_strategy(
            StrategyConfig.model_validate(
                {
                    "name": "scaffold",
                    "weighting": "unweighted",
                    "server_lr": 1.0,
                    "momentum": 0.8,
                    "nesterov": True,
                }
            )
        )
        plan = dataclasses.replace(
            TrainPlan(steps=4, batch_size=32, lr=0.1, label_smoothing=0.1), **s.plan_overrides()
        )
        x = initial_weights(1)
        losses = []
        for rnd in (1, 2, 3):
            u = session.train(TrainRequest(rnd, plan, 7 + rnd, x, s.extras_for("bob", rnd)), 120)
            assert set(u.extras) == {"control_delta"}
            losses.append(u.metrics.loss)
            x = s.aggregate(rnd, x, [u], [])
        assert all(torch.isfinite(v).all() for v in x.values())
        assert s.control is not None and any(v.abs().sum() > 0 for v in s.control.values())
        # label smoothing is in the worker's loss: with it, round 1's loss differs from plain NLL
        plain = session.train(
            TrainRequest(
                1,
                dataclasses.replace(plan, label_smoothing=0.0, scaffold=False),
                8,
                initial_weights(1),
            ),
            120,
        )
        assert abs(plain.metrics.loss - losses[0]) > 1e-3
    finally:
        session.close()


# -- the plan --------------------------------------------------------------------------------


def test_plan_scaffold_flag_is_strict_on_the_wire() -> None:
    assert TrainPlan.from_dict(SCAFFOLD_PLAN.to_dict()) == SCAFFOLD_PLAN
    assert TrainPlan().to_dict()["scaffold"] is False
    for bad, message in [
        ({"scaffold": 1}, "'scaffold' must be true or false, got 1"),
        ({"scaffold": "yes"}, "'scaffold' must be true or false"),
        ({"prox_mu": -0.5}, "finite prox_mu >= 0"),
    ]:
        with pytest.raises(WireError) as err:
            TrainPlan.from_dict(bad)
        assert message in str(err.value)


def test_plain_worker_still_refuses_extras(charlie: Worker) -> None:
    w0 = initial_weights(1)
    req = TrainRequest(1, PLAN, 1, w0, {"control_base": base(0)})
    meta, payload = wire.decode_frame(protocol.encode_train(req))
    with pytest.raises(
        WireError, match=r"unsupported tensor groups in train request: \['control_base'\]"
    ):
        fresh(charlie).train(meta, payload)
