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

The counts an update reports are checked here, in one place (`check_counts`, called by every
`check_update`), because sample weighting makes `num_examples` a weight: unchecked, one device
claiming 10^12 examples makes the global model its own, a negative claim flips and magnifies its
update, and 10^400 overflows the average. What the counts mean:

- `Update.num_examples`: the examples the worker HOLDS (its shard's size, FedAvg's n_k; the worker
  sends `labels.numel()`), not what it trained on this round. Sample weighting uses it. It must be
  an int in [1, shard size], the shard size being the sum of the label counts of the worker's
  hello (the flow passes it in `ExpectedCounts`).
- `TrainMetrics.samples`: the examples it trained on this round, an int in [0, steps x
  batch_size] of the round's plan; `TrainMetrics.steps` is the plan's steps. Only recorded, but
  recorded as MLflow metrics, so bounded too.

Without `ExpectedCounts` (a direct caller of `aggregate`) only what needs no knowledge of the
worker is checked: ints, num_examples in [1, 2^53] (exact in float64, so no weighted mean
overflows), samples >= 0.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UpdateRejected
from ..model import Weights
from ..protocol import Update

if TYPE_CHECKING:  # streaming.py builds on this module
    from .streaming import Accumulator

__all__ = [
    "ExpectedCounts",
    "Failure",
    "Strategy",
    "StrategyState",
    "Weights",
    "check_counts",
    "check_state_owner",
]

MAX_EXAMPLES = 2**53  # the largest count without a shard size to compare: exact in float64


@dataclass(frozen=True)
class ExpectedCounts:
    """What the coordinator knows about one worker's update in one round.

    shard_size: the examples the worker holds, from its hello (None: not known).
    steps, batch_size: the round's plan; the worker trains on at most steps x batch_size.
    """

    shard_size: int | None
    steps: int
    batch_size: int


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

    def check_update(
        self,
        update: Update,
        global_weights: Mapping[str, torch.Tensor],
        expected: ExpectedCounts | None = None,
    ) -> None:
        """Refuse an update this strategy cannot use (its weights are checked by the session).

        `aggregate` calls it on every update before changing any state; a caller may call it
        earlier, with what it expects of the counts, to record a bad update as a `Failure`
        instead of failing the round (the flow does).

        Raises:
            UpdateRejected: counts out of range (`check_counts`), or the reply carries tensor
                groups this strategy did not ask for.
        """
        check_counts(update, expected)
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

    def accumulator(
        self, round: int, global_weights: Mapping[str, torch.Tensor]
    ) -> Accumulator | None:
        """A running aggregate of round `round` that takes updates one at a time as they arrive
        (fedcore.strategies.streaming), or None: this strategy needs all of a round's updates at
        once (the robust rules), so the caller holds them and calls `aggregate`."""
        return None

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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_counts(update: Update, expected: ExpectedCounts | None) -> None:
    """Refuse an update whose counts are not ints in range (see the module's docstring).

    Raises:
        UpdateRejected: naming the count, its value and the range it must be in.
    """
    n = update.num_examples
    known = expected.shard_size if expected is not None else None
    most = MAX_EXAMPLES if known is None else known
    if not _is_int(n) or not 1 <= n <= most:
        where = "2^53 (no shard size known)" if known is None else f"the {known} its hello reported"
        raise UpdateRejected(
            update.worker,
            f"num_examples {_short(n)} is not an int between 1 and {where}: a worker reports "
            "the size of its shard; check the worker program on the device",
        )
    m = update.metrics
    if not _is_int(m.samples) or m.samples < 0 or not _is_int(m.steps):
        raise UpdateRejected(
            update.worker,
            f"metrics samples {_short(m.samples)} / steps {_short(m.steps)} must be "
            "ints, samples >= 0",
        )
    if expected is None:
        return
    budget = expected.steps * expected.batch_size
    if m.steps != expected.steps or m.samples > budget:
        raise UpdateRejected(
            update.worker,
            f"metrics report {_short(m.steps)} steps and {_short(m.samples)} samples; the round's "
            f"plan was {expected.steps} steps of at most {expected.batch_size} "
            f"(<= {budget} samples)",
        )


def _short(value: object) -> str:
    """`value` for a message, cut to 40 characters (a lying count may have 400 digits)."""
    if isinstance(value, int) and abs(value) > 10**30:
        return f"{'-' if value < 0 else ''}<an int of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def check_state_owner(name: str, state: StrategyState) -> None:
    """Raise ValueError unless `state` was written by the strategy called `name`."""
    if state.strategy != name:
        raise ValueError(
            f"cannot resume strategy {name!r} from state written by {state.strategy!r}"
        )
