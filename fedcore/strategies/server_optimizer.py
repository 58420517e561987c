"""A server optimizer: a `torch.optim` optimizer stepping the global model on the pseudo-gradient.

Reddi et al., 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 1 (FedOpt): the server
treats the round's average change of the model as a gradient. With x the global model and
y the (weighted) average of the workers' models, the pseudo-gradient is g = x - y; a server
optimizer then steps x on g. Plain SGD with lr 1 gives back y (FedAvg); SGD with momentum is
FedAvgM; Adam, Adagrad and Yogi are FedAdam, FedAdagrad and FedYogi. The optimizers are torch's
own (only Yogi, which torch lacks, is written here, in yogi.py): this class owns the global
model's tensors across rounds so that the optimizer's state (momentum buffers, moments) persists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .aggregate import Weights, pseudo_gradient

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
BeforeStep = Callable[[torch.optim.Optimizer], None]


class ServerOptimizer:
    """Steps the floating-point tensors of the global model; the rest take the average as is.

    Args:
        kind: what the record calls it, e.g. "sgd".
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

    def step(self, global_weights: Weights, average: Weights) -> dict[str, torch.Tensor]:
        """The next global weights: one optimizer step from `global_weights` on global - average."""
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

    def _start(self, names: list[str], global_weights: Weights) -> None:
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
        """Restore `state_dict()`'s output (applied when the model's tensors are first seen)."""
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
