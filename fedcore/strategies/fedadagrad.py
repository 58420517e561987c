"""FedAdagrad: Adagrad as the server optimizer, with adaptivity tau as its eps.

Reddi et al., 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2: v_t = v_{t-1} + Delta_t^2
and x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau), from v_{-1} >= tau^2.

`torch.optim.Adagrad(lr=eta, eps=tau, initial_accumulator_value=tau^2)` is that update with
v_{-1} = tau^2 (the paper's smallest allowed value; decided so that FedAdam, FedYogi and
FedAdagrad all start from the same v) and m_t = Delta_t, i.e. beta1 = 0. Adagrad has no bias
correction to differ on. What differs: Algorithm 2 also keeps a first moment
m_t = beta1 m_{t-1} + (1 - beta1) Delta_t for FedAdagrad, and torch's Adagrad has none, so
beta1 is not offered here (beta1 = 0 is the setting of the paper's convergence analysis).
"""

from __future__ import annotations

from typing import Literal

import torch

from .fedopt import FedOpt
from .options import ServerLR, StrategyOptions, Tau
from .server_optimizer import ServerOptimizer
from .weighting import Weighting

PAPER = "Reddi et al. 2021, Adaptive Federated Optimization (ICLR)"


def server_adagrad(lr: float, tau: float) -> ServerOptimizer:
    """torch.optim.Adagrad as a server optimizer, from v_{-1} = tau^2."""

    def make(tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adagrad(tensors, lr=lr, eps=tau, initial_accumulator_value=tau * tau)

    return ServerOptimizer(
        "torch.optim.Adagrad", make, {"lr": lr, "tau": tau, "v_init": tau * tau, "beta1": 0.0}
    )


class FedAdagradConfig(StrategyOptions):
    """`{name: fedadagrad, weighting, server_lr: 0.1, tau: 1e-3}`."""

    name: Literal["fedadagrad"]
    weighting: Weighting
    server_lr: ServerLR = 0.1
    tau: Tau = 1e-3

    def build(self) -> FedOpt:
        server = server_adagrad(self.server_lr, self.tau)
        return FedOpt("fedadagrad", self.weighting, server, extra_params={"paper": PAPER})
