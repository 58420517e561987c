"""Norm screening drops an implausible update and nothing else, with 3 updates, 2 and 1."""

from __future__ import annotations

import torch

from fedcore.protocol import Update
from fedcore.screening import HISTORY, ScreeningHistory, screen_updates, update_norm
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
    two = [_u("a", [1.0]), _u("b", [1000.0])]  # no round median of two; a zero model: no norm
    assert len(screen_updates(two, g, 10.0).kept) == 2


# -- the absolute bound: screening works with 2 updates, and 1 ---------------------------------

G = {"w": torch.tensor([0.0, 2.0])}  # norm 2: the first round's reference


def test_first_round_bound_is_factor_times_the_model_norm() -> None:
    two = [_u("alice", [1.0, 2.0]), _u("bob", [1e38, 2.0])]  # distances 1 and 1e38
    s = screen_updates(two, G, 10.0)
    assert [u.worker for u in s.kept] == ["alice"]
    assert (
        s.dropped[0][0] == "bob"
        and "5e+37x the global model's norm 2 (limit 10x)" in (s.dropped[0][1])
    )
    one = [_u("bob", [20.0, 2.0])]  # distance 20 == 10 x 2: kept; 20.01 dropped
    assert len(screen_updates(one, G, 10.0).kept) == 1
    assert not screen_updates([_u("bob", [20.01, 2.0])], G, 10.0).kept
    assert len(screen_updates(two, G, 0.0).kept) == 2  # factor 0: screening off


def test_later_rounds_bound_by_the_recent_accepted_median() -> None:
    history = ScreeningHistory(10.0)
    first = history.screen([_u("a", [1.0, 2.0]), _u("b", [0.0, 3.0]), _u("c", [0.0, 5.0])], G)
    assert first.kept_median == 1.0 and not first.dropped  # distances 1, 1, 3
    history.accept(first)
    assert history.reference == 1.0
    second = history.screen([_u("a", [0.5, 2.0]), _u("b", [10.5, 2.0])], G)  # 0.5 and 10.5
    assert [w for w, _ in second.dropped] == ["b"]
    assert "10.5x the recent rounds' median 1 (limit 10x)" in second.dropped[0][1]
    history.accept(second)  # median 0.5 joins; the reference stays the largest: 1
    history.accept(history.screen([_u("a", [0.0, 2.0])], G))  # median 0: not remembered
    assert history.reference == 1.0
    for _ in range(HISTORY):
        history.accept(history.screen([_u("a", [0.25, 2.0])], G))
    assert history.reference == 0.25  # the last HISTORY rounds only


def test_three_updates_use_both_bounds() -> None:
    ups = [_u("a", [1.0, 2.0]), _u("b", [2.0, 2.0]), _u("c", [9.9, 2.0])]  # 9.9x the median 1..
    assert not screen_updates(ups, G, 10.0, reference=1.0).dropped
    s = screen_updates(ups, G, 10.0, reference=0.5)  # ..but 19.8x the recent median 0.5
    assert [w for w, _ in s.dropped] == ["c"] and "recent rounds' median 0.5" in s.dropped[0][1]
