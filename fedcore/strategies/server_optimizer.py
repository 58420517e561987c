"""Server optimizers: a `torch.optim` optimizer stepping the global model on the pseudo-gradient.

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan, 2021, "Adaptive Federated
Optimization" (ICLR), Algorithm 1 (FedOpt): the server treats the round's average change of the
model as a gradient. With x the global model and y the (weighted) average of the workers' models,
the pseudo-gradient is g = x - y = -Delta; a server optimizer steps x on g. `ServerOptimizer` owns
the global model's tensors across rounds so that the optimizer's state persists. The optimizers:

- SGD (`server_sgd`): lr 1 without momentum gives back y (FedAvg); with momentum it is FedAvgM
  (Hsu et al. 2019: v <- beta v + Delta, x <- x + eta v; torch's first step sets v = g, as Hsu et
  al. start from v = 0), and `nesterov` steps on g + beta v instead.
- Adam (`server_adam`), FedAdam in Algorithm 2, tau as Adam's eps:
      m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
      v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2          (m_{-1} = 0, v_{-1} >= tau^2)
      x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
  `torch.optim.Adam(lr=eta, betas=(beta1, beta2), eps=tau)` differs in two places: it starts from
  v_{-1} = 0, and it bias-corrects, stepping eta m_hat / (sqrt(v_hat) + tau) with m_hat = m_t / b1,
  v_hat = v_t / b2, b1 = 1 - beta1^(t+1), b2 = 1 - beta2^(t+1). Early on that is a much larger
  step (step 1: about eta * sign(Delta), where the paper's is about eta (1 - beta1) Delta /
  (sqrt(1 - beta2) |Delta| + tau), a tenth of it with the usual betas). Decision:
  `bias_correction=False` gives the paper's update exactly, still with torch's Adam: v_{-1} = tau^2
  (the paper's smallest allowed value) is set in the optimizer's state, and before each step the
  step's lr and eps are set to eta b1 / sqrt(b2) and tau / sqrt(b2), which turns torch's
  (lr / b1) m / (sqrt(v) / sqrt(b2) + eps) into eta m / (sqrt(v) + tau). `bias_correction=True`
  is torch's Adam unchanged (v_{-1} = 0, bias-corrected moments).
- Yogi (`server_yogi`, the `Yogi` class below, as torch has none), FedYogi in Algorithm 2: Adam
  whose second moment moves additively, v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} -
  Delta_t^2), by at most (1 - beta2) Delta_t^2 per round (Zaheer, Reddi, Sachan, Kale, Kumar,
  2018, "Adaptive Methods for Nonconvex Optimization", NeurIPS). Without bias correction it is the
  paper's update from v_{-1} = tau^2; with it, both moments are corrected as torch's Adam does,
  from v_{-1} = 0.
- Adagrad (`server_adagrad`), FedAdagrad in Algorithm 2: v_t = v_{t-1} + Delta_t^2 and x_{t+1} =
  x_t + eta m_t / (sqrt(v_t) + tau). `torch.optim.Adagrad(lr=eta, eps=tau,
  initial_accumulator_value=tau^2)` is that update with v_{-1} = tau^2 (so that FedAdam, FedYogi
  and FedAdagrad all start from the same v) and m_t = Delta_t, i.e. beta1 = 0: Algorithm 2 also
  keeps a first moment for FedAdagrad, torch's Adagrad has none, so beta1 is not offered (beta1 = 0
  is the setting of the paper's convergence analysis). Adagrad has no bias correction to differ on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..model import Weights
from .aggregate import pseudo_gradient

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
BeforeStep = Callable[[torch.optim.Optimizer], None]


class ServerOptimizer:
    """Steps the floating-point tensors of the global model; the rest take the average as is.

    Args:
        kind: what the record calls it, e.g. "torch.optim.SGD".
        make: builds the torch optimizer over the model's tensors (once, on the first step).
        hyper: the optimizer's parameters, for the record.
        before_step: called with the optimizer before every step (FedAdam's bias-correction
            compensation sets the step's lr and eps there).
    """

    def __init__(
        self,
        kind: str,
        make: OptimizerFactory,
        hyper: Mapping[str, object],
        before_step: BeforeStep | None = None,
    ) -> None:
        self.kind = kind
        self._make = make
        self._hyper = dict(hyper)
        self._before_step = before_step
        self._names: list[str] = []
        self._tensors: list[torch.Tensor] = []
        self._opt: torch.optim.Optimizer | None = None
        self._loaded: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None

    def step(
        self, global_weights: Mapping[str, torch.Tensor], average: Mapping[str, torch.Tensor]
    ) -> Weights:
        """The next global weights: one optimizer step from `global_weights` on global - average.

        Raises:
            ValueError: the model's floating-point tensors are not those of the first step.
        """
        names = [k for k, t in global_weights.items() if t.is_floating_point()]
        if self._opt is None:
            self._start(names, global_weights)
        elif names != self._names:
            raise ValueError(
                f"the model's tensors changed between rounds: had {len(self._names)}, "
                f"now {len(names)} ({sorted(set(names) ^ set(self._names))[:5]} differ)"
            )
        opt = self._opt
        assert opt is not None
        grads = pseudo_gradient(global_weights, average, names)
        with torch.no_grad():
            for name, t in zip(names, self._tensors, strict=True):
                # The flow hands back what we returned last round; after a resume it may differ.
                t.copy_(global_weights[name])
                t.grad = grads[name].to(t.dtype)
        if self._before_step is not None:
            self._before_step(opt)
        opt.step()
        stepped = {name: t.detach().clone() for name, t in zip(names, self._tensors, strict=True)}
        return {k: stepped[k] if k in stepped else average[k].clone() for k in global_weights}

    def _start(self, names: list[str], global_weights: Mapping[str, torch.Tensor]) -> None:
        self._names = names
        self._tensors = [
            torch.nn.Parameter(global_weights[k].detach().clone(), requires_grad=False)
            for k in names
        ]
        self._opt = self._make(self._tensors)
        if self._loaded is not None:
            tensors, values = self._loaded
            self._loaded = None
            self._load_into_optimizer(tensors, values)

    def params(self) -> dict[str, object]:
        """The optimizer and its parameters, prefixed `server_`, for the record."""
        return {"server_optimizer": self.kind, **{f"server_{k}": v for k, v in self._hyper.items()}}

    # -- resume ----------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The optimizer's state: (`<tensor>/<key>` -> tensor, `<tensor>/<key>` -> other value)."""
        if self._opt is None:
            if self._loaded is not None:
                return dict(self._loaded[0]), dict(self._loaded[1])
            return {}, {}
        tensors: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        for name, t in zip(self._names, self._tensors, strict=True):
            for key, value in self._opt.state.get(t, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value.detach().clone()
                elif value is not None:
                    values[f"{name}/{key}"] = value
        return tensors, values

    def load_state_dict(
        self, tensors: Mapping[str, torch.Tensor], values: Mapping[str, Any]
    ) -> None:
        """Restore `state_dict()`'s output (applied when the model's tensors are first seen).

        Raises:
            ValueError: the state names a tensor the model does not have.
        """
        if self._opt is None:
            self._loaded = (dict(tensors), dict(values))
        else:
            self._load_into_optimizer(tensors, values)

    def _load_into_optimizer(
        self, tensors: Mapping[str, torch.Tensor], values: Mapping[str, Any]
    ) -> None:
        assert self._opt is not None
        if not tensors and not values:
            return  # saved before the first step: keep the optimizer's initial state
        index = {name: i for i, name in enumerate(self._names)}
        state: dict[int, dict[str, Any]] = {}
        for key, value in [*tensors.items(), *values.items()]:
            name, _, field = key.rpartition("/")
            if name not in index:
                raise ValueError(f"server optimizer state names unknown tensor {name!r}")
            state.setdefault(index[name], {})[field] = value
        current = self._opt.state_dict()
        self._opt.load_state_dict({"state": state, "param_groups": current["param_groups"]})


# -- the optimizers -------------------------------------------------------------------------


def server_sgd(lr: float, momentum: float, nesterov: bool) -> ServerOptimizer:
    """torch.optim.SGD as a server optimizer (no dampening, no weight decay)."""

    def make(tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(tensors, lr=lr, momentum=momentum, nesterov=nesterov)

    return ServerOptimizer(
        "torch.optim.SGD", make, {"lr": lr, "momentum": momentum, "nesterov": nesterov}
    )


def initial_v(tau: float, bias_correction: bool) -> float:
    """v_{-1} of an Adam-like optimizer: tau^2 (Reddi et al.), or 0 with torch's bias correction."""
    return 0.0 if bias_correction else tau * tau


def adaptive_hyper(
    lr: float, beta1: float, beta2: float, tau: float, bias_correction: bool
) -> dict[str, object]:
    """The record of an Adam-like server optimizer."""
    return {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "tau": tau,
        "bias_correction": bias_correction,
        "v_init": initial_v(tau, bias_correction),
    }


def optimizer_step_count(opt: torch.optim.Optimizer) -> int:
    """How many steps `opt` has taken (from the `step` entry of its state; 0 before the first)."""
    for state in opt.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def server_adam(
    lr: float, beta1: float, beta2: float, tau: float, bias_correction: bool
) -> ServerOptimizer:
    """torch.optim.Adam as a server optimizer; Reddi et al.'s update unless `bias_correction`."""

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

    hyper = adaptive_hyper(lr, beta1, beta2, tau, bias_correction)
    return ServerOptimizer(
        "torch.optim.Adam", make, hyper, None if bias_correction else undo_bias_correction
    )


def server_yogi(
    lr: float, beta1: float, beta2: float, tau: float, bias_correction: bool
) -> ServerOptimizer:
    """Yogi as a server optimizer; Reddi et al.'s update unless `bias_correction`."""

    def make(tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        return Yogi(
            tensors,
            lr=lr,
            betas=(beta1, beta2),
            eps=tau,
            initial_accumulator_value=initial_v(tau, bias_correction),
            bias_correction=bias_correction,
        )

    hyper = adaptive_hyper(lr, beta1, beta2, tau, bias_correction)
    return ServerOptimizer(f"{__name__}.Yogi", make, hyper)


def server_adagrad(lr: float, tau: float) -> ServerOptimizer:
    """torch.optim.Adagrad as a server optimizer, from v_{-1} = tau^2."""

    def make(tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adagrad(tensors, lr=lr, eps=tau, initial_accumulator_value=tau * tau)

    return ServerOptimizer(
        "torch.optim.Adagrad", make, {"lr": lr, "tau": tau, "v_init": tau * tau, "beta1": 0.0}
    )


class Yogi(torch.optim.Optimizer):
    """Yogi (Zaheer et al. 2018), written once since torch lacks it. Args as torch.optim.Adam's.

    With t the step, m_t = beta1 m_{t-1} + (1 - beta1) g_t, v_t = v_{t-1} - (1 - beta2) g_t^2
    sign(v_{t-1} - g_t^2), x_{t+1} = x_t - lr m_t / (sqrt(v_t) + eps), from v_0 =
    `initial_accumulator_value`; `bias_correction=True` divides m_t and v_t by 1 - beta1^t and
    1 - beta2^t, as torch's Adam does.

    Raises:
        ValueError: lr <= 0, a beta outside [0, 1), eps <= 0 or a negative initial v.
    """

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
