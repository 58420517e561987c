"""Running-sum aggregation: a round's updates folded into the aggregate as they arrive.

Holding every update until the round ends costs one model (1.7 MB for the seed's CNN, twice
that with SCAFFOLD's control delta) per worker, so a coordinator's memory grows with its fleet.
An averaging strategy needs only sum_i c_i w_i and sum_i c_i: `RunningSum` keeps those two
(float64, one model's worth), and a strategy's `Accumulator` checks each update
(`Strategy.check_update`, counts included) and folds it in as it arrives, after which the
caller lets the update's tensors go. `finish` then does what `combine` does after averaging
(the server optimizer's step; SCAFFOLD's control variates), so the strategy's state changes
only when the round completes: a round below its quorum folds into an accumulator that is
dropped, and changes nothing, as with `aggregate`.

Which strategies stream (`Strategy.accumulator` returns one): every FedOpt averaging
configuration (mean, fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad) and SCAFFOLD. The
robust rules (median, trimmed mean, clipped mean) need every update of the round at once (a
coordinate's median, a norm relative to the round's median): they return None and are
aggregated as before. So does anything else that needs the single updates (screening, scoring
each worker's model): the flow decides (flows/rounds.py, `streams`).

Numbers: each update is added as c_i w_i in float64 and the sum divided by sum_i c_i once at
the end, where `aggregate.weighted_mean` adds (c_i / sum c) w_i. Both round in float64 and cast
the result to float32, so they agree to float32 rounding (a test holds them within one float32
ulp, and equal on hand-checkable numbers). The weights are integers (`unweighted`: 1,
`samples`: an example count), so each product c_i w_i of a float32 weight is exact in float64;
the order in which updates arrive can move the float64 sum by its last bit only where a
coordinate's values differ in magnitude by far more than their spread across workers usually
does, and the float32 result only when that bit decides its rounding.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping, Sequence

import torch

from ..model import Weights
from ..protocol import Update
from .base import ExpectedCounts, Failure

__all__ = ["Accumulator", "RunningSum"]


class RunningSum:
    """sum_i c_i w_i (float64, tensor by tensor) and sum_i c_i, one model at a time."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] | None = None
        self._dtypes: dict[str, torch.dtype] = {}
        self.total = 0.0
        self.count = 0

    def add(self, model: Mapping[str, torch.Tensor], coefficient: float) -> None:
        """Fold c w in. The first model fixes the names; `model` may be dropped afterwards.

        Raises:
            ValueError: a coefficient that is not positive, or names that differ from the
                first model's (before anything is added).
        """
        if not coefficient > 0:
            raise ValueError(f"a weight must be positive, got {coefficient}")
        if self._sums is None:
            self._sums = {k: torch.zeros(t.shape, dtype=torch.float64) for k, t in model.items()}
            self._dtypes = {k: t.dtype for k, t in model.items()}
        elif set(model) != set(self._sums):
            raise ValueError(
                f"a model with tensors {sorted(set(model) ^ set(self._sums))[:5]} differing from "
                "the first one's"
            )
        for k, acc in self._sums.items():
            acc.add_(model[k].to(torch.float64), alpha=float(coefficient))
        self.total += float(coefficient)
        self.count += 1

    def mean(self) -> Weights:
        """sum_i c_i w_i / sum_i c_i, in each tensor's dtype.

        Raises:
            ValueError: nothing was added.
        """
        if self._sums is None or not self.total > 0:
            raise ValueError("a running sum without models has no mean")
        return {k: (acc / self.total).to(self._dtypes[k]) for k, acc in self._sums.items()}


class Accumulator(abc.ABC):
    """One round's aggregate in the making, from `Strategy.accumulator(round, global_weights)`.

    `add` each update as it arrives (checked first, so a refused one folds nothing), then
    `finish` once with the round's failures: the next global weights, and the strategy's state
    moves on. An accumulator that is never finished changes nothing.
    """

    def __init__(self, round: int, global_weights: Mapping[str, torch.Tensor]) -> None:
        self.round = round
        self.global_weights = global_weights
        self.workers: list[str] = []  # whose updates were folded, in arrival order
        self.seconds = 0.0  # spent checking and folding (the round's timeline shows it)

    @property
    def count(self) -> int:
        return len(self.workers)

    def add(self, update: Update, expected: ExpectedCounts | None = None) -> None:
        """Check `update` (`Strategy.check_update`, counts against `expected`) and fold it in.

        Raises:
            UpdateRejected: the strategy refuses it (nothing was folded).
            ValueError: a second update from one worker in the round (nothing was folded).
        """
        if update.worker in self.workers:
            raise ValueError(f"round {self.round}: a second update from {update.worker!r}")
        started = time.perf_counter()
        try:
            self.check(update, expected)
            self.fold(update)
        finally:
            self.seconds += time.perf_counter() - started
        self.workers.append(update.worker)

    @abc.abstractmethod
    def check(self, update: Update, expected: ExpectedCounts | None) -> None:
        """The strategy's `check_update`."""

    @abc.abstractmethod
    def fold(self, update: Update) -> None:
        """Add a checked update to the aggregate."""

    @abc.abstractmethod
    def finish(self, failures: Sequence[Failure], order: Sequence[str] = ()) -> Weights:
        """The next global weights; the strategy's state takes the round.

        Args:
            failures: the round's failures (SCAFFOLD counts their workers in its population).
            order: the trainers in the config's order; state kept per worker is applied in it,
                as `combine` does, whatever order the updates arrived in.

        Raises:
            ValueError: nothing was folded.
        """
