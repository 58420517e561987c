"""FedAdam: Adam as the server optimizer, with adaptivity tau as Adam's eps.

Reddi et al., 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2, with Delta the round's
average change of the model (the negated pseudo-gradient):
    m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
    v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2          (m_{-1} = 0, v_{-1} >= tau^2)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

`torch.optim.Adam(lr=eta, betas=(beta1, beta2), eps=tau)` differs in two places: it starts from
v_{-1} = 0, and it bias-corrects, stepping eta m_hat / (sqrt(v_hat) + tau) with
m_hat = m_t / b1, v_hat = v_t / b2, b1 = 1 - beta1^(t+1), b2 = 1 - beta2^(t+1). Early on that is a
much larger step (step 1: about eta * sign(Delta), where the paper's is about eta (1 - beta1)
Delta / (sqrt(1 - beta2) |Delta| + tau), a tenth of it with the usual betas).

Decision: `bias_correction: false` (the default) gives the paper's update exactly, still with
torch's Adam: v_{-1} = tau^2 (the paper's smallest allowed value) is set in the optimizer's state,
and before each step the step's lr and eps are set to eta b1 / sqrt(b2) and tau / sqrt(b2), which
turns torch's (lr / b1) m / (sqrt(v) / sqrt(b2) + eps) into eta m / (sqrt(v) + tau).
`bias_correction: true` is torch's Adam unchanged (v_{-1} = 0, bias-corrected moments).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .fedopt import FedOpt
from .options import Beta, ServerLR, StrategyOptions, Tau
from .server_optimizer import ServerOptimizer
from .weighting import Weighting

PAPER = "Reddi et al. 2021, Adaptive Federated Optimization (ICLR)"


def optimizer_step_count(opt: torch.optim.Optimizer) -> int:
    """How many steps `opt` has taken (from the `step` entry of its state; 0 before the first)."""
    for state in opt.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def server_adam(
    lr: float, beta1: float, beta2: float, tau: float, bias_correction: bool
) -> ServerOptimizer:
    """torch.optim.Adam as a server optimizer; the paper's update unless `bias_correction`."""

    def make(tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(tensors, lr=lr, betas=(beta1, beta2), eps=tau)
        if not bias_correction:
            for t in tensors:  # Adam's own state layout, with v_{-1} = tau^2 (Algorithm 2)
                opt.state[t].update(
                    step=torch.tensor(0.0),
                    exp_avg=torch.zeros_like(t),
                    exp_avg_sq=torch.full_like(t, tau * tau),
                )
        return opt

    def undo_bias_correction(opt: torch.optim.Optimizer) -> None:
        t = optimizer_step_count(opt) + 1
        b1, b2 = 1 - beta1**t, 1 - beta2**t
        for group in opt.param_groups:
            group["lr"] = lr * b1 / math.sqrt(b2)
            group["eps"] = tau / math.sqrt(b2)

    hyper = {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "tau": tau,
        "bias_correction": bias_correction,
        "v_init": 0.0 if bias_correction else tau * tau,
    }
    return ServerOptimizer(
        "torch.optim.Adam", make, hyper, None if bias_correction else undo_bias_correction
    )


class FedAdamConfig(StrategyOptions):
    """`{name: fedadam, weighting, server_lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3}`."""

    name: Literal["fedadam"]
    weighting: Weighting
    server_lr: ServerLR = 0.01
    beta1: Beta = 0.9
    beta2: Beta = 0.99
    tau: Tau = 1e-3
    bias_correction: bool = False  # false: Reddi et al.'s update; true: torch's Adam as is

    def build(self) -> FedOpt:
        server = server_adam(self.server_lr, self.beta1, self.beta2, self.tau, self.bias_correction)
        return FedOpt("fedadam", self.weighting, server, extra_params={"paper": PAPER})
