"""Running-sum aggregation (fedcore.strategies.streaming) against the held path's `combine`.

By hand on one-number models first, then on the real Net: every averaging strategy and
SCAFFOLD, fed the same updates in another order, give the held path's next model within float
rounding (the plain averages within one float32 ulp of each tensor's scale, a server
optimizer's step within four: it turns one ulp of the average into a few of a small weight;
equal on the hand-checkable numbers), and the same state afterwards; a refused
update folds nothing; a round never finished changes no state; the robust rules do not stream.
"""

from __future__ import annotations

import pytest
import torch

from fedcore.errors import UpdateRejected
from fedcore.local_algorithms import CONTROL_DELTA
from fedcore.model import initial_weights
from fedcore.protocol import Update
from fedcore.strategies import ExpectedCounts, Failure, Strategy, StrategyConfig, build_strategy
from fedcore.strategies.streaming import RunningSum
from fedcore.training import TrainMetrics

AVERAGING = [
    {"name": "mean"},
    {"name": "fedavg"},
    {"name": "fedavgm", "weighting": "samples", "momentum": 0.9},
    {"name": "fedprox", "weighting": "unweighted", "mu": 0.01},
    {"name": "fedadam", "weighting": "samples"},
    {"name": "fedyogi", "weighting": "unweighted"},
    {"name": "fedadagrad", "weighting": "samples"},
]


def strategy(**config: object) -> Strategy:
    return build_strategy(StrategyConfig.model_validate(config))


def up(worker: str, w: dict[str, torch.Tensor], n: int, rnd: int = 1, **extras: dict) -> Update:
    return Update(worker, rnd, w, n, TrainMetrics(0.0, n, 1, 0.0), dict(extras))


def streamed(s: Strategy, rnd: int, glob: dict, updates: list[Update], order: list[str]) -> dict:
    acc = s.accumulator(rnd, glob)
    assert acc is not None
    for u in updates:
        acc.add(u)
    return acc.finish([], order)


def test_running_sum_by_hand() -> None:
    acc = RunningSum()
    acc.add({"w": torch.tensor([1.0, 2.0])}, 1)
    acc.add({"w": torch.tensor([3.0, 4.0])}, 3)
    # (1 x 1 + 3 x 3) / 4 = 2.5 and (1 x 2 + 3 x 4) / 4 = 3.5
    assert acc.mean()["w"].tolist() == [2.5, 3.5]
    assert acc.mean()["w"].dtype == torch.float32
    assert (acc.count, acc.total) == (2, 4.0)
    with pytest.raises(ValueError, match="positive"):
        acc.add({"w": torch.tensor([0.0, 0.0])}, 0)
    with pytest.raises(ValueError, match="differing"):
        acc.add({"v": torch.tensor([0.0, 0.0])}, 1)
    with pytest.raises(ValueError, match="without models"):
        RunningSum().mean()


def test_fedavg_and_mean_stream_the_hand_checked_numbers() -> None:
    glob = {"w": torch.tensor([0.0])}
    ups = [up("a", {"w": torch.tensor([1.0])}, 1), up("b", {"w": torch.tensor([4.0])}, 3)]
    # fedavg: (1 x 1 + 3 x 4) / 4 = 3.25; mean: (1 + 4) / 2 = 2.5; arrival order is irrelevant
    assert streamed(strategy(name="fedavg"), 1, glob, ups[::-1], ["a", "b"])["w"].item() == 3.25
    assert streamed(strategy(name="mean"), 1, glob, ups, ["a", "b"])["w"].item() == 2.5
    held = strategy(name="fedavg").aggregate(1, glob, ups, [])
    assert held["w"].item() == 3.25


def test_fedavgm_two_rounds_streamed_by_hand() -> None:
    s = strategy(name="fedavgm", weighting="unweighted", momentum=0.5)
    x = {"w": torch.tensor([1.0])}
    # round 1: average 0.5, pseudo-gradient 0.5, buffer 0.5, x = 1 - 0.5 = 0.5
    x = streamed(s, 1, x, [up("a", {"w": torch.tensor([0.0])}, 1), up("b", x, 1)], ["a", "b"])
    assert x["w"].item() == 0.5
    # round 2: average 0.25, gradient 0.25, buffer 0.5 x 0.5 + 0.25 = 0.5, x = 0.5 - 0.5 = 0
    ups = [up("a", {"w": torch.tensor([0.0])}, 1, 2), up("b", {"w": torch.tensor([0.5])}, 1, 2)]
    assert streamed(s, 2, x, ups, ["a", "b"])["w"].item() == 0.0


def _net_round(seed: int, n: int) -> tuple[dict[str, torch.Tensor], list[Update]]:
    w0 = initial_weights(seed)
    gen = torch.Generator().manual_seed(seed)
    ups = []
    for i in range(n):
        w = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in w0.items()}
        ups.append(up(f"w{i:02d}", w, 1000 + 37 * i))
    return w0, ups


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference between `a` and `b` in float32 ulps of the tensor's largest value
    (a server optimizer's step turns one ulp of the average into a few of a weight near zero)."""
    scale = float(a.abs().max())
    ulp = float(torch.nextafter(torch.tensor(scale), torch.tensor(float("inf"))) - scale)
    return float((a.double() - b.double()).abs().max()) / ulp


@pytest.mark.parametrize("config", AVERAGING, ids=lambda c: str(c["name"]))
def test_streamed_equals_held_on_the_real_net_over_two_rounds(config: dict[str, object]) -> None:
    held, streaming = strategy(**config), strategy(**config)
    plain = config["name"] in ("mean", "fedavg")  # the average itself: one rounding apart
    x_held = x_stream = initial_weights(1)
    for rnd in (1, 2):
        _, ups = _net_round(rnd, 10)
        order = [u.worker for u in ups]
        x_held = held.aggregate(rnd, x_held, ups, [])
        shuffled = [
            ups[i] for i in torch.randperm(10, generator=torch.Generator().manual_seed(rnd))
        ]
        x_stream = streamed(streaming, rnd, x_stream, shuffled, order)
        worst = max(_ulps(x_held[k], x_stream[k]) for k in x_held)
        assert worst <= (1 if plain else 4), f"round {rnd}: {worst} ulps apart"
        x_stream = x_held  # the next round from the same model: each round's error alone
    a, b = held.state_dict(), streaming.state_dict()
    assert sorted(a.tensors) == sorted(b.tensors) and a.values == b.values
    for k, t in a.tensors.items():  # momentum, moments: as close as the steps they took
        assert torch.allclose(t, b.tensors[k], rtol=1e-5, atol=1e-9), k


def test_scaffold_streamed_equals_held_records_and_control() -> None:
    held, streaming = (
        strategy(name="scaffold", weighting="unweighted"),
        strategy(name="scaffold", weighting="unweighted"),
    )
    w0, ups = _net_round(3, 6)
    gen = torch.Generator().manual_seed(9)
    params = {k: v for k, v in w0.items() if v.is_floating_point()}
    ups = [
        up(
            u.worker,
            u.weights,
            u.num_examples,
            1,
            **{CONTROL_DELTA: {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}},
        )
        for u in ups
    ]
    order = [u.worker for u in ups]
    failures = [Failure("late", 1, "timeout", "no answer")]
    x_held = held.aggregate(1, w0, ups, failures)
    acc = streaming.accumulator(1, w0)
    assert acc is not None
    for u in reversed(ups):
        acc.add(u)
    x_stream = acc.finish(failures, order)
    assert max(_ulps(x_held[k], x_stream[k]) for k in x_held) <= 1
    a, b = held.state_dict(), streaming.state_dict()
    assert a.values == b.values  # bases and population, "late" included
    assert list(a.tensors) == list(b.tensors)  # records applied in the trainers' order
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_a_refused_update_folds_nothing_and_an_unfinished_round_changes_nothing() -> None:
    s = strategy(name="fedavgm", weighting="samples", momentum=0.9)
    glob = {"w": torch.tensor([1.0])}
    before = s.state_dict()
    acc = s.accumulator(1, glob)
    assert acc is not None
    acc.add(up("a", {"w": torch.tensor([2.0])}, 10), ExpectedCounts(10, 1, 10))
    with pytest.raises(UpdateRejected, match="num_examples 11"):
        acc.add(up("b", {"w": torch.tensor([1e6])}, 11), ExpectedCounts(10, 1, 10))
    with pytest.raises(UpdateRejected, match="unexpected tensor groups"):
        acc.add(up("c", {"w": torch.tensor([1e6])}, 5, extra={"x": torch.ones(1)}))
    with pytest.raises(ValueError, match="second update from 'a'"):
        acc.add(up("a", {"w": torch.tensor([1e6])}, 10))
    assert acc.workers == ["a"]
    assert s.state_dict() == before  # nothing changes until finish
    # server SGD lr 1, momentum 0.9, first step: x - (x - 2) = 2: only a's model counted
    assert acc.finish([])["w"].item() == 2.0


def test_scaffold_without_a_delta_from_an_unknown_worker_is_refused_before_folding() -> None:
    s = strategy(name="scaffold", weighting="unweighted")
    acc = s.accumulator(1, {"w": torch.tensor([1.0])})
    assert acc is not None
    with pytest.raises(UpdateRejected, match="no control_delta"):
        acc.add(up("a", {"w": torch.tensor([0.0])}, 1))
    assert acc.count == 0
    with pytest.raises(ValueError, match="no updates"):
        acc.finish([])


@pytest.mark.parametrize(
    "config",
    [
        {"name": "median"},
        {"name": "trimmed-mean"},
        {"name": "clipped-mean", "weighting": "samples"},
    ],
    ids=lambda c: str(c["name"]),
)
def test_robust_rules_need_every_update_and_do_not_stream(config: dict[str, object]) -> None:
    assert strategy(**config).accumulator(1, initial_weights(1)) is None
