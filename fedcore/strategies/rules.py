"""Combine rules: how a round's checked models become one model, before any server optimizer.

`FedOpt` (fedopt.py) averages with its weighting unless it holds one of the robust rules below;
a server optimizer, when there is one, then steps on global - combined as it would on the mean.
Every rule works on the models w_i; the median and the trimmed mean are translation invariant,
so they equal global + the same rule over the deltas w_i - global.

- `CoordinateMedian`: Yin, Chen, Ramchandran, Bartlett, 2018, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates" (ICML), the coordinate-wise median: each
  coordinate of the result is the median of that coordinate over the updates (for an even count
  the mean of the two middle values: two updates give their mean, which no rule can do better
  with, one of two being possibly hostile). Unweighted, as in the paper: a count a worker
  reports cannot buy it a larger say.
- `TrimmedMean`: the same paper's coordinate-wise beta-trimmed mean: per coordinate, drop the
  floor(beta n) largest and as many smallest values and average the rest; robust to a beta
  fraction of hostile updates (beta in [0, 1/2)). With n = 3 and beta = 1/3 one value is dropped
  at each end (the median); with n = 2 nothing can be dropped and it is the mean.
- `ClippedMean`: Sun, Kairouz, Suresh, McMahan, 2019, "Can You Really Backdoor Federated
  Learning?" (arXiv:1911.07963), norm difference clipping: each update's delta w_i - global is
  scaled down to norm at most M before the weighted mean, so that no single worker can move the
  model further than M, however far it "boosts" its update. M is a number, or `median`: the
  median of the round's delta norms (a bound derived from the round, as honest distances shrink
  over training; with a majority of honest updates the median is an honest distance). Clipping
  bounds how FAR a hostile update moves the model, not in which DIRECTION: a sign-flipped update
  of honest size passes it unchanged (the median and the trimmed mean drop it).
  With `center: median` the clipping is CENTERED (Karimireddy, He, Jaggi, 2021, "Learning from
  History for Byzantine Robust Optimization", ICML): the deltas are taken from the round's
  coordinate-wise median c instead of the global model, each w_i - c is clipped to M (`median`:
  the median of the ||w_i - c||), and the result is c + the weighted mean of the clipped
  deltas. A flipped update is far from c whatever its norm, so it is pulled back to within an
  honest distance of the honest updates; the honest ones, within M of c, keep their full weight
  (the median alone keeps one honest value per coordinate, this keeps their mean). Without an
  attack and with every delta within M it is exactly the weighted mean.
  `iterations: l` runs the paper's Algorithm 2 for l steps, v_{k+1} = v_k + weighted mean of
  clip(w_i - v_k, M_k), v_0 the center, each step's radius M_k the median of ||w_i - v_k|| (a
  per-step radius tau_k, as in the paper): every step starts from an estimate nearer the honest
  updates than the last, so the flipped or scaled one is clipped from a better point.
  `radius: f` scales every median radius by f (a tighter radius, f < 1, as the paper's analysis
  asks of tau: large enough for the honest spread, no larger): with one hostile update in three,
  the median distance is an honest one, and f < 1 clips the farther honest update too.

Each rule also gives its parameters for the training's record (`params`).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence

import torch

from ..model import Weights
from ..protocol import Update
from .aggregate import (
    clip_to_norm,
    coordinate_median,
    median,
    trim_count,
    trimmed_mean,
    update_norm,
    weighted_mean,
)
from .weighting import Weighting, coefficients

log = logging.getLogger(__name__)

YIN_2018 = "Yin et al. 2018, Byzantine-Robust Distributed Learning (ICML)"
SUN_2019 = "Sun et al. 2019, Can You Really Backdoor Federated Learning? (arXiv:1911.07963)"
KARIMIREDDY_2021 = (
    "Karimireddy et al. 2021, Learning from History for Byzantine Robust Optimization"
)


class CombineRule(abc.ABC):
    """A robust replacement for the weighted mean of a round's models."""

    @abc.abstractmethod
    def combine(
        self,
        weighting: Weighting,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
    ) -> Weights:
        """One model from the round's updates (at least one, all checked)."""

    @abc.abstractmethod
    def params(self) -> dict[str, object]:
        """The rule and its parameters, for the record."""


class CoordinateMedian(CombineRule):
    """Coordinate-wise median (Yin et al. 2018); ignores the weighting (it is "unweighted")."""

    def combine(
        self,
        weighting: Weighting,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
    ) -> Weights:
        return coordinate_median([u.weights for u in updates])

    def params(self) -> dict[str, object]:
        return {"rule": "coordinate-median", "paper": YIN_2018}


class TrimmedMean(CombineRule):
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018).

    Raises:
        ValueError: beta outside [0, 0.5).
    """

    def __init__(self, beta: float) -> None:
        trim_count(1, beta)  # refuses a beta outside [0, 0.5) now, not in round 1
        self.beta = beta

    def combine(
        self,
        weighting: Weighting,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
    ) -> Weights:
        return trimmed_mean([u.weights for u in updates], self.beta)

    def params(self) -> dict[str, object]:
        return {"rule": "coordinate-trimmed-mean", "beta": self.beta, "paper": YIN_2018}


class ClippedMean(CombineRule):
    """Each delta clipped to norm `bound` (a number, or "median": the round's median delta
    norm, times `radius`), then the weighted mean (Sun et al. 2019). The deltas are taken from
    the global model (`center="global"`) or from the round's coordinate-wise median
    (`center="median"`: centered clipping, Karimireddy et al. 2021), for `iterations` steps of
    the paper's Algorithm 2, each from the last step's result.

    Raises:
        ValueError: a bound that is neither "median" nor a number > 0, an unknown center, a
            radius outside (0, 1] or not with the median bound, iterations < 1 or more than one
            step around the global model.
    """

    def __init__(
        self,
        bound: float | str,
        center: str = "global",
        radius: float = 1.0,
        iterations: int = 1,
    ) -> None:
        if bound != "median" and not (isinstance(bound, float | int) and bound > 0):
            raise ValueError(f"clipping bound must be 'median' or a number > 0, got {bound!r}")
        if center not in ("global", "median"):
            raise ValueError(f"clipping center must be 'global' or 'median', got {center!r}")
        if not 0 < radius <= 1:
            raise ValueError(f"clipping radius must be in (0, 1], got {radius!r}")
        if radius != 1 and bound != "median":
            raise ValueError(
                f"clipping radius {radius!r} scales the median bound: set bound: median"
            )
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"clipping iterations must be an integer >= 1, got {iterations!r}")
        if iterations > 1 and center != "median":
            raise ValueError(
                f"clipping iterations {iterations} need center: median (around the global "
                "model a second step would clip the first step's result again, not the updates)"
            )
        self.bound = bound
        self.center = center
        self.radius = float(radius)
        self.iterations = iterations

    def combine(
        self,
        weighting: Weighting,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
    ) -> Weights:
        if self.center == "median":
            center: Mapping[str, torch.Tensor] = coordinate_median([u.weights for u in updates])
        else:
            center = global_weights
        coeffs = coefficients(weighting, updates)
        for step in range(self.iterations):
            norms = [update_norm(u.weights, center) for u in updates]
            if self.bound == "median":
                bound = self.radius * median(norms)
            else:
                bound = float(self.bound)
            clipped = []
            for u, norm in zip(updates, norms, strict=True):
                if norm > bound:
                    log.info(
                        "clipped %s's update from %.4g to %.4g away from the %s%s",
                        u.worker,
                        norm,
                        bound,
                        "round's median" if self.center == "median" else "global model",
                        f" (step {step + 1})" if self.iterations > 1 else "",
                    )
                clipped.append(clip_to_norm(u.weights, center, norm, bound))
            center = weighted_mean(clipped, coeffs)
        return dict(center)

    def params(self) -> dict[str, object]:
        shape: dict[str, object] = {"bound": self.bound}
        if self.radius != 1:
            shape["radius"] = self.radius
        if self.center == "median":
            if self.iterations != 1:
                shape["iterations"] = self.iterations
            return {
                "rule": "centered-clipped-mean",
                **shape,
                "center": "coordinate-median",
                "paper": KARIMIREDDY_2021,
            }
        return {"rule": "norm-clipped-mean", **shape, "paper": SUN_2019}
