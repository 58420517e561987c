"""Fakes shared by the tracking tests: evaluation results over known digit groups, a closed port."""

from __future__ import annotations

import socket

from fedcore.evaluation import EvalResult

GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def fake_result(correct_per_digit: list[int], per_digit: int = 10) -> EvalResult:
    """A result over `per_digit` images of each digit; misses are predicted as digit 0 (or 1)."""
    confusion = [[0] * 10 for _ in range(10)]
    for d, ok in enumerate(correct_per_digit):
        confusion[d][d] = ok
        confusion[d][1 if d == 0 else 0] += per_digit - ok
    total = per_digit * len(correct_per_digit)
    preds = [sum(confusion[t][p] for t in range(10)) for p in range(10)]
    shares = [sum(preds[d] for d in g) / total for g in GROUPS]
    return EvalResult(
        correct=sum(correct_per_digit),
        total=total,
        loss=0.5,
        seed_loss=0.004,
        confusion=confusion,
        group_shares=shares,
    )


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
