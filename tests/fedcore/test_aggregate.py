"""Aggregation against hand-computed tensors: weighting must tell FedAvg from the seed's mean."""

from __future__ import annotations

import torch

from fedcore.protocol import Update
from fedcore.strategies import FedAvg, UnweightedMean
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
