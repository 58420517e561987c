"""The arithmetic of aggregation, as pure functions on named tensors (no strategy state here)."""

from __future__ import annotations

import math
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


def update_norm(model: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
    """||model - base||_2 over all tensors (in float64): how far an update moved the model."""
    total = 0.0
    for k, t in model.items():
        total += float((t.double() - base[k].double()).pow(2).sum())
    return math.sqrt(total)


def median(values: Sequence[float]) -> float:
    """The median of `values` (the mean of the two middle ones for an even count); NaN for none."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


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


# -- robust combine rules (fedcore.strategies.robust says where each comes from) --------------


def _stacked(models: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    """Tensor `name` of every model, stacked along a new first dimension, in float64."""
    return torch.stack([m[name].to(torch.float64) for m in models])


def coordinate_median(models: Sequence[Mapping[str, torch.Tensor]]) -> Weights:
    """The median of each coordinate over the models (the mean of the two middle values for an
    even count, so two models give their mean), returned in each tensor's dtype.

    Raises:
        ValueError: no models.
    """
    if not models:
        raise ValueError("coordinate_median needs at least one model")
    n = len(models)
    out = {}
    for name, first in models[0].items():
        ordered = _stacked(models, name).sort(dim=0).values
        mid = n // 2
        value = ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
        out[name] = value.to(first.dtype)
    return out


def trim_count(n: int, beta: float) -> int:
    """How many values a beta-trimmed mean drops at EACH end of n: floor(beta n), kept below
    n / 2 so that at least one value remains (the 1e-9 absorbs float error: beta 1/3, n 3 -> 1).

    Raises:
        ValueError: beta outside [0, 0.5).
    """
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed mean needs 0 <= beta < 0.5, got {beta}")
    return min(math.floor(beta * n + 1e-9), (n - 1) // 2)


def trimmed_mean(models: Sequence[Mapping[str, torch.Tensor]], beta: float) -> Weights:
    """Per coordinate, the mean of the models' values after dropping the `trim_count(n, beta)`
    largest and as many smallest, returned in each tensor's dtype.

    Raises:
        ValueError: no models, or beta outside [0, 0.5).
    """
    if not models:
        raise ValueError("trimmed_mean needs at least one model")
    k = trim_count(len(models), beta)
    out = {}
    for name, first in models[0].items():
        ordered = _stacked(models, name).sort(dim=0).values
        out[name] = ordered[k : len(models) - k].mean(dim=0).to(first.dtype)
    return out


def clip_to_norm(
    model: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], norm: float, bound: float
) -> Weights:
    """`model` moved back towards `base` so that its distance from it (`norm`, the caller's
    ||model - base||_2) is at most `bound`: base + (model - base) min(1, bound / norm).

    A model within the bound is returned as is (the same tensors). Only floating-point tensors
    move; any other tensor is kept.
    """
    if norm <= bound:
        return dict(model)
    scale = bound / norm
    return {
        k: (
            base[k].to(torch.float64) + (t.to(torch.float64) - base[k].to(torch.float64)) * scale
        ).to(t.dtype)
        if t.is_floating_point()
        else t
        for k, t in model.items()
    }
