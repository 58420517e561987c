"""FedAvg: the sample-weighted average of the workers' models.

McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(AISTATS): w_{t+1} = sum_k (n_k / n) w^k_{t+1}, n_k the examples worker k holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from ..protocol import Update
from .base import Failure, Strategy, Weights
from .options import StrategyOptions
from .weighting import average


class FedAvg(Strategy):
    """Each valid update counts in proportion to the examples its worker holds."""

    name = "fedavg"

    def aggregate(
        self,
        round: int,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        failures: Sequence[Failure],
    ) -> Weights:
        for u in updates:
            self.check_update(u, global_weights)
        return average("samples", updates)

    def params(self) -> dict[str, object]:
        return {"name": self.name, "weighting": "samples"}


class FedAvgConfig(StrategyOptions):
    """`{name: fedavg}`: sample-weighted averaging; no parameters."""

    name: Literal["fedavg"]

    def build(self) -> FedAvg:
        return FedAvg()
