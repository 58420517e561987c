"""FedOpt: a weighting plus a server optimizer, composed (Reddi et al., 2021, Algorithm 1).

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan, "Adaptive Federated Optimization"
(ICLR 2021): each round the server averages the workers' models (`weighting.py`) and, instead of
adopting the average, steps the global model on the pseudo-gradient global - average with a
server optimizer (`server_optimizer.py`). FedAvgM, FedAdam, FedYogi, FedAdagrad and FedProx are
instances of this one class, configured in their own files; none inherits from another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..protocol import Update
from .base import Failure, Strategy, StrategyState, Weights, check_state_owner
from .server_optimizer import ServerOptimizer
from .weighting import Weighting, average


class FedOpt(Strategy):
    """A named strategy: weighting + optional server optimizer + the plan the workers train with.

    Args:
        name: the strategy's configured name (what the record shows).
        weighting: "unweighted" or "samples".
        server: the server optimizer; None adopts the weighted average as the next model.
        plan: TrainPlan fields set for every round (FedProx's {"prox_mu": mu}).
        extra_params: further values for the record (e.g. the paper the strategy follows).
    """

    def __init__(
        self,
        name: str,
        weighting: Weighting,
        server: ServerOptimizer | None = None,
        plan: Mapping[str, Any] | None = None,
        extra_params: Mapping[str, object] | None = None,
    ) -> None:
        self.name = name
        self.weighting = weighting
        self.server = server
        self._plan = dict(plan or {})
        self._extra = dict(extra_params or {})

    def aggregate(
        self,
        round: int,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        failures: Sequence[Failure],
    ) -> Weights:
        if not updates:
            raise ValueError(f"round {round}: no updates to aggregate")
        for u in updates:
            self.check_update(u, global_weights)
        mean = average(self.weighting, updates)
        if self.server is None:
            return mean
        return self.server.step(dict(global_weights), mean)

    def plan_overrides(self) -> dict[str, Any]:
        return dict(self._plan)

    def params(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "weighting": self.weighting}
        out.update(self.server.params() if self.server else {"server_optimizer": "none"})
        out.update(self._plan)
        out.update(self._extra)
        return out

    def state_dict(self) -> StrategyState:
        if self.server is None:
            return StrategyState(self.name)
        tensors, values = self.server.state_dict()
        return StrategyState(
            self.name,
            {f"server/{k}": t for k, t in tensors.items()},
            {f"server/{k}": v for k, v in values.items()},
        )

    def load_state_dict(self, state: StrategyState) -> None:
        check_state_owner(self.name, state)
        tensors = strip_prefix("server/", state.tensors)
        values = strip_prefix("server/", state.values)
        if self.server is None:
            if tensors or values:
                raise ValueError(f"strategy {self.name!r} has no server optimizer to resume")
            return
        self.server.load_state_dict(tensors, values)


def strip_prefix(prefix: str, items: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `items` under `prefix`, without it; ValueError for any other entry."""
    other = sorted(k for k in items if not k.startswith(prefix))
    if other:
        raise ValueError(f"unexpected state entries {other[:5]} (expected names under {prefix!r})")
    return {k[len(prefix) :]: v for k, v in items.items()}
