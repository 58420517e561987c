"""The seed's aggregation: the unweighted mean of the workers' models.

The PySyft asynchronous federated learning demo averaged alice's, bob's and charlie's models with
equal weight whatever their shard sizes. Kept as its own, explicitly named strategy so that it is
never mistaken for sample-weighted FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from ..protocol import Update
from .base import Failure, Strategy, Weights
from .options import StrategyOptions
from .weighting import average


class UnweightedMean(Strategy):
    """Every valid update counts equally."""

    name = "mean"

    def aggregate(
        self,
        round: int,
        global_weights: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        failures: Sequence[Failure],
    ) -> Weights:
        for u in updates:
            self.check_update(u, global_weights)
        return average("unweighted", updates)

    def params(self) -> dict[str, object]:
        return {"name": self.name, "weighting": "unweighted"}


class MeanConfig(StrategyOptions):
    """`{name: mean}`: the seed's unweighted mean; no parameters."""

    name: Literal["mean"] = "mean"

    def build(self) -> UnweightedMean:
        return UnweightedMean()
