"""Evaluation: accuracy, average loss, confusion matrix and the share of predictions per group.

The seed printed, per model, the share of test predictions falling in each worker's digit group
(0-3 / 4-6 / 7-9), the average loss and the accuracy. Its loss figure was the sum of per-batch mean
losses divided by the number of images (batches of 128): `seed_loss` reproduces that scale next to
the plain per-image `loss`. Runs on the device (Python 3.8, torch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SEED_LOSS_BATCH = 128


@dataclass(frozen=True)
class EvalResult:
    """Scores of one model on one evaluation set."""

    correct: int
    total: int
    loss: float
    seed_loss: float
    confusion: List[List[int]]  # confusion[true][predicted]
    group_shares: List[float]  # share of predictions in each group, in group order

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def per_digit_accuracy(self) -> List[float]:
        out = []
        for d, row in enumerate(self.confusion):
            n = sum(row)
            out.append(row[d] / n if n else float("nan"))
        return out

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> EvalResult:
        return cls(
            correct=int(raw["correct"]),
            total=int(raw["total"]),
            loss=float(raw["loss"]),
            seed_loss=float(raw["seed_loss"]),
            confusion=[[int(v) for v in row] for row in raw["confusion"]],
            group_shares=[float(v) for v in raw["group_shares"]],
        )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    groups: Sequence[Sequence[int]],
    batch_size: int = 500,
) -> EvalResult:
    """Score `model` on (images, labels); `groups` are the digit groups to report shares for."""
    model.eval()
    losses = []
    preds = []
    for i in range(0, labels.numel(), batch_size):
        out = model(images[i : i + batch_size])
        losses.append(F.nll_loss(out, labels[i : i + batch_size], reduction="none"))
        preds.append(out.argmax(dim=1))
    loss = torch.cat(losses).double().cpu()
    pred = torch.cat(preds).cpu()
    y = labels.cpu()
    n = y.numel()
    chunk_means = torch.stack([c.mean() for c in loss.split(SEED_LOSS_BATCH)])
    confusion = torch.bincount(y * 10 + pred, minlength=100).view(10, 10)
    per_pred = confusion.sum(dim=0)
    shares = [float(per_pred[list(g)].sum()) / n for g in groups]
    return EvalResult(
        correct=int((pred == y).sum()),
        total=n,
        loss=float(loss.mean()),
        seed_loss=float(chunk_means.sum() / n),
        confusion=confusion.tolist(),
        group_shares=shares,
    )
