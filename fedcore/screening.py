"""Screening a round's updates before aggregation: drop the ones whose change is far off the rest.

Names, shapes, dtypes and finite values are checked when an update arrives (fedcore.wire); this
step catches an update that is well-formed but implausible: its distance from the round's global
model is more than `factor` times the median distance of the round's updates (a worker that
diverged, was fed bad data, or lies). The median needs at least three updates to mean anything;
with fewer, nothing is dropped on this ground.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .protocol import Update


@dataclass(frozen=True)
class Screened:
    """The updates kept, and (worker, reason) for each one dropped."""

    kept: list[Update]
    dropped: list[tuple[str, str]]
    norms: dict[str, float]


def update_norm(update: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
    """||update - base||_2 over all tensors."""
    total = 0.0
    for k, t in update.items():
        total += float((t.double() - base[k].double()).pow(2).sum())
    return math.sqrt(total)


def screen_updates(
    updates: Sequence[Update], global_weights: Mapping[str, torch.Tensor], factor: float
) -> Screened:
    """Drop updates whose distance from `global_weights` exceeds `factor` x the median distance."""
    norms = {u.worker: update_norm(u.weights, global_weights) for u in updates}
    if len(updates) < 3 or factor <= 0:
        return Screened(list(updates), [], norms)
    ordered = sorted(norms.values())
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    kept, dropped = [], []
    for u in updates:
        if median > 0 and norms[u.worker] > factor * median:
            dropped.append(
                (
                    u.worker,
                    f"update norm {norms[u.worker]:.4g} is {norms[u.worker] / median:.1f}x the "
                    f"round's median {median:.4g} (limit {factor:g}x)",
                )
            )
        else:
            kept.append(u)
    return Screened(kept, dropped, norms)
