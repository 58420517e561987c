"""The strategy interface: how the coordinator turns a round's updates into the next global model.

Modelled on Flower's `Strategy` (adap/flower, `server/strategy/strategy.py`): `aggregate` receives
the round's updates *and* its failures, so a device that dropped out arrives as data, not as a
crash. A strategy may also attach named tensors to each train request (`extras_for`), which is how
drift correction reaches the workers without touching the transport (DESIGN.md decision 8).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..protocol import Update

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Failure:
    """A worker that did not deliver a usable update in a round, and why."""

    worker: str
    round: int
    cause: str  # "unreachable" | "timeout" | "failed" | "rejected"
    message: str


class Strategy(abc.ABC):
    """A small class holding policy; the arithmetic lives in pure functions (aggregate.py)."""

    name: str = "strategy"

    def extras_for(self, worker: str, round: int) -> dict[str, Weights]:
        """Named tensor sets to send with `worker`'s train request (none by default)."""
        return {}

    @abc.abstractmethod
    def aggregate(
        self,
        round: int,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        failures: Sequence[Failure],
    ) -> Weights:
        """The next global weights from this round's valid updates (at least one)."""

    def params(self) -> dict[str, object]:
        """The strategy's parameters, for the training's record."""
        return {"name": self.name}
