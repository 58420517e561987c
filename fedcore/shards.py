"""Shard specs: which part of MNIST a worker holds.

A shard is either a set of labels of one split (the seed: alice 0-3, bob 4-6, charlie 7-9; the
evaluator: every label of the test split) or one of `count` IID parts of a split. A spec travels to
the worker as JSON; the worker loads only the images it names. Runs on the device (Python 3.8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Tuple

from .errors import ShardError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ShardSpec:
    """What a worker holds: a split, and either a label set or an IID part."""

    split: str = "train"
    labels: Optional[Tuple[int, ...]] = None
    iid_index: Optional[int] = None
    iid_count: Optional[int] = None
    iid_seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ShardError(f"shard split {self.split!r} is not one of {SPLITS}")
        if self.labels is not None and self.iid_count is not None:
            raise ShardError("a shard takes either labels or an IID part, not both")
        if self.labels is not None:
            if not self.labels or any(not 0 <= d <= 9 for d in self.labels):
                raise ShardError(f"shard labels {list(self.labels)} must be digits 0-9")
        if self.iid_count is not None:
            if self.iid_index is None or not 0 <= self.iid_index < self.iid_count:
                raise ShardError(
                    f"IID part {self.iid_index} of {self.iid_count}: index must be in "
                    f"0..{self.iid_count - 1}"
                )

    @classmethod
    def by_labels(cls, labels, split: str = "train") -> ShardSpec:
        return cls(split=split, labels=tuple(sorted(int(d) for d in labels)))

    @classmethod
    def iid(cls, index: int, count: int, seed: int = 0, split: str = "train") -> ShardSpec:
        return cls(split=split, iid_index=index, iid_count=count, iid_seed=seed)

    def describe(self) -> str:
        if self.labels is not None:
            return f"{self.split} digits {format_labels(self.labels)}"
        if self.iid_count is not None and self.iid_index is not None:
            return f"{self.split} IID part {self.iid_index + 1}/{self.iid_count}"
        return f"all of {self.split}"

    def to_json(self) -> str:
        return json.dumps(
            {
                "split": self.split,
                "labels": list(self.labels) if self.labels is not None else None,
                "iid_index": self.iid_index,
                "iid_count": self.iid_count,
                "iid_seed": self.iid_seed,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ShardSpec:
        raw = json.loads(text)
        labels = raw.get("labels")
        return cls(
            split=raw.get("split", "train"),
            labels=tuple(labels) if labels is not None else None,
            iid_index=raw.get("iid_index"),
            iid_count=raw.get("iid_count"),
            iid_seed=int(raw.get("iid_seed", 0)),
        )


def format_labels(labels) -> str:
    """`(0, 1, 2, 3)` -> `'0-3'`; `(1, 5, 6)` -> `'1,5-6'`."""
    digits = sorted(labels)
    parts = []
    start = prev = digits[0]
    for d in digits[1:] + [None]:
        if d is not None and d == prev + 1:
            prev = d
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if d is not None:
            start = prev = d
    return ",".join(parts)
