"""The arithmetic of aggregation, as pure functions on named tensors (no strategy state here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..model import Weights


def weighted_mean(
    models: Sequence[Mapping[str, torch.Tensor]], coefficients: Sequence[float]
) -> Weights:
    """sum_i c_i w_i / sum_i c_i, tensor by tensor (computed in float64, returned in each dtype).

    Raises:
        ValueError: no models, a coefficient count that differs, or coefficients not summing > 0.
    """
    if not models:
        raise ValueError("weighted_mean needs at least one model")
    if len(models) != len(coefficients):
        raise ValueError(f"{len(models)} models but {len(coefficients)} coefficients")
    total = float(sum(coefficients))
    if not total > 0:
        raise ValueError(f"coefficients must sum to a positive number, got {total}")
    out = {}
    for name, first in models[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for model, c in zip(models, coefficients, strict=True):
            acc.add_(model[name].to(torch.float64), alpha=float(c) / total)
        out[name] = acc.to(first.dtype)
    return out


def pseudo_gradient(
    global_weights: Mapping[str, torch.Tensor],
    average: Mapping[str, torch.Tensor],
    names: Sequence[str],
) -> Weights:
    """global - average for each of `names`: the direction a server optimizer descends."""
    return {k: global_weights[k] - average[k] for k in names}


def floating_spec(
    weights: Mapping[str, torch.Tensor],
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the floating-point tensors of `weights` (what optimizers step)."""
    return {k: (tuple(t.shape), t.dtype) for k, t in weights.items() if t.is_floating_point()}


def mean_over(
    tensor_sets: Sequence[Mapping[str, torch.Tensor]], count: int, spec: Mapping[str, tuple]
) -> Weights:
    """sum_j t_j / count, tensor by tensor (float64 sum); zeros of `spec` where the sets are none.

    With `count` the population N and `tensor_sets` the control variates on record, this is
    SCAFFOLD's server control variate c = (1/N) sum_j c_j.

    Raises:
        ValueError: `count` is below the number of sets.
    """
    if count < max(len(tensor_sets), 1):
        raise ValueError(f"count {count} is below the {len(tensor_sets)} sets averaged")
    out = {}
    for name, (shape, dtype) in spec.items():
        acc = torch.zeros(shape, dtype=torch.float64)
        for tensors in tensor_sets:
            acc.add_(tensors[name].to(torch.float64))
        out[name] = (acc / count).to(dtype)
    return out
