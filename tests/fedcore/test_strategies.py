"""Composed strategies against hand-computed numbers: weighting, server optimizers, FedProx, config.

Every expected value below is worked out by hand in the comments (never with torch.optim), on
one-element tensors whose numbers make a wrong formula visible.

Over 400 lines on purpose: one table of hand-worked cases per composed strategy, kept together so
a change in the shared composition shows up beside every strategy it touches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from fedcore.config import parse_config
from fedcore.errors import ConfigError, UpdateRejected
from fedcore.model import Net, initial_weights
from fedcore.protocol import Update
from fedcore.strategies import (
    FedAvg,
    Strategy,
    StrategyConfig,
    StrategyState,
    UnweightedMean,
    build_strategy,
)
from fedcore.strategies.server_optimizer import Yogi
from fedcore.training import TrainMetrics, TrainPlan, batch_indices, train_local


def up(worker: str, value: float, n: int, round: int = 1) -> Update:
    return Update(worker, round, {"w": torch.tensor([value])}, n, TrainMetrics(0.0, n, 1, 0.0))


def strategy(**config: object) -> Strategy:
    return build_strategy(StrategyConfig.model_validate(config))


def step(s: Strategy, rnd: int, x: float, workers: list[tuple[float, int]]) -> float:
    ups = [up(f"w{i}", v, n, rnd) for i, (v, n) in enumerate(workers)]
    return s.aggregate(rnd, {"w": torch.tensor([x])}, ups, [])["w"].item()


# -- weighting ------------------------------------------------------------------------------


def test_fedavg_weights_by_samples_and_the_mean_does_not() -> None:
    # [1.0] from 1 example and [4.0] from 2: (1 + 8) / 3 = 3.0 against (1 + 4) / 2 = 2.5
    workers = [(1.0, 1), (4.0, 2)]
    assert step(FedAvg(), 1, 0.0, workers) == pytest.approx(3.0)
    assert step(UnweightedMean(), 1, 0.0, workers) == pytest.approx(2.5)
    assert step(strategy(name="fedavg"), 1, 0.0, workers) == pytest.approx(3.0)
    assert step(strategy(name="mean"), 1, 0.0, workers) == pytest.approx(2.5)


@pytest.mark.parametrize("name", ["fedavgm", "fedprox", "scaffold"])
@pytest.mark.parametrize(("weighting", "expected"), [("samples", 3.0), ("unweighted", 2.5)])
def test_every_composed_strategy_honours_its_weighting(
    name: str, weighting: str, expected: float
) -> None:
    # Server SGD with lr 1 and no momentum adopts the average: x - 1 * (x - avg) = avg.
    s = strategy(name=name, weighting=weighting, server_lr=1.0, momentum=0.0)
    ups = [up("a", 1.0, 1), up("b", 4.0, 2)]
    if name == "scaffold":
        ups = [dataclasses.replace(u, extras={"control_delta": {"w": torch.zeros(1)}}) for u in ups]
    assert s.aggregate(1, {"w": torch.tensor([0.0])}, ups, [])["w"].item() == pytest.approx(
        expected
    )


# -- server optimizers ----------------------------------------------------------------------


def test_fedavgm_two_rounds_by_hand() -> None:
    s = strategy(name="fedavgm", weighting="samples", server_lr=0.5, momentum=0.5)
    # round 1: x = 2, models 1.0 (1 example) and 0.0 (3): avg 0.25, g = 2 - 0.25 = 1.75,
    # v = 1.75 (torch starts the buffer at g, Hsu et al. at 0: 0.5 * 0 + 1.75), x = 2 - 0.5 * 1.75
    x1 = step(s, 1, 2.0, [(1.0, 1), (0.0, 3)])
    assert x1 == pytest.approx(1.125, abs=1e-7)
    assert s.state_dict().tensors["server/w/momentum_buffer"].item() == pytest.approx(1.75)
    # round 2: models 1.0 (1) and 2.0 (3): avg 7/4 = 1.75, g = 1.125 - 1.75 = -0.625,
    # v = 0.5 * 1.75 - 0.625 = 0.25, x = 1.125 - 0.5 * 0.25 = 1.0
    x2 = step(s, 2, x1, [(1.0, 1), (2.0, 3)])
    assert s.state_dict().tensors["server/w/momentum_buffer"].item() == pytest.approx(0.25)
    assert x2 == pytest.approx(1.0, abs=1e-7)


def test_fedavgm_nesterov_two_rounds_by_hand() -> None:
    s = strategy(name="fedavgm", weighting="samples", server_lr=0.5, momentum=0.5, nesterov=True)
    # round 1: g = 1.75, v = 1.75, step on g + 0.5 v = 2.625: x = 2 - 0.5 * 2.625 = 0.6875
    x1 = step(s, 1, 2.0, [(1.0, 1), (0.0, 3)])
    assert x1 == pytest.approx(0.6875, abs=1e-7)
    # round 2: avg 1.75, g = 0.6875 - 1.75 = -1.0625, v = 0.875 - 1.0625 = -0.1875,
    # step on -1.0625 + 0.5 * -0.1875 = -1.15625: x = 0.6875 + 0.578125 = 1.265625
    x2 = step(s, 2, x1, [(1.0, 1), (2.0, 3)])
    assert s.state_dict().tensors["server/w/momentum_buffer"].item() == pytest.approx(-0.1875)
    assert x2 == pytest.approx(1.265625, abs=1e-7)


ADAPTIVE = {"weighting": "unweighted", "server_lr": 0.1, "tau": 0.1}
BETAS = {"beta1": 0.9, "beta2": 0.99}


def test_fedadam_two_steps_follow_reddi_et_al() -> None:
    s = strategy(name="fedadam", **ADAPTIVE, **BETAS)
    # x = 1, avg 0.5: g = 0.5 (Delta = -0.5). m = 0.1 * 0.5 = 0.05;
    # v = 0.99 * tau^2 + 0.01 * 0.25 = 0.0099 + 0.0025 = 0.0124 (v_{-1} = tau^2);
    # x = 1 - 0.1 * 0.05 / (sqrt(0.0124) + 0.1), no bias correction
    x1 = step(s, 1, 1.0, [(0.5, 1)])
    assert x1 == pytest.approx(1 - 0.1 * 0.05 / (math.sqrt(0.0124) + 0.1), abs=1e-6)
    # g = 0.2: m = 0.9 * 0.05 + 0.1 * 0.2 = 0.065; v = 0.99 * 0.0124 + 0.01 * 0.04 = 0.012676
    x2 = step(s, 2, x1, [(x1 - 0.2, 1)])
    assert x2 == pytest.approx(x1 - 0.1 * 0.065 / (math.sqrt(0.012676) + 0.1), abs=1e-6)


def test_fedadam_with_bias_correction_is_torchs_adam() -> None:
    s = strategy(name="fedadam", bias_correction=True, **ADAPTIVE, **BETAS)
    # m_hat = 0.05 / (1 - 0.9) = 0.5; v_hat = 0.0025 / (1 - 0.99) = 0.25 (v_{-1} = 0);
    # x = 1 - 0.1 * 0.5 / (sqrt(0.25) + 0.1) = 1 - 0.05 / 0.6
    assert step(s, 1, 1.0, [(0.5, 1)]) == pytest.approx(1 - 0.05 / 0.6, abs=1e-6)


def test_fedyogi_two_steps_by_hand() -> None:
    s = strategy(name="fedyogi", **ADAPTIVE, **BETAS)
    # g = 0.5: v = tau^2 - 0.01 * 0.25 * sign(0.01 - 0.25) = 0.01 + 0.0025 = 0.0125 (Adam: 0.0124)
    x1 = step(s, 1, 1.0, [(0.5, 1)])
    assert x1 == pytest.approx(1 - 0.1 * 0.05 / (math.sqrt(0.0125) + 0.1), abs=1e-6)
    # g = 0.05, g^2 = 0.0025 < v: v = 0.0125 - 0.01 * 0.0025 = 0.012475 (shrinks);
    # m = 0.9 * 0.05 + 0.1 * 0.05 = 0.05
    x2 = step(s, 2, x1, [(x1 - 0.05, 1)])
    assert x2 == pytest.approx(x1 - 0.1 * 0.05 / (math.sqrt(0.012475) + 0.1), abs=1e-6)


def test_fedadagrad_two_steps_by_hand() -> None:
    s = strategy(name="fedadagrad", **ADAPTIVE)
    # g = 0.5: v = tau^2 + 0.25 = 0.26; x = 1 - 0.1 * 0.5 / (sqrt(0.26) + 0.1)
    x1 = step(s, 1, 1.0, [(0.5, 1)])
    assert x1 == pytest.approx(1 - 0.1 * 0.5 / (math.sqrt(0.26) + 0.1), abs=1e-6)
    # g = 0.2: v = 0.26 + 0.04 = 0.3
    x2 = step(s, 2, x1, [(x1 - 0.2, 1)])
    assert x2 == pytest.approx(x1 - 0.1 * 0.2 / (math.sqrt(0.3) + 0.1), abs=1e-6)


def test_yogi_refuses_bad_hyperparameters() -> None:
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="lr > 0"):
        Yogi(p, lr=0.0)
    with pytest.raises(ValueError, match=r"betas in \[0, 1\)"):
        Yogi(p, betas=(0.9, 1.0))


def test_non_floating_tensors_take_the_average_untouched() -> None:
    s = strategy(name="fedadam", **ADAPTIVE)
    g = {"w": torch.tensor([1.0]), "count": torch.tensor([3])}
    ups = [
        Update(
            f"w{i}",
            1,
            {"w": torch.tensor([0.5]), "count": torch.tensor([3])},
            1,
            TrainMetrics(0.0, 1, 1, 0.0),
        )
        for i in range(2)
    ]
    out = s.aggregate(1, g, ups, [])
    assert out["count"].dtype == torch.int64 and out["count"].item() == 3
    assert list(out) == ["w", "count"]


def _net_updates(seed: int) -> tuple[dict[str, torch.Tensor], list[Update]]:
    w0 = initial_weights(seed)
    gen = torch.Generator().manual_seed(seed)
    ups = []
    for i, n in enumerate([24754, 17181, 18065]):
        w = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in w0.items()}
        ups.append(Update(f"w{i}", 1, w, n, TrainMetrics(0.0, n, 1, 0.0)))
    return w0, ups


@pytest.mark.parametrize(
    ("weighting", "reference"), [("samples", FedAvg), ("unweighted", UnweightedMean)]
)
def test_fedavgm_without_momentum_at_lr_1_is_fedavg_on_the_real_net(
    weighting: str, reference: type
) -> None:
    s = strategy(name="fedavgm", weighting=weighting, server_lr=1.0, momentum=0.0)
    w0, ups = _net_updates(3)
    expected = reference().aggregate(1, w0, ups, [])
    got = s.aggregate(1, w0, ups, [])
    assert all(torch.allclose(got[k], expected[k], atol=1e-6, rtol=0) for k in w0)
    w1, ups2 = _net_updates(4)  # a second round, from another model: still no memory
    assert all(
        torch.allclose(
            s.aggregate(2, w1, ups2, [])[k],
            reference().aggregate(2, w1, ups2, [])[k],
            atol=1e-6,
            rtol=0,
        )
        for k in w1
    )


# -- state for resume -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"name": "fedavgm", "weighting": "samples", "momentum": 0.7, "nesterov": True},
        {"name": "fedadam", "weighting": "samples"},
        {"name": "fedyogi", "weighting": "unweighted"},
        {"name": "fedadagrad", "weighting": "unweighted"},
        {"name": "fedprox", "weighting": "samples", "momentum": 0.5},
        {"name": "median", "momentum": 0.7},
        {"name": "clipped-mean", "weighting": "samples", "momentum": 0.7},
    ],
)
def test_state_dict_resumes_exactly(config: dict[str, object]) -> None:
    w0, ups = _net_updates(5)
    a = strategy(**config)
    w1 = a.aggregate(1, w0, ups, [])
    state = a.state_dict()
    json.dumps(state.values)  # JSON-able
    assert all(isinstance(t, torch.Tensor) for t in state.tensors.values()) and state.tensors
    b = strategy(**config)
    b.load_state_dict(StrategyState(state.strategy, dict(state.tensors), dict(state.values)))
    _, ups2 = _net_updates(6)
    wa, wb = a.aggregate(2, w1, ups2, []), b.aggregate(2, w1, ups2, [])
    assert all(torch.equal(wa[k], wb[k]) for k in w0)


def test_state_of_another_strategy_is_refused() -> None:
    state = strategy(name="fedadam", weighting="samples").state_dict()
    with pytest.raises(
        ValueError, match="cannot resume strategy 'fedavgm' from state written by 'fedadam'"
    ):
        strategy(name="fedavgm", weighting="samples").load_state_dict(state)
    with pytest.raises(ValueError, match="keeps no state"):
        FedAvg().load_state_dict(StrategyState("fedavg", {"x": torch.zeros(1)}))


def test_unasked_tensor_groups_are_rejected() -> None:
    u = dataclasses.replace(up("alice", 1.0, 1), extras={"control_delta": {"w": torch.zeros(1)}})
    for s in (FedAvg(), strategy(name="fedavgm", weighting="samples")):
        with pytest.raises(UpdateRejected, match=r"unexpected tensor groups \['control_delta'\]"):
            s.aggregate(1, {"w": torch.zeros(1)}, [u], [])


# -- FedProx --------------------------------------------------------------------------------


def _tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1))
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)


def test_fedprox_sends_mu_through_the_plan() -> None:
    s = strategy(name="fedprox", mu=0.01, weighting="samples")
    assert s.plan_overrides() == {"prox_mu": 0.01}
    plan = dataclasses.replace(TrainPlan(), **s.plan_overrides())
    assert plan.prox_mu == 0.01 and TrainPlan.from_dict(plan.to_dict()) == plan


def test_fedprox_term_is_half_mu_squared_distance() -> None:
    """train_local's proximal step against a reference: w -= lr (grad F(w) + mu (w - w_global))."""
    model, x, y = _tiny()
    ref = copy.deepcopy(model)
    plan = TrainPlan(steps=4, batch_size=5, lr=0.5, prox_mu=0.8)
    train_local(model, x, y, plan, torch.Generator().manual_seed(7))
    anchor = [p.detach().clone() for p in ref.parameters()]
    for idx in batch_indices(20, 4, 5, torch.Generator().manual_seed(7)):
        grads = torch.autograd.grad(F.nll_loss(ref(x[idx]), y[idx]), list(ref.parameters()))
        with torch.no_grad():
            for p, g, a in zip(ref.parameters(), grads, anchor, strict=True):
                p -= 0.5 * (g + 0.8 * (p - a))
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    plain, _, _ = _tiny()
    train_local(
        plain, x, y, TrainPlan(steps=4, batch_size=5, lr=0.5), torch.Generator().manual_seed(7)
    )
    assert not torch.allclose(plain[0].weight, model[0].weight, atol=1e-4)  # the term mattered


def test_fedprox_with_mu_zero_is_plain_sgd_bit_for_bit() -> None:
    s = strategy(name="fedprox", mu=0.0, weighting="samples")
    base = TrainPlan(steps=3, batch_size=8, lr=0.1)
    gen = torch.Generator().manual_seed(2)
    images, labels = (
        torch.randn(40, 1, 28, 28, generator=gen),
        torch.randint(0, 10, (40,), generator=gen),
    )
    out = []
    for plan in (base, dataclasses.replace(base, **s.plan_overrides())):
        model = Net()
        model.load_state_dict(initial_weights(1))
        train_local(model, images, labels, plan, torch.Generator().manual_seed(9))
        out.append(model.state_dict())
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])


# -- configuration --------------------------------------------------------------------------

EXAMPLES = [
    {"name": "mean"},
    {"name": "fedavg"},
    {
        "name": "fedavgm",
        "weighting": "unweighted",
        "server_lr": 1.0,
        "momentum": 0.7,
        "nesterov": False,
    },
    {
        "name": "fedadam",
        "weighting": "samples",
        "server_lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
    },
    {
        "name": "fedyogi",
        "weighting": "samples",
        "server_lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
    },
    {"name": "fedadagrad", "weighting": "unweighted", "server_lr": 0.1, "tau": 1e-3},
    {"name": "fedprox", "mu": 0.01, "weighting": "samples"},
    {
        "name": "scaffold",
        "weighting": "unweighted",
        "server_lr": 1.0,
        "momentum": 0.8,
        "nesterov": True,
    },
    {"name": "median", "momentum": 0.5},
    {"name": "trimmed-mean", "beta": 0.25},
    {"name": "clipped-mean", "weighting": "samples", "bound": "median"},
]
WORKERS = [{"name": "alice", "labels": [0, 1, 2, 3]}]


@pytest.mark.parametrize("raw", EXAMPLES, ids=[e["name"] for e in EXAMPLES])
def test_each_example_validates_builds_and_records_its_parameters(raw: dict[str, object]) -> None:
    cfg = parse_config({"workers": WORKERS, "strategy": raw})
    assert cfg.strategy.name == raw["name"]
    assert cfg.model_dump(mode="json")["strategy"]["name"] == raw["name"]
    s = build_strategy(cfg.strategy)
    params = s.params()
    assert s.name == params["name"] == raw["name"]
    for key, value in raw.items():  # every configured value reaches the record
        recorded = params.get(key, params.get(f"server_{key.removeprefix('server_')}"))
        if key == "mu":
            recorded = params["prox_mu"]
        assert recorded == value, (key, params)
    expected_plan = {"fedprox": {"prox_mu": 0.01}, "scaffold": {"scaffold": True}}
    assert s.plan_overrides() == expected_plan.get(str(raw["name"]), {})


def test_default_strategy_is_the_seeds_mean() -> None:
    assert StrategyConfig().name == "mean" and isinstance(
        build_strategy(StrategyConfig()), UnweightedMean
    )
    assert StrategyConfig(name="fedavg").name == "fedavg"
    assert isinstance(build_strategy("fedavg"), FedAvg)


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        (
            {"name": "fedavgm", "weighting": "samples", "momentun": 0.9},
            ["strategy.fedavgm.momentun", "unknown field"],
        ),
        ({"name": "fedavgm", "momentum": 0.9}, ["strategy.fedavgm.weighting", "Field required"]),
        (
            {"name": "fedadam", "weighting": "sample"},
            ["strategy.fedadam.weighting", "'unweighted' or 'samples'"],
        ),
        (
            {"name": "fedavgm", "weighting": "samples", "momentum": 1.0},
            ["strategy.fedavgm.momentum", "less than 1"],
        ),
        (
            {"name": "scaffold", "weighting": "samples", "nesterov": True},
            ["strategy.scaffold", "nesterov: true needs momentum > 0"],
        ),
        (
            {"name": "fedyogi", "weighting": "samples", "tau": 0},
            ["strategy.fedyogi.tau", "greater than 0"],
        ),
        (
            {"name": "fedadagrad", "weighting": "samples", "beta1": 0.9},
            ["strategy.fedadagrad.beta1", "unknown field"],
        ),
        (
            {"name": "fedprox", "weighting": "samples", "mu": -0.1},
            ["strategy.fedprox.mu", "greater than or equal to 0"],
        ),
        ({"name": "mean", "weighting": "samples"}, ["strategy.mean.weighting", "unknown field"]),
        ({"name": "fedsgd"}, ["strategy", "'fedsgd'", "'scaffold'"]),
        ({"weighting": "samples"}, ["strategy", "a strategy needs a name", "fedavgm"]),
    ],
)
def test_bad_strategy_configs_name_the_field(raw: dict[str, object], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"workers": WORKERS, "strategy": raw}, "exp.yaml")
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_unknown_parameter_is_named_by_pydantic_too() -> None:
    with pytest.raises(ValidationError) as err:
        StrategyConfig.model_validate({"name": "fedavgm", "weighting": "samples", "momentun": 0.9})
    assert [e["loc"] for e in err.value.errors()] == [("fedavgm", "momentun")]


def test_bare_names_need_no_parameters() -> None:
    with pytest.raises(ValueError, match="strategy 'fedadam' needs parameters"):
        build_strategy("fedadam")
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        build_strategy("fedsgd")
