"""The strategy interface: how the coordinator turns a round's updates into the next global model.

Modelled on Flower's `Strategy` (adap/flower, `server/strategy/strategy.py`): `aggregate` receives
the round's updates *and* its failures, so a device that dropped out arrives as data, not as a
crash. `aggregate` is a template: it checks every update (`check_update`) before any state changes,
then hands the checked updates to the strategy's `combine`, so no strategy can forget a check or
half-apply a round. A strategy may also attach named tensors to each train request (`extras_for`),
ask for extra tensor groups in each reply (`reply_groups`), and change what the workers do locally
(`plan_overrides`, merged into every round's `TrainPlan`): this is how drift correction reaches the
workers without the transport knowing any strategy. A strategy that keeps state across rounds
(momentum buffers, control variates) hands it out with `state_dict` for a resumed training.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UpdateRejected
from ..model import Weights
from ..protocol import Update

__all__ = ["Failure", "Strategy", "StrategyState", "Weights", "check_state_owner"]


@dataclass(frozen=True)
class Failure:
    """A worker that did not deliver a usable update in a round, and why."""

    worker: str
    round: int
    cause: str  # the failing error's `FedError.cause`: "unreachable", "timeout", "rejected", ...
    message: str


@dataclass(frozen=True)
class StrategyState:
    """What a strategy needs to resume: named tensors (write them as safetensors) and JSON values.

    `strategy` names the strategy that wrote it; loading it into another one is refused.
    """

    strategy: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


class Strategy(abc.ABC):
    """A small class holding policy; the arithmetic lives in pure functions (aggregate.py)."""

    name: str = "strategy"

    def extras_for(self, worker: str, round: int) -> dict[str, Weights]:
        """Named tensor sets to send with `worker`'s train request (none by default)."""
        return {}

    def plan_overrides(self) -> dict[str, Any]:
        """`TrainPlan` fields this strategy sets for every round (e.g. {"prox_mu": 0.01}).

        The flow applies them with `dataclasses.replace(plan, **strategy.plan_overrides())`.
        """
        return {}

    def reply_groups(self) -> frozenset[str]:
        """Tensor groups, besides `weights`, that a reply may carry for this strategy."""
        return frozenset()

    def check_update(self, update: Update, global_weights: Mapping[str, torch.Tensor]) -> None:
        """Refuse an update this strategy cannot use (its weights are checked by the session).

        `aggregate` calls it on every update before changing any state; a caller may call it
        earlier to record a bad update as a `Failure` instead of failing the round.

        Raises:
            UpdateRejected: the reply carries tensor groups this strategy did not ask for.
        """
        unexpected = sorted(set(update.extras) - self.reply_groups())
        if unexpected:
            allowed = sorted(self.reply_groups()) or "none"
            raise UpdateRejected(
                update.worker,
                f"unexpected tensor groups {unexpected} for strategy {self.name!r} "
                f"(allowed besides weights: {allowed})",
            )

    def aggregate(
        self,
        round: int,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        failures: Sequence[Failure],
    ) -> Weights:
        """The next global weights from this round's valid updates (at least one).

        Every update passes `check_update` before `combine` runs, so a rejected round changes
        no state.

        Raises:
            ValueError: no updates, or `combine` refuses them.
            UpdateRejected: an update fails `check_update` (no state is changed then).
        """
        if not updates:
            raise ValueError(f"round {round}: no updates to aggregate")
        for u in updates:
            self.check_update(u, global_weights)
        return self.combine(round, global_weights, updates, failures)

    @abc.abstractmethod
    def combine(
        self,
        round: int,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        failures: Sequence[Failure],
    ) -> Weights:
        """The next global weights from updates that all passed `check_update` (at least one).

        Called by `aggregate`; a strategy that holds another (SCAFFOLD holds FedOpt) calls the
        held one's `combine` directly, its updates being checked already.

        Raises:
            ValueError: the updates cannot be combined (before any state changes).
        """

    def params(self) -> dict[str, object]:
        """Every parameter of the strategy, for the training's record."""
        return {"name": self.name}

    def state_dict(self) -> StrategyState:
        """The state kept across rounds (none by default)."""
        return StrategyState(self.name)

    def load_state_dict(self, state: StrategyState) -> None:
        """Resume from `state_dict()`'s output.

        Raises:
            ValueError: the state was written by another strategy, or does not fit this one.
        """
        check_state_owner(self.name, state)
        if state.tensors or state.values:
            raise ValueError(
                f"strategy {self.name!r} keeps no state, got {len(state.tensors)} tensors "
                f"and values {sorted(state.values)}"
            )


def check_state_owner(name: str, state: StrategyState) -> None:
    """Raise ValueError unless `state` was written by the strategy called `name`."""
    if state.strategy != name:
        raise ValueError(
            f"cannot resume strategy {name!r} from state written by {state.strategy!r}"
        )
