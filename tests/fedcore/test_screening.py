"""Norm screening drops an implausible update and nothing else."""

from __future__ import annotations

import torch

from fedcore.protocol import Update
from fedcore.screening import screen_updates, update_norm
from fedcore.training import TrainMetrics


def _u(worker: str, values: list[float]) -> Update:
    return Update(worker, 1, {"w": torch.tensor(values)}, 1, TrainMetrics(0, 1, 1, 0))


def test_norm_is_euclidean_distance() -> None:
    assert update_norm({"w": torch.tensor([3.0, 4.0])}, {"w": torch.zeros(2)}) == 5.0


def test_outlier_beyond_factor_is_dropped_with_reason() -> None:
    g = {"w": torch.zeros(2)}
    ups = [_u("alice", [3.0, 4.0]), _u("bob", [0.0, 6.0]), _u("charlie", [60.0, 80.0])]
    s = screen_updates(ups, g, factor=10.0)  # norms 5, 6, 100; median 6; limit 60
    assert [u.worker for u in s.kept] == ["alice", "bob"]
    assert s.dropped[0][0] == "charlie" and "16.7x the round's median 6" in s.dropped[0][1]


def test_boundary_and_small_rounds_keep_everything() -> None:
    g = {"w": torch.zeros(1)}
    at_limit = [_u("a", [1.0]), _u("b", [2.0]), _u("c", [20.0])]  # median 2, 20 == 10x: kept
    assert len(screen_updates(at_limit, g, 10.0).kept) == 3
    above = [_u("a", [1.0]), _u("b", [2.0]), _u("c", [20.001])]
    assert [w for w, _ in screen_updates(above, g, 10.0).dropped] == ["c"]
    two = [_u("a", [1.0]), _u("b", [1000.0])]  # no median of two: nothing dropped
    assert len(screen_updates(two, g, 10.0).kept) == 2
