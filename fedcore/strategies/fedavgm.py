"""FedAvgM: FedAvg with server momentum, i.e. SGD with momentum stepping on the pseudo-gradient.

Hsu, Qi, Brown, 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification" (arXiv:1909.06335): with Delta the round's average change of the model,
v <- beta v + Delta and w <- w - eta v. That is `torch.optim.SGD(lr=eta, momentum=beta)` on
g = global - average (its first step sets v = g, as Hsu et al. start from v = 0); Nesterov
momentum (`nesterov: true`) steps on g + beta v instead. With momentum 0 and server_lr 1 it
reduces to FedAvg (or to the unweighted mean), up to float rounding.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator

from .fedopt import FedOpt
from .options import Momentum, ServerLR, StrategyOptions
from .server_optimizer import ServerOptimizer
from .weighting import Weighting

PAPER = "Hsu et al. 2019, arXiv:1909.06335"


def server_sgd(lr: float, momentum: float, nesterov: bool) -> ServerOptimizer:
    """torch.optim.SGD as a server optimizer (no dampening, no weight decay)."""

    def make(tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(tensors, lr=lr, momentum=momentum, nesterov=nesterov)

    return ServerOptimizer(
        "torch.optim.SGD", make, {"lr": lr, "momentum": momentum, "nesterov": nesterov}
    )


class ServerSGDOptions(StrategyOptions):
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
    weighting: Weighting
    momentum: Momentum = 0.9

    def build(self) -> FedOpt:
        return FedOpt("fedavgm", self.weighting, self.server(), extra_params={"paper": PAPER})
