"""The seed's aggregation: the unweighted mean of the workers' models.

The PySyft asynchronous federated learning demo averaged alice's, bob's and charlie's models with
equal weight whatever their shard sizes. Kept as its own, explicitly named strategy so that it is
never mistaken for sample-weighted FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..protocol import Update
from .aggregate import weighted_mean
from .base import Failure, Strategy, Weights


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
        return weighted_mean([u.weights for u in updates], [1.0] * len(updates))

    def params(self) -> dict[str, object]:
        return {"name": self.name, "weighting": "unweighted"}
