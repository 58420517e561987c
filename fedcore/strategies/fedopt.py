"""FedOpt: a weighting plus a server optimizer, composed; every averaging strategy is one of it.

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan, 2021, "Adaptive Federated
Optimization" (ICLR), Algorithm 1: each round the server averages the workers' models
(`weighting.py`) and, instead of adopting the average, steps the global model on the
pseudo-gradient global - average with a server optimizer (`server_optimizer.py`, where the
optimizers' formulas and their differences from torch's are written out). The configurations
below are all this one class; none inherits behaviour from another:

- `mean`: the seed's unweighted mean, adopted as is. The PySyft asynchronous federated learning
  demo averaged alice's, bob's and charlie's models with equal weight whatever their shard sizes;
  it keeps its own name so that it is never mistaken for sample-weighted FedAvg.
- `fedavg`: McMahan, Moore, Ramage, Hampson, Aguera y Arcas, 2017, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data" (AISTATS): w_{t+1} = sum_k (n_k / n) w^k_{t+1},
  n_k the examples worker k holds, adopted as is.
- `fedavgm`: Hsu, Qi, Brown, 2019, "Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification" (arXiv:1909.06335): server SGD with momentum. With momentum 0
  and server_lr 1 it reduces to FedAvg (or to the unweighted mean), up to float rounding.
- `fedadam`, `fedyogi`, `fedadagrad`: Reddi et al. 2021, Algorithm 2, with adaptivity tau as the
  optimizer's eps (`bias_correction: false`, the default, is the paper's update exactly).
- `fedprox`: Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, 2020, "Federated Optimization in
  Heterogeneous Networks" (MLSys): worker k minimises F_k(w) + (mu / 2) ||w - w^t||^2, w^t the
  round's global model. The term lives in the worker's local step (`fedcore.training.train_local`,
  switched on by the plan's `prox_mu`, sent through `plan_overrides`); the server averages and
  steps with server SGD (server_lr 1, momentum 0: the paper's plain average). mu = 0 is plain
  local SGD, bit for bit.

The robust configurations (`median`, `trimmed-mean`, `clipped-mean`: robust.py) are FedOpt too,
holding a combine rule (rules.py) that replaces the weighted average.

Every configuration model is frozen and refuses unknown keys, so `{name: fedavgm, momentun: 0.9}`
is an error naming `momentun`; its `build()` makes the strategy from the fields it holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..model import Weights
from ..protocol import Update
from .base import ExpectedCounts, Failure, Strategy, StrategyState, check_state_owner
from .rules import CombineRule
from .server_optimizer import (
    ServerOptimizer,
    server_adagrad,
    server_adam,
    server_sgd,
    server_yogi,
)
from .streaming import Accumulator, RunningSum
from .weighting import Weighting, average, coefficient

REDDI_2021 = "Reddi et al. 2021, Adaptive Federated Optimization (ICLR)"


class FedOpt(Strategy):
    """A named strategy: weighting + optional server optimizer + the plan the workers train with.

    Args:
        name: the strategy's configured name (what the record shows).
        weighting: "unweighted" or "samples".
        server: the server optimizer; None adopts the weighted average as the next model.
        plan: TrainPlan fields set for every round (FedProx's {"prox_mu": mu}).
        extra_params: further values for the record (e.g. the paper the strategy follows).
        rule: a robust combine rule used instead of the weighted average (None: the average).
    """

    def __init__(
        self,
        name: str,
        weighting: Weighting,
        server: ServerOptimizer | None = None,
        plan: Mapping[str, Any] | None = None,
        extra_params: Mapping[str, object] | None = None,
        rule: CombineRule | None = None,
    ) -> None:
        self.name = name
        self.weighting = weighting
        self.server = server
        self.rule = rule
        self._plan = dict(plan or {})
        self._extra = dict(extra_params or {})

    def combine(
        self,
        round: int,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        failures: Sequence[Failure],
    ) -> Weights:
        """The weighted average (or the rule's model), stepped to by the server optimizer when
        there is one."""
        if self.rule is None:
            combined = average(self.weighting, updates)
        else:
            combined = self.rule.combine(self.weighting, global_weights, updates)
        return self.server_step(global_weights, combined)

    def accumulator(
        self, round: int, global_weights: Mapping[str, torch.Tensor]
    ) -> Accumulator | None:
        """A running weighted sum (fedcore.strategies.streaming); None with a robust rule,
        which needs every update of the round at once."""
        return None if self.rule is not None else FedOptSum(self, round, global_weights)

    def server_step(self, global_weights: Mapping[str, torch.Tensor], average: Weights) -> Weights:
        """The next global weights from the round's average: the server optimizer's step, or
        the average as is."""
        if self.server is None:
            return average
        return self.server.step(dict(global_weights), average)

    def plan_overrides(self) -> dict[str, Any]:
        return dict(self._plan)

    def params(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "weighting": self.weighting}
        out.update(self.server.params() if self.server else {"server_optimizer": "none"})
        out.update(self.rule.params() if self.rule else {})
        out.update(self._plan)
        out.update(self._extra)
        return out

    def state_dict(self) -> StrategyState:
        """The server optimizer's state, its entries prefixed `server/` (none without one)."""
        if self.server is None:
            return StrategyState(self.name)
        tensors, values = self.server.state_dict()
        return StrategyState(
            self.name,
            {f"server/{k}": t for k, t in tensors.items()},
            {f"server/{k}": v for k, v in values.items()},
        )

    def load_state_dict(self, state: StrategyState) -> None:
        """Resume the server optimizer from `state_dict()`'s output.

        Raises:
            ValueError: another strategy's state, an entry not under `server/`, or any entry
                for a FedOpt without a server optimizer (it keeps no state).
        """
        if self.server is None:
            super().load_state_dict(state)
            return
        check_state_owner(self.name, state)
        tensors = strip_prefix("server/", state.tensors)
        values = strip_prefix("server/", state.values)
        self.server.load_state_dict(tensors, values)


class FedOptSum(Accumulator):
    """A FedOpt's round as a running weighted sum: `finish` is `combine` without the held updates
    (the weighted mean, then the server optimizer's step)."""

    def __init__(
        self, strategy: FedOpt, round: int, global_weights: Mapping[str, torch.Tensor]
    ) -> None:
        super().__init__(round, global_weights)
        self.strategy = strategy
        self.sum = RunningSum()

    def check(self, update: Update, expected: ExpectedCounts | None) -> None:
        self.strategy.check_update(update, self.global_weights, expected)

    def fold(self, update: Update) -> None:
        self.sum.add(update.weights, coefficient(self.strategy.weighting, update))

    def finish(self, failures: Sequence[Failure], order: Sequence[str] = ()) -> Weights:
        if not self.sum.count:
            raise ValueError(f"round {self.round}: no updates to aggregate")
        return self.strategy.server_step(self.global_weights, self.sum.mean())


def strip_prefix(prefix: str, items: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `items` under `prefix`, without it; ValueError for any other entry."""
    other = sorted(k for k in items if not k.startswith(prefix))
    if other:
        raise ValueError(f"unexpected state entries {other[:5]} (expected names under {prefix!r})")
    return {k[len(prefix) :]: v for k, v in items.items()}


class PlainAverage(FedOpt):
    """FedOpt without a server optimizer under a fixed name and weighting: `mean` and `fedavg`.

    Its record is the name and the weighting only, as every training record of them shows.
    """

    def params(self) -> dict[str, object]:
        return {"name": self.name, "weighting": self.weighting}


class UnweightedMean(PlainAverage):
    """The seed's aggregation: every valid update counts equally."""

    def __init__(self) -> None:
        super().__init__("mean", "unweighted")


class FedAvg(PlainAverage):
    """FedAvg (McMahan et al. 2017): each update counts in proportion to its worker's examples."""

    def __init__(self) -> None:
        super().__init__("fedavg", "samples")


# -- configuration --------------------------------------------------------------------------

ServerLR = Annotated[float, Field(gt=0)]  # server learning rate eta (1.0: plain averaging with SGD)
Momentum = Annotated[float, Field(ge=0, lt=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]
Tau = Annotated[float, Field(gt=0)]  # adaptivity tau of Reddi et al. 2021 (torch's eps)


class StrategyOptions(BaseModel):
    """Base of every strategy's configuration: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MeanConfig(StrategyOptions):
    """`{name: mean}`: the seed's unweighted mean; no parameters."""

    name: Literal["mean"] = "mean"

    def build(self) -> Strategy:
        return UnweightedMean()


class FedAvgConfig(StrategyOptions):
    """`{name: fedavg}`: sample-weighted averaging; no parameters."""

    name: Literal["fedavg"]

    def build(self) -> Strategy:
        return FedAvg()


class ServerOptions(StrategyOptions):
    """A strategy with a named weighting and a server optimizer; builds FedOpt from them.

    Each configuration sets `name` to its literal, `paper` to what it follows, and `server()`.
    """

    name: str
    weighting: Weighting
    paper: ClassVar[str]

    def server(self) -> ServerOptimizer:
        raise NotImplementedError(f"{type(self).__name__} names no server optimizer")

    def plan(self) -> dict[str, Any]:
        """TrainPlan fields for every round (none unless the configuration changes the workers)."""
        return {}

    def build(self) -> Strategy:
        return FedOpt(self.name, self.weighting, self.server(), self.plan(), {"paper": self.paper})


class ServerSGDOptions(ServerOptions):
    """Server SGD fields, shared by FedAvgM, FedProx and SCAFFOLD's configurations."""

    server_lr: ServerLR = 1.0
    momentum: Momentum = 0.0
    nesterov: bool = False

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> ServerSGDOptions:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: true needs momentum > 0 (got momentum 0)")
        return self

    def server(self) -> ServerOptimizer:
        return server_sgd(self.server_lr, self.momentum, self.nesterov)


class FedAvgMConfig(ServerSGDOptions):
    """`{name: fedavgm, weighting, server_lr: 1.0, momentum: 0.9, nesterov: false}`."""

    name: Literal["fedavgm"]
    momentum: Momentum = 0.9
    paper = "Hsu et al. 2019, arXiv:1909.06335"


class FedProxConfig(ServerSGDOptions):
    """`{name: fedprox, mu: 0.01, weighting, server_lr: 1.0, momentum: 0.0, nesterov: false}`."""

    name: Literal["fedprox"]
    mu: Annotated[float, Field(ge=0)] = 0.01
    paper = "Li et al. 2020, Federated Optimization in Heterogeneous Networks (MLSys)"

    def plan(self) -> dict[str, Any]:
        return {"prox_mu": self.mu}


class AdaptiveOptions(ServerOptions):
    """FedAdam's and FedYogi's shared fields (Reddi et al. 2021, Algorithm 2).

    `bias_correction: false` is Reddi et al.'s update; `true` corrects both moments as torch's
    Adam does.
    """

    server_lr: ServerLR = 0.01
    beta1: Beta = 0.9
    beta2: Beta = 0.99
    tau: Tau = 1e-3
    bias_correction: bool = False
    paper = REDDI_2021

    def server(self) -> ServerOptimizer:
        optimizer = {"fedadam": server_adam, "fedyogi": server_yogi}[self.name]
        return optimizer(self.server_lr, self.beta1, self.beta2, self.tau, self.bias_correction)


class FedAdamConfig(AdaptiveOptions):
    """`{name: fedadam, weighting, server_lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3}`."""

    name: Literal["fedadam"]


class FedYogiConfig(AdaptiveOptions):
    """`{name: fedyogi, weighting, server_lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3}`."""

    name: Literal["fedyogi"]


class FedAdagradConfig(ServerOptions):
    """`{name: fedadagrad, weighting, server_lr: 0.1, tau: 1e-3}`."""

    # No beta1: torch's Adagrad keeps no first moment (see server_optimizer.py).

    name: Literal["fedadagrad"]
    server_lr: ServerLR = 0.1
    tau: Tau = 1e-3
    paper = REDDI_2021

    def server(self) -> ServerOptimizer:
        return server_adagrad(self.server_lr, self.tau)
