"""FedYogi: Yogi as the server optimizer, with adaptivity tau as its eps.

Reddi et al., 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2: FedAdam with the
second moment v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2), which grows or
shrinks by at most (1 - beta2) Delta_t^2 per round (Zaheer et al. 2018). Torch has no Yogi; ours is
in yogi.py. As for FedAdam, `bias_correction: false` (the default) is the paper's update with
v_{-1} = tau^2; `true` bias-corrects both moments the way torch's Adam does, from v_{-1} = 0.
"""

from __future__ import annotations

from typing import Literal

import torch

from .fedopt import FedOpt
from .options import Beta, ServerLR, StrategyOptions, Tau
from .server_optimizer import ServerOptimizer
from .weighting import Weighting
from .yogi import Yogi

PAPER = "Reddi et al. 2021, Adaptive Federated Optimization (ICLR)"


def server_yogi(
    lr: float, beta1: float, beta2: float, tau: float, bias_correction: bool
) -> ServerOptimizer:
    """Yogi as a server optimizer."""
    v_init = 0.0 if bias_correction else tau * tau

    def make(tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        return Yogi(
            tensors,
            lr=lr,
            betas=(beta1, beta2),
            eps=tau,
            initial_accumulator_value=v_init,
            bias_correction=bias_correction,
        )

    hyper = {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "tau": tau,
        "bias_correction": bias_correction,
        "v_init": v_init,
    }
    return ServerOptimizer("fedcore.strategies.yogi.Yogi", make, hyper)


class FedYogiConfig(StrategyOptions):
    """`{name: fedyogi, weighting, server_lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3}`."""

    name: Literal["fedyogi"]
    weighting: Weighting
    server_lr: ServerLR = 0.01
    beta1: Beta = 0.9
    beta2: Beta = 0.99
    tau: Tau = 1e-3
    bias_correction: bool = False  # false: Reddi et al.'s update; true: Adam-style correction

    def build(self) -> FedOpt:
        server = server_yogi(self.server_lr, self.beta1, self.beta2, self.tau, self.bias_correction)
        return FedOpt("fedyogi", self.weighting, server, extra_params={"paper": PAPER})
