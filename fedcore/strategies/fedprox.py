"""FedProx: each worker minimises its loss plus a proximal term that keeps it near the global model.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, 2020, "Federated Optimization in Heterogeneous
Networks" (MLSys): worker k minimises F_k(w) + (mu / 2) ||w - w^t||^2, w^t the round's global
model. The term lives in the worker's local step (`fedcore.training.train_local`, switched on by
the plan's `prox_mu`, sent through `plan_overrides`); the server averages with the configured
weighting and steps with server SGD (server_lr 1, momentum 0: the paper's plain average).
mu = 0 is plain local SGD, bit for bit.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .fedavgm import ServerSGDOptions
from .fedopt import FedOpt
from .weighting import Weighting

PAPER = "Li et al. 2020, Federated Optimization in Heterogeneous Networks (MLSys)"


class FedProxConfig(ServerSGDOptions):
    """`{name: fedprox, mu: 0.01, weighting, server_lr: 1.0, momentum: 0.0, nesterov: false}`."""

    name: Literal["fedprox"]
    weighting: Weighting
    mu: Annotated[float, Field(ge=0)] = 0.01

    def build(self) -> FedOpt:
        return FedOpt(
            "fedprox",
            self.weighting,
            self.server(),
            plan={"prox_mu": self.mu},
            extra_params={"paper": PAPER},
        )
