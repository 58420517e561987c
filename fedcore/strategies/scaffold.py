"""SCAFFOLD: drift correction with control variates, composed with a weighting and server SGD.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, 2020, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning" (ICML), Algorithm 1 with option II. The worker's side (correcting each
local gradient by c - c_i, computing c_i+ and replying with the delta only) is in
`fedcore.local_algorithms`, switched on by the plan's `scaffold: true` (`plan_overrides`). Here:

- the model: a held `FedOpt` (`model_step`) averages the workers' models with the configured
  weighting and its server optimizer (SGD: server_lr eta_g, momentum, Nesterov) steps the global
  model on global - average. The paper's x <- x + eta_g mean(y_i - x) is `weighting: unweighted`
  with momentum 0;
- the control variate: the server keeps, per worker, the record c_i = sum of the deltas it
  applied (bit-equal to the worker's own c_i), and sets c = (1/N) sum_j c_j after each round, with N
  every trainer it has seen so far, in updates or failures. With a fixed population that is the
  paper's c <- c + (|S|/N) mean_{i in S} delta c_i; it keeps c equal to the mean of the workers'
  c_i exactly, also when a worker joins late. Control variates are averaged without weights
  whatever the model's weighting, as in the paper (c estimates the mean of the workers' gradients).

Reconnects and lost replies (decision): a new worker process starts from c_i = 0. Ignoring that
would leave the lost c_i inside c for good, a constant bias added to every worker's gradient, so the
server's bookkeeping adapts instead. Each request names the round of the last delta the server
applied for that worker (`control_base`); the worker adopts a delta only once it is acknowledged,
so a reply the server lost or rejected is dropped on both sides. A worker that does not hold the
acknowledged c_i trains with c_i = 0 and replies without `control_delta`; the server then drops its
record of that worker (c loses that share) and acknowledges 0, and both go on from c_i = 0. A
reply without `control_delta` from a worker the server holds nothing for is refused: it means the
worker did not run SCAFFOLD (the flow did not merge `plan_overrides`). A resumed training (new
worker processes) therefore spends one round re-synchronising each worker.

Control variates cover the floating-point tensors of the global weights, which for the seed's Net
are exactly its parameters (a model with floating-point buffers would need the parameter names
here; the worker refuses a `control` group that does not match its parameters).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from .. import wire
from ..errors import UpdateRejected
from ..local_algorithms import CONTROL, CONTROL_BASE, CONTROL_DELTA
from ..model import Weights
from ..protocol import Update
from .aggregate import floating_spec, mean_over
from .base import ExpectedCounts, Failure, Strategy, StrategyState, check_state_owner
from .fedopt import FedOpt, ServerSGDOptions
from .server_optimizer import ServerOptimizer
from .streaming import Accumulator
from .weighting import Weighting

log = logging.getLogger("fedcore.strategies.scaffold")

PAPER = "Karimireddy et al. 2020, SCAFFOLD (ICML), option II"
CONTROL_RULE = "c = mean of every seen worker's c_i"


class Scaffold(Strategy):
    """SCAFFOLD's control variates around a `FedOpt` that steps the model.

    Args:
        weighting: how the workers' models are averaged ("unweighted" is the paper's).
        server: the server optimizer stepping the global model; None adopts the average.
    """

    name = "scaffold"

    def __init__(self, weighting: Weighting, server: ServerOptimizer | None = None) -> None:
        extra = {"control_update": CONTROL_RULE, "paper": PAPER}
        self.model_step = FedOpt(self.name, weighting, server, extra_params=extra)
        self._c: dict[str, torch.Tensor] | None = None  # None until the first aggregate: zero
        self._records: dict[str, dict[str, torch.Tensor]] = {}  # worker -> its c_i, as applied
        self._bases: dict[str, int] = {}  # worker -> round of the last delta applied (0: none)
        self._population: set[str] = set()  # every trainer seen: N

    # -- what the workers get --------------------------------------------------------------

    def plan_overrides(self) -> dict[str, Any]:
        return {"scaffold": True}

    def extras_for(self, worker: str, round: int) -> dict[str, Weights]:
        base = torch.tensor(self._bases.get(worker, 0), dtype=torch.int64)
        out: dict[str, Weights] = {CONTROL_BASE: {"round": base}}
        if self._c is not None:
            out[CONTROL] = dict(self._c)
        return out

    def reply_groups(self) -> frozenset[str]:
        return frozenset({CONTROL_DELTA})

    @property
    def control(self) -> dict[str, torch.Tensor] | None:
        """The server control variate c (None before the first round: zero)."""
        return self._c

    def record(self, worker: str) -> dict[str, torch.Tensor] | None:
        """The server's record of `worker`'s c_i (None: zero)."""
        return self._records.get(worker)

    # -- what comes back -------------------------------------------------------------------

    def check_update(
        self,
        update: Update,
        global_weights: Mapping[str, torch.Tensor],
        expected: ExpectedCounts | None = None,
    ) -> None:
        """Refuse bad counts, other groups, a malformed delta, or a missing delta that cannot be
        a reconnect.

        Raises:
            UpdateRejected: counts out of range (`check_counts`); names, shapes, dtypes or
                values of `control_delta` do not fit the model's floating-point tensors, or it
                is missing where the worker had no c_i to lose.
        """
        super().check_update(update, global_weights, expected)
        delta = update.extras.get(CONTROL_DELTA)
        if delta is not None:
            spec = floating_spec(dict(global_weights))
            wire.validate_tensors(update.worker, delta, spec, CONTROL_DELTA)
        elif self._bases.get(update.worker, 0) == 0:
            raise UpdateRejected(
                update.worker,
                "no control_delta in a SCAFFOLD reply: did its train plan have scaffold: true? "
                "(the flow must merge strategy.plan_overrides() into each round's plan)",
            )

    def combine(
        self,
        round: int,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        failures: Sequence[Failure],
    ) -> Weights:
        """The model step's weights; then each worker's c_i and c take the round's deltas.

        Raises:
            ValueError: several updates from one worker (before any state changes).
        """
        names = [u.worker for u in updates]
        if len(set(names)) != len(names):
            raise ValueError(f"round {round}: several updates from one worker: {sorted(names)}")
        spec = floating_spec(dict(global_weights))
        weights = self.model_step.combine(round, global_weights, updates, failures)
        records = {
            u.worker: self.next_record(u.worker, u.extras.get(CONTROL_DELTA), spec) for u in updates
        }
        self.apply_records(round, records, failures, spec)
        return weights

    def accumulator(
        self, round: int, global_weights: Mapping[str, torch.Tensor]
    ) -> Accumulator | None:
        """The model step's running sum, and each worker's next c_i as its update arrives."""
        model = self.model_step.accumulator(round, global_weights)
        return None if model is None else ScaffoldSum(self, model)

    def next_record(
        self, worker: str, delta: Mapping[str, torch.Tensor] | None, spec: Mapping[str, tuple]
    ) -> dict[str, torch.Tensor] | None:
        """`worker`'s c_i after this round's `delta` (None: it lost its control variate)."""
        if delta is None:
            return None
        old = self._records.get(worker)
        if old is None:
            old = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in spec.items()}
        return {k: old[k] + delta[k] for k in spec}

    def apply_records(
        self,
        round: int,
        records: Mapping[str, dict[str, torch.Tensor] | None],
        failures: Sequence[Failure],
        spec: Mapping[str, tuple],
    ) -> None:
        """Each updated worker's c_i (`next_record`; None drops the worker's record), then c."""
        self._population.update(records)
        self._population.update(f.worker for f in failures)
        for worker, record in records.items():
            if record is None:
                log.warning(
                    "round %d: %s lost its control variate (new process?); dropping its record",
                    round,
                    worker,
                )
                self._records.pop(worker, None)
                self._bases[worker] = 0
                continue
            self._records[worker] = record
            self._bases[worker] = round
        self._c = mean_over(list(self._records.values()), len(self._population), spec)

    # -- record and resume -----------------------------------------------------------------

    def params(self) -> dict[str, object]:
        return self.model_step.params()

    def state_dict(self) -> StrategyState:
        """`control/<tensor>`, `record/<worker>/<tensor>`, then the model step's `server/...`."""
        tensors: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {
            "bases": dict(sorted(self._bases.items())),
            "population": sorted(self._population),
        }
        if self._c is not None:
            tensors.update({f"control/{k}": t.clone() for k, t in self._c.items()})
        for worker, record in self._records.items():
            tensors.update({f"record/{worker}/{k}": t.clone() for k, t in record.items()})
        model = self.model_step.state_dict()
        tensors.update(model.tensors)
        values.update(model.values)
        return StrategyState(self.name, tensors, values)

    def load_state_dict(self, state: StrategyState) -> None:
        """Resume from `state_dict()`'s output; the `server/...` entries go to the model step.

        Raises:
            ValueError: another strategy's state, an unknown entry, records or bases of workers
                outside the population, or server entries without a server optimizer.
        """
        check_state_owner(self.name, state)
        c: dict[str, torch.Tensor] = {}
        records: dict[str, dict[str, torch.Tensor]] = {}
        model_tensors: dict[str, torch.Tensor] = {}
        for key, t in state.tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "control":
                c[rest] = t.clone()
            elif kind == "record":
                worker, _, param = rest.partition("/")
                records.setdefault(worker, {})[param] = t.clone()
            elif kind == "server":
                model_tensors[key] = t
            else:
                raise ValueError(f"unexpected SCAFFOLD state tensor {key!r}")
        model_values = dict(state.values)
        bases = {str(k): int(v) for k, v in model_values.pop("bases", {}).items()}
        population = {str(w) for w in model_values.pop("population", [])}
        stray = sorted(set(records) - set(bases))
        if stray:
            raise ValueError(f"SCAFFOLD state is inconsistent: records {stray} without a base")
        outside = sorted(set(bases) - population)
        if outside:
            raise ValueError(f"SCAFFOLD state is inconsistent: {outside} missing from population")
        if self.model_step.server is None and (model_tensors or model_values):
            raise ValueError("this SCAFFOLD has no server optimizer to resume")
        self.model_step.load_state_dict(StrategyState(self.name, model_tensors, model_values))
        self._c = c or None
        self._records, self._bases, self._population = records, bases, population


class ScaffoldSum(Accumulator):
    """SCAFFOLD's round as it arrives: the model step's running sum, and each worker's next c_i
    computed from its delta at once (the delta is then let go); `finish` applies them and c."""

    def __init__(self, strategy: Scaffold, model: Accumulator) -> None:
        super().__init__(model.round, model.global_weights)
        self.strategy = strategy
        self.model = model
        self.spec = floating_spec(dict(model.global_weights))
        self.records: dict[str, dict[str, torch.Tensor] | None] = {}

    def check(self, update: Update, expected: ExpectedCounts | None) -> None:
        self.strategy.check_update(update, self.global_weights, expected)

    def fold(self, update: Update) -> None:
        self.model.fold(update)
        delta = update.extras.get(CONTROL_DELTA)
        self.records[update.worker] = self.strategy.next_record(update.worker, delta, self.spec)

    def finish(self, failures: Sequence[Failure], order: Sequence[str] = ()) -> Weights:
        weights = self.model.finish(failures, order)
        rank = {w: i for i, w in enumerate(order)}
        ordered = dict(sorted(self.records.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        self.strategy.apply_records(self.round, ordered, failures, self.spec)
        return weights


class ScaffoldConfig(ServerSGDOptions):
    """`{name: scaffold, weighting, server_lr: 1.0, momentum: 0.0, nesterov: false}`."""

    name: Literal["scaffold"]
    paper = PAPER

    def build(self) -> Strategy:
        return Scaffold(self.weighting, self.server())
