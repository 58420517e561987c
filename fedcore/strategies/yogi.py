"""Yogi, the one server optimizer torch lacks, written once as a `torch.optim.Optimizer`.

Zaheer, Reddi, Sachan, Kale, Kumar, 2018, "Adaptive Methods for Nonconvex Optimization"
(NeurIPS): Adam whose second moment moves additively, by at most (1 - beta2) g^2 per step,
    m_t = beta1 m_{t-1} + (1 - beta1) g_t
    v_t = v_{t-1} - (1 - beta2) g_t^2 sign(v_{t-1} - g_t^2)
    x_{t+1} = x_t - lr m_t / (sqrt(v_t) + eps)
as FedYogi uses it (Reddi et al., 2021, Algorithm 2, with v_{-1} = `initial_accumulator_value`).
`bias_correction=True` divides m_t and v_t by 1 - beta1^t and 1 - beta2^t, as torch's Adam does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class Yogi(torch.optim.Optimizer):
    """Yogi (Zaheer et al. 2018). Args as torch.optim.Adam's, plus the initial v."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
        initial_accumulator_value: float = 0.0,
        bias_correction: bool = False,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"Yogi needs lr > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Yogi needs betas in [0, 1), got {betas}")
        if not eps > 0 or initial_accumulator_value < 0:
            raise ValueError(
                f"Yogi needs eps > 0 and initial_accumulator_value >= 0, "
                f"got {eps} and {initial_accumulator_value}"
            )
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "bias_correction": bias_correction,
            "initial_accumulator_value": initial_accumulator_value,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.full_like(p, group["initial_accumulator_value"])
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                g2 = g * g
                v.addcmul_(torch.sign(v - g2), g2, value=-(1 - beta2))
                if group["bias_correction"]:
                    t = float(state["step"])
                    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
                else:
                    m_hat, v_hat = m, v
                p.addcdiv_(m_hat, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])
        return loss
