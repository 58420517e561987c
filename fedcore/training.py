"""Local training: (weights, shard, plan, generator) -> (weights, metrics), nothing else.

One round of a worker is `plan.steps` minibatches of `plan.batch_size` images drawn from a fresh
permutation of its shard (the seed's shuffled loader, cut after `steps` batches), each a step of
SGD. Optional pieces a strategy switches on through the plan: momentum and weight decay, label
smoothing, a FedProx proximal term (Li et al., 2020) and a gradient correction (SCAFFOLD's c - c_i,
Karimireddy et al., 2020). A pacer (fedcore.pacing) may sleep after each step to make a device
slower or steady; it changes no number.

With `dp_noise_multiplier` > 0 the round is DP-SGD (fedcore.privacy.dpsgd; Abadi et al., 2016):
Poisson-sampled batches of expected size `batch_size`, each example's gradient clipped to
`dp_max_grad_norm`, Gaussian noise added; batches and noise come from the device's own entropy,
never from the round's seed, which the coordinator knows. Off, not one number changes.
Runs on the device (Python 3.8, torch).
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .compression import codecs
from .errors import WireError
from .pacing import Pacer
from .wire import text


@dataclass(frozen=True)
class TrainPlan:
    """What one worker does in one round. Sent by the coordinator with every train request."""

    steps: int = 10
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    prox_mu: float = 0.0  # FedProx: adds 0.5 * prox_mu * ||w - w_global||^2 to the loss
    scaffold: bool = False  # SCAFFOLD: the request carries control variates (local_algorithms)
    # Update compression (fedcore.compression.SCHEMES): how the global model travels to the worker
    # and the worker's delta back; topk_fraction is top-k's share of each tensor (topk only).
    compression: str = "none"
    topk_fraction: float = 0.0
    # DP-SGD (fedcore.privacy.dpsgd): each example's gradient clipped to dp_max_grad_norm,
    # Gaussian noise of dp_noise_multiplier times that, Poisson-sampled batches of expected size
    # batch_size, from a generator seeded on the device; dp_noise_multiplier 0: off
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        """The plan as a train request carries it. Without compression the two compression
        fields are left out, so the request is byte for byte what it was before they existed
        (and a worker that predates them reads it); with it, such a worker refuses the plan's
        unknown field by name instead of sending weights the coordinator cannot decode."""
        out = asdict(self)
        if self.compression == "none":
            del out["compression"]
        if self.compression != "topk":
            del out["topk_fraction"]
        if self.dp_noise_multiplier == 0:
            del out["dp_noise_multiplier"], out["dp_max_grad_norm"]
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainPlan:
        """Refuses unknown keys and wrong types (the plan comes from the network)."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise WireError(f"train plan has unknown fields {unknown}")
        values: Dict[str, Any] = {}
        for name, value in raw.items():
            if known[name] in ("str", str):
                values[name] = text(value, f"train plan field {name!r}", 16)
                continue
            if known[name] in ("bool", bool):
                if not isinstance(value, bool):
                    raise WireError(
                        f"train plan field {name!r} must be true or false, got {value!r}"
                    )
                values[name] = value
                continue
            want = int if known[name] in ("int", int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise WireError(f"train plan field {name!r} must be a number, got {value!r}")
            if want is int and not isinstance(value, int):
                raise WireError(f"train plan field {name!r} must be an integer, got {value!r}")
            values[name] = want(value)
        plan = cls(**values)
        if plan.steps < 1 or plan.batch_size < 1 or not plan.lr > 0:
            raise WireError(f"train plan needs steps >= 1, batch_size >= 1, lr > 0: {plan}")
        if not 0 <= plan.prox_mu < float("inf"):
            raise WireError(f"train plan needs a finite prox_mu >= 0, got {plan.prox_mu}")
        if not (0 <= plan.dp_noise_multiplier < 1e6 and 0 <= plan.dp_max_grad_norm < 1e6):
            raise WireError(f"train plan needs finite DP parameters >= 0: {plan}")
        if plan.dp_noise_multiplier > 0 and not plan.dp_max_grad_norm > 0:
            raise WireError("train plan with dp_noise_multiplier needs dp_max_grad_norm > 0")
        if plan.dp_noise_multiplier > 0:
            from .privacy.dpsgd import dpsgd_available

            ok, why = dpsgd_available()
            if not ok:  # refused before training, by name, rather than failing mid-round
                raise WireError(f"train plan asks for DP-SGD, which this device cannot run: {why}")
        codecs(plan.compression)  # an unknown scheme is a WireError naming the known ones
        if plan.compression == "topk" and not 0 < plan.topk_fraction <= 1:
            raise WireError(f"train plan needs a topk_fraction in (0, 1], got {plan.topk_fraction}")
        if plan.compression != "topk" and plan.topk_fraction != 0:
            raise WireError(
                f"train plan has topk_fraction {plan.topk_fraction} but compression "
                f"{plan.compression!r}: only topk takes a fraction"
            )
        return plan


@dataclass(frozen=True)
class TrainMetrics:
    """What a worker reports about one round of local training."""

    loss: float
    samples: int
    steps: int
    seconds: float


def batch_indices(n: int, steps: int, batch_size: int, generator: torch.Generator):
    """`steps` index batches from shuffled passes over `n` items (a new permutation per pass)."""
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n and pos > 0:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    plan: TrainPlan,
    generator: torch.Generator,
    grad_correction: Optional[Mapping[str, torch.Tensor]] = None,
    pacer: Optional[Pacer] = None,
) -> TrainMetrics:
    """Train `model` in place for one round; return the mean training loss and counts.

    Args:
        model: the model holding the round's global weights, on the device the data is on.
        images, labels: the worker's shard.
        plan: steps, batch size, learning rate and the optional terms.
        generator: seeded generator that fixes the minibatch order.
        grad_correction: name -> tensor added to each parameter's gradient before a step.
        pacer: paces each step (fedcore.pacing: a slowed or steady device); it only sleeps, so
            the numbers are those of an unpaced round. None: no pacing, no cost.
    """
    start = time.perf_counter()
    model.train()
    params = dict(model.named_parameters())
    anchor = {k: p.detach().clone() for k, p in params.items()} if plan.prox_mu > 0 else None
    opt = torch.optim.SGD(
        model.parameters(), lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay
    )
    total = torch.zeros((), dtype=torch.float64)
    samples = 0
    if pacer is not None:
        pacer.begin()
    dp = plan.dp_noise_multiplier > 0
    if dp:
        from .privacy.dpsgd import dp_backward, poisson_batches, secret_generator

        # never `generator`: it comes from the round's derived seed, which the coordinator knows
        secret = secret_generator()
        n = labels.numel()
        batches = poisson_batches(n, min(1.0, plan.batch_size / n), plan.steps, secret)
    else:
        batches = batch_indices(labels.numel(), plan.steps, plan.batch_size, generator)
    for idx in batches:
        idx = idx.to(images.device)
        x, y = images.index_select(0, idx), labels.index_select(0, idx)
        opt.zero_grad(set_to_none=True)
        if dp:
            mean = dp_backward(
                model,
                x,
                y,
                functools.partial(F.cross_entropy, label_smoothing=plan.label_smoothing),
                plan.dp_max_grad_norm,
                plan.dp_noise_multiplier,
                secret,
                expected_batch_size=plan.batch_size,
            )
            total += mean.double().cpu() * y.numel()
            if anchor is not None:  # the proximal gradient depends on weights only
                with torch.no_grad():
                    for k, p in params.items():
                        if p.grad is not None:  # dp_backward sets every trainable one's
                            p.grad.add_(p - anchor[k], alpha=plan.prox_mu)
        else:
            out = model(x)
            if plan.label_smoothing > 0:
                loss = F.cross_entropy(out, y, label_smoothing=plan.label_smoothing)
            else:
                loss = F.nll_loss(out, y)
            total += loss.detach().double().cpu() * y.numel()
            if anchor is not None:
                prox = sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())
                loss = loss + 0.5 * plan.prox_mu * prox
            loss.backward()
        if grad_correction is not None:
            with torch.no_grad():
                for k, p in params.items():
                    if p.grad is None:  # a parameter the loss does not reach still drifts
                        p.grad = grad_correction[k].clone()
                    else:
                        p.grad.add_(grad_correction[k])
        opt.step()
        samples += int(y.numel())
        if pacer is not None:
            if images.is_cuda:  # the step's kernels are queued, not done, until synchronised
                torch.cuda.synchronize(images.device)
            pacer.step()
    return TrainMetrics(
        loss=float(total / max(samples, 1)),
        samples=samples,
        steps=plan.steps,
        seconds=time.perf_counter() - start,
    )
