"""The seed's console lines, as pure functions of results (callers decide where they go)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .evaluation import EvalResult
from .shards import format_labels


def available_numbers(worker: str, split: str, counts: Mapping[int, int]) -> str:
    """`MNIST dataset (train set), available numbers on alice: 0: 5923, 1: 6742, ...`"""
    listed = ", ".join(f"{d}: {n}" for d, n in sorted(counts.items()))
    return f"MNIST dataset ({split} set), available numbers on {worker}: {listed}"


def model_label(model: str) -> str:
    """`federated` -> `Federated model`; a worker's name -> `Model update alice`."""
    return "Federated model" if model == "federated" else f"Model update {model}"


def evaluation_lines(model: str, result: EvalResult, groups: Sequence[Sequence[int]]) -> list[str]:
    """The seed's two lines for one evaluated model: prediction shares, then loss and accuracy."""
    label = model_label(model)
    lines = []
    if groups:
        shares = ", ".join(
            f"{format_labels(g)}: {100 * s:.0f}%" for g, s in zip(groups, result.group_shares)
        )
        lines.append(f"{label}: Percentage numbers {shares}")
    lines.append(
        f"{label}: Average loss: {result.seed_loss:.4f}, Accuracy: {result.correct}/{result.total} "
        f"({100 * result.accuracy:.2f}%)"
    )
    return lines
