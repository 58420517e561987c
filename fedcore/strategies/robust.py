"""Robust strategies: a round's models combined by a rule no single hostile update can steer.

The rules and the papers they come from are in rules.py: the coordinate-wise median and the
beta-trimmed mean of Yin, Chen, Ramchandran, Bartlett, 2018, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates" (ICML), and the norm clipping of Sun, Kairouz,
Suresh, McMahan, 2019, "Can You Really Backdoor Federated Learning?" (arXiv:1911.07963), centered
on the round's median as in Karimireddy, He, Jaggi, 2021 (ICML) when asked. Each is a
`FedOpt` (fedopt.py) holding its rule, so it composes with server SGD like the averaging
strategies do: with the defaults (server_lr 1, momentum 0) the rule's model is adopted as is
(no optimizer at all, so no float rounding), otherwise server SGD steps on global - rule's model
(the robust estimate of the round's pseudo-gradient; sound, as the optimizer sees nothing the
rule let through). Adaptive server optimizers are not offered: their per-coordinate scaling is
tuned to averaged updates and was not measured with these rules.

    {name: median, server_lr, momentum, nesterov}
    {name: trimmed-mean, beta: 1/3, server_lr, momentum, nesterov}
    {name: clipped-mean, weighting, bound: median, center: global, radius: 1, iterations: 1,
     server_lr, momentum, nesterov}

The median and the trimmed mean are unweighted (`weighting: unweighted` is all they accept):
weighting by reported example counts would give back to a lying worker the say the rule takes
away. The clipped mean names its weighting like the averaging strategies; it clips before
weighting. How they fare against a device that scales or flips its update every round:
`benchmarks/robust_accuracy.py`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .base import Strategy
from .fedopt import FedOpt, ServerSGDOptions
from .rules import ClippedMean, CombineRule, CoordinateMedian, TrimmedMean
from .weighting import Weighting


class RobustOptions(ServerSGDOptions):
    """A rule plus the server SGD fields; no optimizer with the defaults (the rule's model)."""

    def rule(self) -> CombineRule:
        raise NotImplementedError(f"{type(self).__name__} names no rule")

    def build(self) -> Strategy:
        plain = self.server_lr == 1.0 and self.momentum == 0.0
        return FedOpt(self.name, self.weighting, None if plain else self.server(), rule=self.rule())


class MedianConfig(RobustOptions):
    """`{name: median, server_lr: 1.0, momentum: 0.0, nesterov: false}`."""

    name: Literal["median"]
    weighting: Literal["unweighted"] = "unweighted"

    def rule(self) -> CombineRule:
        return CoordinateMedian()


class TrimmedMeanConfig(RobustOptions):
    """`{name: trimmed-mean, beta: 1/3, server_lr: 1.0, momentum: 0.0, nesterov: false}`.

    beta is the fraction dropped at EACH end, per coordinate; it must be at least the fraction of
    hostile workers (1/3 drops one of three; 0.2 drops none of three).
    """

    name: Literal["trimmed-mean"]
    weighting: Literal["unweighted"] = "unweighted"
    beta: Annotated[float, Field(ge=0, lt=0.5)] = 1 / 3

    def rule(self) -> CombineRule:
        return TrimmedMean(self.beta)


class ClippedMeanConfig(RobustOptions):
    """`{name: clipped-mean, weighting, bound: median, center: global, radius: 1, iterations: 1,
    server_lr, momentum}`.

    bound: `median` (the round's median distance from the center) or a fixed norm M > 0.
    center: `global` (clip how far each update moves the global model; Sun et al. 2019) or
    `median` (clip how far each update is from the round's coordinate-wise median: centered
    clipping, Karimireddy et al. 2021, which also stops a flipped update of honest size).
    radius: the median bound times this, in (0, 1] (a tighter radius clips the farther honest
    update too). iterations: steps of centered clipping, each from the last one's result with
    the median distance from it as its radius (Karimireddy et al. 2021, Algorithm 2; only with
    `center: median`).
    """

    name: Literal["clipped-mean"]
    weighting: Weighting
    bound: Literal["median"] | Annotated[float, Field(gt=0)] = "median"
    center: Literal["global", "median"] = "global"
    radius: Annotated[float, Field(gt=0, le=1)] = 1.0
    iterations: Annotated[int, Field(ge=1, le=10)] = 1

    @model_validator(mode="after")
    def _radius_and_iterations_fit(self) -> ClippedMeanConfig:
        if self.radius != 1 and self.bound != "median":
            raise ValueError(
                f"radius {self.radius} scales the median bound, not a fixed bound "
                f"{self.bound}: set bound: median, or drop radius"
            )
        if self.iterations > 1 and self.center != "median":
            raise ValueError(
                f"iterations {self.iterations} need center: median (the steps of centered "
                "clipping); around the global model there is one step"
            )
        return self

    def rule(self) -> CombineRule:
        return ClippedMean(self.bound, self.center, self.radius, self.iterations)
