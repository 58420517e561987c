"""Aggregation against hand-computed tensors: weighting must tell FedAvg from the seed's mean, and
the example count that weighting uses cannot be a lie."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from fedcore.errors import UpdateRejected
from fedcore.protocol import Update
from fedcore.strategies import ExpectedCounts, FedAvg, UnweightedMean
from fedcore.strategies.aggregate import weighted_mean
from fedcore.training import TrainMetrics


def _update(worker: str, value: list[float], n: int) -> Update:
    return Update(worker, 1, {"w": torch.tensor(value)}, n, TrainMetrics(0.0, n, 1, 0.0))


def test_fedavg_weights_by_samples_and_mean_does_not() -> None:
    ups = [_update("a", [1.0, -2.0], 1), _update("b", [4.0, 1.0], 2)]
    g = {"w": torch.zeros(2)}
    assert torch.allclose(FedAvg().aggregate(1, g, ups, [])["w"], torch.tensor([3.0, 0.0]))
    assert torch.allclose(UnweightedMean().aggregate(1, g, ups, [])["w"], torch.tensor([2.5, -0.5]))


def test_three_workers_of_seed_sizes() -> None:
    sizes = [24754, 17181, 18065]
    ups = [_update(n, [float(i)], s) for i, (n, s) in enumerate(zip("abc", sizes))]
    fedavg = FedAvg().aggregate(1, {}, ups, [])["w"].item()
    assert abs(fedavg - (0 * 24754 + 1 * 17181 + 2 * 18065) / 60000) < 1e-6
    assert UnweightedMean().aggregate(1, {}, ups, [])["w"].item() == 1.0


def test_weighted_mean_keeps_dtype_and_refuses_bad_coefficients() -> None:
    out = weighted_mean([{"w": torch.tensor([1.0], dtype=torch.float16)}], [2.0])
    assert out["w"].dtype == torch.float16
    for coeffs in ([0.0], [1.0, 2.0]):
        try:
            weighted_mean([{"w": torch.ones(1)}], coeffs)
        except ValueError as exc:
            assert "coefficients" in str(exc)
        else:
            raise AssertionError(f"{coeffs} accepted")


# -- the example count is a weight: lying counts are rejected, never a crash ------------------

EXPECTED = ExpectedCounts(shard_size=20000, steps=10, batch_size=32)


def _liar(n: Any, samples: Any = 320, steps: Any = 10) -> Update:
    """An update whose counts are whatever a device sent (the decoder does not type them)."""
    metrics = TrainMetrics(0.0, samples, steps, 0.0)
    return Update("charlie", 1, {"w": torch.tensor([1e3])}, n, metrics)


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (10**12, "num_examples 1000000000000 is not an int between 1 and the 20000 its hello"),
        (-11999, "num_examples -11999 is not"),
        (-12000, "num_examples -12000 is not"),
        (10**400, "num_examples <an int of 1329 bits> is not"),
        (0, "num_examples 0 is not"),
        (20001, "num_examples 20001 is not"),
        (1.5e4, "num_examples 15000.0 is not an int"),
        (True, "num_examples True is not an int"),
    ],
)
def test_a_lying_count_is_rejected_with_the_reason(n: object, shown: str) -> None:
    with pytest.raises(UpdateRejected, match=re.escape(shown)) as caught:
        FedAvg().check_update(_liar(n), {"w": torch.zeros(1)}, EXPECTED)
    assert caught.value.cause == "rejected" and caught.value.worker == "charlie"
    assert len(str(caught.value)) < 300  # 400 digits are not repeated


@pytest.mark.parametrize("n", [-11999, -12000, 10**400, 2**53 + 1])
def test_aggregate_refuses_a_lying_count_before_any_arithmetic(n: int) -> None:
    """Without the hello's size, `aggregate` still refuses what would steer or crash it (these
    raised ValueError/OverflowError, or moved the model by ~1e5, before the check)."""
    honest = [_update("alice", [1.0], 20000), _update("bob", [2.0], 20000)]
    for strategy in (FedAvg(), UnweightedMean()):
        with pytest.raises(UpdateRejected, match="num_examples"):
            strategy.aggregate(1, {"w": torch.zeros(1)}, [*honest, _liar(n)], [])


def test_counts_within_range_keep_the_same_floats() -> None:
    ups = [_update("a", [1.0, -2.0], 20000), _update("b", [4.0, 1.0], 1)]
    for u in ups:
        FedAvg().check_update(u, {"w": torch.zeros(2)}, ExpectedCounts(20000, 1, 20000))
    got = FedAvg().aggregate(1, {"w": torch.zeros(2)}, ups, [])["w"]
    assert torch.equal(got, weighted_mean([u.weights for u in ups], [20000.0, 1.0])["w"])


def test_metrics_must_fit_the_round_plan() -> None:
    g = {"w": torch.zeros(1)}
    FedAvg().check_update(_liar(20000, samples=320, steps=10), g, EXPECTED)  # exactly the plan
    for samples, steps, shown in (
        (321, 10, "321 samples"),
        (320, 11, "11 steps"),
        (10**400, 10, "<an int of 1329 bits> samples"),
        (-1, 10, "samples -1"),
    ):
        with pytest.raises(UpdateRejected, match=re.escape(shown)):
            FedAvg().check_update(_liar(20000, samples, steps), g, EXPECTED)
