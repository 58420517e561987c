"""Weighting: how much each worker's model counts in the round's average. Always a named choice.

- "unweighted": every valid update counts equally (the seed's mean; Reddi et al. 2021's
  Algorithm 2 averages the sampled clients' deltas this way);
- "samples": in proportion to the examples the worker holds (FedAvg, McMahan et al. 2017): the
  `num_examples` of its update, which `base.check_counts` has held to [1, its shard size] first.

Neither is a default anywhere: a configuration names one, so that no record leaves the reader
guessing which average a training took.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from ..model import Weights
from ..protocol import Update
from .aggregate import weighted_mean

Weighting = Literal["unweighted", "samples"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)


def coefficients(weighting: Weighting, updates: Sequence[Update]) -> list[float]:
    """Each update's (unnormalised) weight under `weighting`.

    Raises:
        ValueError: an unknown weighting.
    """
    if weighting == "unweighted":
        return [1.0] * len(updates)
    if weighting == "samples":
        return [float(u.num_examples) for u in updates]
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")


def coefficient(weighting: Weighting, update: Update) -> float:
    """One update's (unnormalised) weight under `weighting`, as `coefficients` gives it.

    Raises:
        ValueError: an unknown weighting.
    """
    return coefficients(weighting, [update])[0]


def average(weighting: Weighting, updates: Sequence[Update]) -> Weights:
    """The weighted mean of the updates' models.

    Raises:
        ValueError: no updates, or an unknown weighting.
    """
    if not updates:
        raise ValueError("cannot average a round without updates")
    return weighted_mean([u.weights for u in updates], coefficients(weighting, updates))
