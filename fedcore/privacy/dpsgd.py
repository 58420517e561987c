"""DP-SGD's gradient for one local step: per-example gradients, clipped, summed, noised, averaged.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, 2016, "Deep Learning with Differential
Privacy" (CCS), Algorithm 1. For a batch B of a device's examples:

    g_i   = grad of loss(x_i, y_i)                       per example (torch.func: vmap of grad)
    g_i  <- g_i / max(1, ||g_i|| / C)                    each clipped to L2 norm C, over all params
    g     = (sum_i g_i + N(0, sigma^2 C^2 I)) / L        L: the expected batch size

`dp_backward` does this where a training step would call `loss.backward()`: it leaves the noisy
gradient in every parameter's `.grad`, so the optimizer step, momentum, weight decay, FedProx's
proximal gradient and SCAFFOLD's correction after it are unchanged. They depend only on the
weights (which are already differentially private), so they cost no privacy.

The guarantee the accountant states (fedcore.privacy.accountant, Poisson-subsampled Gaussian)
assumes each example joins each batch independently with probability q = L / n:
`poisson_batches` draws batches that way. Both the batches and the noise must come from a
generator the coordinator cannot predict: seed it from `os.urandom` on the device
(`secret_generator`), never from the experiment's derived seeds, which the coordinator knows:
it could subtract known noise, and subsampling only amplifies privacy while the sample is
secret. torch's generator is not a cryptographic one; this is the usual DP-SGD practice
(Opacus without secure_mode).

Needs torch >= 2.0 (`torch.func`); `dpsgd_available()` says so. Runs on the device (Python 3.8,
torch only).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dpsgd_available() -> Tuple[bool, str]:
    """(True, torch version) when this torch has `torch.func`, else (False, why and the fix)."""
    try:
        import torch.func  # noqa: F401
    except ImportError:
        return False, f"DP-SGD needs torch >= 2.0 (torch.func); this is torch {torch.__version__}"
    return True, f"torch {torch.__version__}"


def secret_generator(device: str = "cpu") -> torch.Generator:
    """A generator seeded from the operating system's entropy, for DP noise."""
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    return g


def per_example_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """({param name: [batch, *param shape]}, per-example losses) for the trainable parameters.

    Each example's loss is `loss_fn(model(x_i[None]), y_i[None])`, its gradient taken with
    torch.func (functional_call + vmap(grad)): one batched pass, no Python loop.
    """
    from torch.func import functional_call, grad_and_value, vmap

    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss_one(p: Dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**p, **frozen, **buffers}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    grads, losses = vmap(grad_and_value(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return grads, losses


def clip_and_sum(
    grads: Dict[str, torch.Tensor], max_grad_norm: float
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """(sum over the batch of each example's gradient clipped to L2 norm C, norms before).

    An example's norm is over all its parameters together, as in Abadi et al.
    """
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    flat = [g.reshape(g.shape[0], -1) for g in grads.values()]
    norms = torch.linalg.vector_norm(torch.cat(flat, dim=1), dim=1)
    factor = (max_grad_norm / (norms + 1e-12)).clamp(max=1.0)
    summed = {k: torch.einsum("b,b...->...", factor, g) for k, g in grads.items()}
    return summed, norms


def add_noise(
    summed: Dict[str, torch.Tensor],
    max_grad_norm: float,
    noise_multiplier: float,
    denominator: float,
    generator: torch.Generator,
) -> Dict[str, torch.Tensor]:
    """(sum + N(0, (noise_multiplier * C)^2)) / denominator, per entry."""
    if noise_multiplier < 0 or not denominator > 0:
        raise ValueError(
            f"need noise_multiplier >= 0 and denominator > 0: {noise_multiplier}, {denominator}"
        )
    std = noise_multiplier * max_grad_norm
    out = {}
    for k, s in summed.items():
        noise = torch.randn(s.shape, generator=generator, dtype=s.dtype, device=generator.device)
        out[k] = (s + std * noise.to(s.device)) / denominator
    return out


def dp_backward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    expected_batch_size: Optional[float] = None,
) -> torch.Tensor:
    """DP-SGD in place of `loss.backward()`: every trainable parameter's `.grad` is set to the
    noisy mean of the clipped per-example gradients. Returns the batch's mean loss (detached).

    Args:
        expected_batch_size: L, the divisor; default the batch's size (right for fixed-size
            batches; with `poisson_batches` pass q * n, so an empty or large batch is not
            reweighted by its own size, which would depend on the data).
    """
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    denominator = float(expected_batch_size if expected_batch_size is not None else max(len(y), 1))
    if len(y) == 0:
        summed = {k: torch.zeros_like(p) for k, p in params.items()}
        loss = torch.zeros((), device=x.device)
    else:
        grads, losses = per_example_gradients(model, x, y, loss_fn)
        summed, _ = clip_and_sum(grads, max_grad_norm)
        loss = losses.mean()
    noisy = add_noise(summed, max_grad_norm, noise_multiplier, denominator, generator)
    for k, p in params.items():
        p.grad = noisy[k].to(p.dtype)
    return loss.detach()


def poisson_batches(
    n: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """`steps` batches of indices into n examples, each example in each batch independently with
    probability `sample_rate` (the sampling the accountant's guarantee assumes)."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    for _ in range(steps):
        keep = torch.rand(n, generator=generator) < sample_rate
        yield keep.nonzero().reshape(-1)
