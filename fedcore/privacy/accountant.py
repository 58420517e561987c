"""The coordinator's privacy accountant: epsilon per device from DP-SGD's steps, with dp-accounting.

Every device's examples get their own guarantee (example-level DP, per device): a device that ran
`steps` DP-SGD steps with sampling rate q (expected batch / its example count) and noise
multiplier sigma has spent the epsilon of the composition of `steps` Poisson-subsampled Gaussian
mechanisms, at the configured delta. Composition is counted with Renyi DP (Mironov 2017; the
subsampled Gaussian's RDP by Mironov, Talwar, Zhang 2019) by Google's `dp-accounting` package
(`RdpAccountant`, which converts RDP to (epsilon, delta) with the tighter bound of Canonne, Kamath,
Steinke 2020 / Asoodeh et al. 2020). `classic_epsilon` is the older conversion (Mironov 2017,
Prop. 3) that published numbers from 2016-2019 used; the tests check both against them.

Coordinator only: Python 3.11 and `dp-accounting` (imported on first use, so importing this module
never fails; the error says how to install it). Never shipped to a device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

# The orders TensorFlow Privacy's tutorials used; dp-accounting's default list is similar.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
NAME = "dp-accounting RDP (Poisson-subsampled Gaussian)"


def _dp() -> Any:
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError(
            "privacy accounting needs the `dp-accounting` package on the coordinator: "
            "pip install 'dp-accounting>=0.4'"
        ) from None
    return dp_accounting


@dataclass(frozen=True)
class Steps:
    """A run of DP-SGD steps with one sampling rate and noise multiplier (e.g. one round)."""

    steps: int
    sample_rate: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if self.steps < 0 or not 0 < self.sample_rate <= 1 or not self.noise_multiplier >= 0:
            raise ValueError(f"need steps >= 0, 0 < sample_rate <= 1, noise >= 0: {self}")


def _accountant(history: Sequence[Steps], orders: Sequence[float] = ORDERS) -> Any:
    dp = _dp()
    acc = dp.rdp.RdpAccountant(list(orders))
    # Runs with the same rate and noise compose as one run of their summed steps (RDP adds up),
    # so a ledger of R equal rounds costs one RDP evaluation, not R.
    merged: dict[tuple[float, float], int] = {}
    for h in history:
        if h.steps:
            key = (h.sample_rate, h.noise_multiplier)
            merged[key] = merged.get(key, 0) + h.steps
    for (q, sigma), steps in merged.items():
        event = dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma))
        acc.compose(dp.SelfComposedDpEvent(event, steps))
    return acc


def epsilon_of(history: Sequence[Steps], delta: float) -> float:
    """Epsilon at `delta` after every run of steps in `history` (inf without noise)."""
    if any(h.steps and h.noise_multiplier == 0 for h in history):
        return math.inf
    return float(_accountant(history).get_epsilon(delta))


def epsilon(steps: int, sample_rate: float, noise_multiplier: float, delta: float) -> float:
    """Epsilon at `delta` of `steps` DP-SGD steps with sampling rate q and noise multiplier."""
    return epsilon_of([Steps(steps, sample_rate, noise_multiplier)], delta)


def classic_epsilon(steps: int, sample_rate: float, noise_multiplier: float, delta: float) -> float:
    """The same RDP, converted with min over orders of rdp - log(delta) / (order - 1)
    (Mironov 2017, Prop. 3): looser, but what published 2016-2019 values used."""
    acc = _accountant([Steps(steps, sample_rate, noise_multiplier)])
    return min(float(r) - math.log(delta) / (float(a) - 1) for a, r in zip(acc.orders, acc.rdp))


@dataclass
class DeviceLedger:
    """Every device's DP-SGD history and epsilon, kept by the coordinator across rounds.

    Args:
        delta: the delta epsilon is stated at (e.g. 1e-5, below 1 / examples per device).
        target_epsilon: the budget; a device whose epsilon exceeds it is spent.
    """

    delta: float
    target_epsilon: float
    history: dict[str, list[Steps]] = field(default_factory=dict)

    def record(self, device: str, steps: int, sample_rate: float, noise_multiplier: float) -> float:
        """Add a round of `device`'s steps; return its epsilon after it."""
        self.history.setdefault(device, []).append(Steps(steps, sample_rate, noise_multiplier))
        return self.epsilon(device)

    def epsilon(self, device: str) -> float:
        return epsilon_of(self.history.get(device, []), self.delta)

    def would_exceed(self, device: str, steps: int, sample_rate: float, noise: float) -> bool:
        """Whether one more round like this would take `device` past the budget (ask before
        training it, so no device ever ends above its stated epsilon)."""
        after = [*self.history.get(device, []), Steps(steps, sample_rate, noise)]
        return epsilon_of(after, self.delta) > self.target_epsilon

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for resume (the history, not the epsilons: they are recomputed)."""
        return {
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "history": {
                d: [[h.steps, h.sample_rate, h.noise_multiplier] for h in hs]
                for d, hs in self.history.items()
            },
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DeviceLedger:
        history = {
            d: [Steps(int(s), float(q), float(z)) for s, q, z in hs]
            for d, hs in state["history"].items()
        }
        return cls(float(state["delta"]), float(state["target_epsilon"]), history)
