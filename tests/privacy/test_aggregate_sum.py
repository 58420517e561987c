"""Aggregation from a sum (fedcore.strategies_sum.aggregate_sum): given only the sum of a round's
deltas (and SCAFFOLD's control deltas) and their count, every strategy that secure aggregation
allows makes the same next global model, server state and control variate as from the single
updates, round after round; the strategies that need single updates are refused by name."""

from __future__ import annotations

import pytest
import torch

from fedcore.local_algorithms import CONTROL_DELTA
from fedcore.protocol import Update
from fedcore.strategies import Failure, Scaffold, StrategyConfig, build_strategy
from fedcore.strategies.base import Strategy
from fedcore.strategies_sum import aggregate_sum
from fedcore.training import TrainMetrics

NAMES = ("alice", "bob", "charlie")


def strategy(**config: object) -> Strategy:
    return build_strategy(StrategyConfig.model_validate(config))


def rounds(seed: int, scaffold: bool) -> list[tuple[dict[str, torch.Tensor], list[Update]]]:
    """Three rounds of random updates from a random start; charlie misses round 2."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rnd in (1, 2, 3):
        base = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
        updates = []
        for name in NAMES:
            if rnd == 2 and name == "charlie":
                continue
            weights = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
            extras = (
                {CONTROL_DELTA: {k: torch.randn(v.shape, generator=g) for k, v in base.items()}}
                if scaffold
                else {}
            )
            updates.append(Update(name, rnd, weights, 10, TrainMetrics(0.0, 1, 1, 0.0), extras))
        out.append((base, updates))
    return out


@pytest.mark.parametrize(
    "config",
    [
        {"name": "mean"},
        {"name": "fedavgm", "weighting": "unweighted", "momentum": 0.9},
        {"name": "fedadam", "weighting": "unweighted"},
        {"name": "fedprox", "weighting": "unweighted", "mu": 0.01},
        {"name": "scaffold", "weighting": "unweighted", "momentum": 0.8, "nesterov": True},
    ],
    ids=lambda c: c["name"],
)
def test_a_sum_aggregates_as_the_single_updates(config: dict[str, object]) -> None:
    scaffold = config["name"] == "scaffold"
    plain, secure = strategy(**config), strategy(**config)
    for rnd, (base, updates) in enumerate(rounds(3, scaffold), start=1):
        failures = [Failure("charlie", rnd, "unreachable", "gone")] if len(updates) < 3 else []
        expected = plain.aggregate(rnd, base, updates, failures)
        deltas = {k: sum(u.weights[k].double() - base[k].double() for u in updates) for k in base}
        controls = (
            {k: sum(u.extras[CONTROL_DELTA][k].double() for u in updates) for k in base}
            if scaffold
            else None
        )
        got = aggregate_sum(
            secure,
            rnd,
            base,
            deltas,  # type: ignore[arg-type]
            controls,  # type: ignore[arg-type]
            len(updates),
            [u.worker for u in updates],
            [f.worker for f in failures],
        )
        for k in base:
            assert torch.allclose(got[k], expected[k], atol=1e-6, rtol=0), (rnd, k)
        if isinstance(plain, Scaffold):
            assert isinstance(secure, Scaffold) and plain.control and secure.control
            for k in base:
                assert torch.allclose(secure.control[k], plain.control[k], atol=1e-6), (rnd, k)
            # every device in the sum is acknowledged, so its c_i stays in step next round
            assert secure.extras_for("alice", rnd + 1)["control_base"]["round"].item() == rnd
    # the state a resume reads back holds the control variate and the server's momentum
    again = strategy(**config)
    again.load_state_dict(secure.state_dict())
    assert sorted(again.state_dict().tensors) == sorted(secure.state_dict().tensors)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"name": "median", "weighting": "unweighted"}, "cannot aggregate a sum|robust rule"),
        ({"name": "fedavg"}, "weights updates by samples"),
    ],
)
def test_strategies_that_need_single_updates_are_refused(
    config: dict[str, object], match: str
) -> None:
    base = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=match):
        aggregate_sum(strategy(**config), 1, base, {"w": torch.ones(2)}, None, 2)


def test_the_control_sum_goes_with_scaffold_only() -> None:
    base = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="takes no control deltas"):
        aggregate_sum(strategy(name="mean"), 1, base, base, base, 2)
    with pytest.raises(ValueError, match="needs the sum of the control deltas"):
        aggregate_sum(strategy(name="scaffold", weighting="unweighted"), 1, base, base, None, 2)
