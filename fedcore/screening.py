"""Screening a round's updates before aggregation: drop the ones whose change is far off.

Names, shapes, dtypes and finite values are checked when an update arrives (fedcore.wire), the
counts by the strategy (fedcore.strategies.base.check_counts); this step catches an update that is
well-formed but implausible: one that moved the model too far. d_i = ||w_i - w_global||_2 is each
update's distance from the round's global model, `factor` the config's `screening.norm_factor`
(0: no screening). An update is dropped (a `Failure` with cause "rejected", the reason logged)
when either bound says so:

- relative, with 3 or more updates: d_i > factor x the median of the round's d (a worker that
  diverged, was fed bad data, or lies while the others do not). The median of two is their mean,
  which the larger one drags along, so with fewer than 3 this bound is not applied;
- absolute, with any number of updates, 1 and 2 included: d_i > factor x a reference that no
  update of this round can move: the largest accepted median distance of the previous
  `HISTORY` rounds (`ScreeningHistory`, kept by the flow), or, before any round was accepted (the
  first round, and the first after a resume), the norm of the global model itself.

Why these references: an honest round moves the model far less than the model's norm (the seed's
CNN: ||w|| ~ 14, round 1 moves each worker's model ~1.3, round 40 ~0.2), and the distance shrinks
slowly from round to round with the learning rate, so factor 10 over the recent median leaves an
honest update a wide margin while a model of weights 1e38 (which, accepted, makes the next round
non-finite and fails the quorum) is far outside it. Taking the largest of a few rounds' medians,
not the last one alone, keeps one odd round (a lone accepted update of a device that returned the
model unchanged) from shrinking the bound until honest updates are refused. What screening cannot
do: with one of two devices lying, no rule can tell which one is honest; an attacker that stays
inside the bounds is the robust strategies' job (fedcore.strategies.robust).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .protocol import Update
from .strategies.aggregate import median, update_norm

__all__ = ["HISTORY", "Screened", "ScreeningHistory", "median", "screen_updates", "update_norm"]

HISTORY = 3  # rounds whose accepted median distance the absolute bound looks back on


@dataclass(frozen=True)
class Screened:
    """The updates kept, (worker, reason) for each one dropped, every update's distance, and the
    median distance of the kept ones (NaN: none kept)."""

    kept: list[Update]
    dropped: list[tuple[str, str]]
    norms: dict[str, float]
    kept_median: float


def model_norm(weights: Mapping[str, torch.Tensor]) -> float:
    """||weights||_2 over all tensors: the first round's reference distance."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in weights.values()))


def screen_updates(
    updates: Sequence[Update],
    global_weights: Mapping[str, torch.Tensor],
    factor: float,
    reference: float | None = None,
) -> Screened:
    """Drop updates beyond `factor` x the round's median distance (3 or more updates) or beyond
    `factor` x `reference` (any number; None: the norm of `global_weights`). Factor 0: keep all.
    """
    dists = [update_norm(u.weights, global_weights) for u in updates]  # by position: a device
    norms = {u.worker: d for u, d in zip(updates, dists, strict=True)}  # may send two (async)
    if factor <= 0:
        return Screened(list(updates), [], norms, median(dists))
    ref = model_norm(global_weights) if reference is None else reference
    what = "the global model's norm" if reference is None else "the recent rounds' median"
    limits = [(factor * ref, f"{what} {ref:.4g}")] if ref > 0 else []  # 0: nothing to scale
    round_median = median(dists)
    if len(updates) >= 3:
        limits.append((factor * round_median, f"the round's median {round_median:.4g}"))
    kept, dropped, kept_dists = [], [], []
    for u, d in zip(updates, dists, strict=True):
        broken = [(limit, why) for limit, why in limits if d > limit]
        if broken:
            limit, why = min(broken)
            dropped.append(
                (
                    u.worker,
                    f"update norm {d:.4g} (distance from the global model) is "
                    f"{d / (limit / factor):.3g}x {why} (limit {factor:g}x)",
                )
            )
        else:
            kept.append(u)
            kept_dists.append(d)
    return Screened(kept, dropped, norms, median(kept_dists))


class ScreeningHistory:
    """The accepted median distances of the last `HISTORY` rounds: the absolute bound's reference.

    The flow keeps one per training: `screen` a round's updates, and `accept` the result once the
    round has its quorum (a round tried again adds nothing).
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self._medians: deque[float] = deque(maxlen=HISTORY)

    @property
    def reference(self) -> float | None:
        """The largest recent accepted median; None before any round was accepted."""
        return max(self._medians) if self._medians else None

    def screen(
        self, updates: Sequence[Update], global_weights: Mapping[str, torch.Tensor]
    ) -> Screened:
        return screen_updates(updates, global_weights, self.factor, self.reference)

    def accept(self, screened: Screened) -> None:
        """Remember a round's accepted median (a round with no positive median is left out)."""
        if screened.kept_median > 0:
            self._medians.append(screened.kept_median)
