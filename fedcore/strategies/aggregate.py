"""The arithmetic of aggregation, as pure functions on named tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Weights = Mapping[str, torch.Tensor]


def weighted_mean(models: Sequence[Weights], coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i c_i * w_i / sum_i c_i, tensor by tensor (computed in float64, returned in each dtype)."""
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
        for model, c in zip(models, coefficients):
            acc.add_(model[name].to(torch.float64), alpha=float(c) / total)
        out[name] = acc.to(first.dtype)
    return out
