"""SCAFFOLD (option II) by hand, on tiny tensors: the control update, the gradient correction,
the server's control variate over every worker seen, bad control deltas and malformed control
requests refused before any state changes, and the client's record of what the server
acknowledged. The real worker code path on the real Net is tests/fedcore/test_scaffold.py's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fedcore.errors import UpdateRejected, WireError
from fedcore.local_algorithms import ScaffoldClient, control_update, correction, parse_request
from fedcore.protocol import Update
from fedcore.strategies import Failure, Scaffold, StrategyConfig, build_strategy
from fedcore.training import TrainMetrics, TrainPlan, train_local


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_option_ii_control_update_by_hand() -> None:
    c_i, c = {"w": t(0.5, -1.0)}, {"w": t(0.2, 0.0)}
    x, y = {"w": t(1.0, 2.0)}, {"w": t(0.7, 2.6)}
    # c_i+ = c_i - c + (x - y) / (K lr), K = 3, lr = 0.1:
    #   0.5 - 0.2 + 0.3 / 0.3 = 1.3;  -1.0 - 0.0 + (-0.6) / 0.3 = -3.0
    assert torch.allclose(control_update(c_i, c, x, y, 3, 0.1)["w"], t(1.3, -3.0))
    assert torch.allclose(correction(c, c_i)["w"], t(-0.3, 1.0))


def test_gradient_correction_shifts_each_step_by_lr_times_correction() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.LogSoftmax(dim=1))
    images, labels = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    plan = TrainPlan(steps=1, batch_size=4, lr=0.5)
    names = [k for k, _ in model.named_parameters()]
    ref = nn.Sequential(nn.Linear(3, 2), nn.LogSoftmax(dim=1))
    ref.load_state_dict(model.state_dict())
    corr = {k: torch.full_like(p, 0.25) for k, p in model.named_parameters()}
    train_local(ref, images, labels, plan, torch.Generator().manual_seed(1))
    train_local(model, images, labels, plan, torch.Generator().manual_seed(1), grad_correction=corr)
    for k in names:  # one full-batch step: w - lr (g + 0.25) = (w - lr g) - 0.125
        assert torch.allclose(
            dict(model.named_parameters())[k], dict(ref.named_parameters())[k] - 0.125
        )
    initial = dict(ref.state_dict())
    zero = nn.Sequential(nn.Linear(3, 2), nn.LogSoftmax(dim=1))
    zero.load_state_dict(initial)
    again = nn.Sequential(nn.Linear(3, 2), nn.LogSoftmax(dim=1))
    again.load_state_dict(initial)
    zeros = {k: torch.zeros_like(p) for k, p in zero.named_parameters()}
    train_local(zero, images, labels, plan, torch.Generator().manual_seed(1), grad_correction=zeros)
    train_local(again, images, labels, plan, torch.Generator().manual_seed(1))
    assert all(torch.equal(zero.state_dict()[k], again.state_dict()[k]) for k in initial)


def delta_update(worker: str, rnd: int, w: float, delta: list[float] | None, n: int = 1) -> Update:
    extras = {} if delta is None else {"control_delta": {"w": torch.tensor(delta)}}
    return Update(worker, rnd, {"w": t(w, w)}, n, TrainMetrics(0.0, n, 1, 0.0), extras)


def test_server_control_variate_is_the_mean_over_every_worker_seen() -> None:
    s = Scaffold("unweighted")
    g = {"w": t(0.0, 0.0)}
    assert s.plan_overrides() == {"scaffold": True}
    first = s.extras_for("a", 1)
    assert set(first) == {"control_base"} and first["control_base"]["round"].item() == 0  # c = 0
    # round 1: a and b reply, c fails: N = 3, c = (delta_a + delta_b) / 3
    ups = [delta_update("a", 1, 1.0, [0.3, 0.6]), delta_update("b", 1, 3.0, [0.9, -0.3])]
    out = s.aggregate(1, g, ups, [Failure("c", 1, "timeout", "no answer")])
    assert torch.allclose(out["w"], t(2.0, 2.0))
    assert torch.allclose(s.control["w"], t(0.4, 0.1))  # (0.3 + 0.9) / 3, (0.6 - 0.3) / 3
    req = s.extras_for("a", 2)
    assert req["control_base"]["round"].item() == 1 and torch.equal(
        req["control"]["w"], s.control["w"]
    )
    assert s.extras_for("c", 2)["control_base"]["round"].item() == 0
    # round 2: only a; its record sums its deltas: c_a = [0.3, 0.6] + [-0.3, 0.3] = [0, 0.9]
    s.aggregate(2, out, [delta_update("a", 2, 1.0, [-0.3, 0.3])], [])
    assert torch.allclose(s.record("a")["w"], t(0.0, 0.9))
    assert torch.allclose(s.control["w"], t(0.3, 0.2))  # ([0, 0.9] + [0.9, -0.3] + 0) / 3


def test_scaffold_composes_the_same_server_step_as_fedavgm() -> None:
    cfg = {"weighting": "samples", "server_lr": 0.5, "momentum": 0.8, "nesterov": True}
    s = build_strategy(StrategyConfig.model_validate({"name": "scaffold", **cfg}))
    m = build_strategy(StrategyConfig.model_validate({"name": "fedavgm", **cfg}))
    x = {"w": t(2.0, 2.0)}
    for rnd, (a, b) in enumerate([(1.0, 0.0), (3.0, 1.0)], start=1):
        ups = [delta_update("a", rnd, a, [0.0, 0.0], 1), delta_update("b", rnd, b, [0.0, 0.0], 3)]
        xs = s.aggregate(rnd, x, ups, [])
        xm = m.aggregate(rnd, x, [dataclasses.replace(u, extras={}) for u in ups], [])
        assert torch.equal(xs["w"], xm["w"])
        x = xs


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        ({"v": torch.zeros(2)}, "control_delta names differ: missing ['w'], unexpected ['v']"),
        ({"w": torch.zeros(3)}, "control_delta 'w' has shape [3], expected [2]"),
        ({"w": torch.zeros(2, dtype=torch.float64)}, "control_delta 'w' has dtype torch.float64"),
        ({"w": t(0.0, float("nan"))}, "control_delta 'w' has 1 non-finite values"),
    ],
)
def test_bad_control_deltas_are_rejected_before_any_state_changes(
    delta: dict, message: str
) -> None:
    s = Scaffold("unweighted")
    good = delta_update("a", 1, 1.0, [0.1, 0.1])
    bad = Update(
        "b", 1, {"w": t(1.0, 1.0)}, 1, TrainMetrics(0.0, 1, 1, 0.0), {"control_delta": delta}
    )
    with pytest.raises(UpdateRejected) as err:
        s.aggregate(1, {"w": t(0.0, 0.0)}, [good, bad], [])
    assert "'b'" in str(err.value) and message in str(err.value)
    assert s.control is None and s.record("a") is None  # nothing applied


def test_a_reply_without_delta_from_a_worker_with_nothing_to_lose_is_rejected() -> None:
    s = Scaffold("unweighted")
    with pytest.raises(UpdateRejected, match="did its train plan have scaffold: true"):
        s.aggregate(1, {"w": t(0.0, 0.0)}, [delta_update("a", 1, 1.0, None)], [])


SPEC = {"w": ((2,), torch.float32)}


def base(r: int) -> dict[str, torch.Tensor]:
    return {"round": torch.tensor(r, dtype=torch.int64)}


@pytest.mark.parametrize(
    ("extras", "message"),
    [
        (
            {"control_base": base(0), "momentum": {"w": torch.zeros(2)}},
            "unsupported tensor groups in a SCAFFOLD train request: ['momentum']",
        ),
        ({}, "needs exactly one 'control_base/round' tensor"),
        ({"control_base": {"round": torch.tensor(1.0)}}, "control_base/round must be one int64"),
        ({"control_base": base(3)}, "control_base/round 3 must lie in 0..2 in round 3"),
        (
            {"control_base": base(0), "control": {"w": torch.zeros(5)}},
            "train request: control variate 'w' has shape [5], expected [2]",
        ),
    ],
)
def test_malformed_control_requests_are_refused_by_the_worker(extras: dict, message: str) -> None:
    with pytest.raises(WireError) as err:
        parse_request(3, extras, SPEC)
    assert message in str(err.value)


def test_client_keeps_a_delta_only_once_the_server_acknowledges_it() -> None:
    client = ScaffoldClient(SPEC)
    x, y = {"w": t(1.0, 1.0)}, {"w": t(0.5, 1.5)}
    client.begin(1, {"control_base": base(0)})
    # c_i+ = 0 - 0 + (x - y) / (1 * 1.0) = [0.5, -0.5]
    d1 = client.finish(1, x, y, 1, 1.0)["control_delta"]["w"]
    assert torch.allclose(d1, t(0.5, -0.5))
    # The server lost that reply: round 2 still acknowledges 0, so c_i stays 0.
    corr = client.begin(2, {"control_base": base(0), "control": {"w": t(0.1, 0.1)}})
    assert torch.allclose(corr["w"], t(0.1, 0.1)) and client.base == 0
    d2 = client.finish(2, x, y, 1, 1.0)["control_delta"]["w"]  # 0 - 0.1 + [0.5, -0.5]
    assert torch.allclose(d2, t(0.4, -0.6))
    # Round 3 acknowledges round 2: c_i = 0 + d2, and the correction is c - c_i.
    corr = client.begin(3, {"control_base": base(2), "control": {"w": t(0.1, 0.1)}})
    assert client.base == 2 and torch.allclose(client.c_i["w"], t(0.4, -0.6))
    assert torch.allclose(corr["w"], t(0.1 - 0.4, 0.1 + 0.6))
