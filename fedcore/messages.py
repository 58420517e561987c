"""The worker protocol's messages: what the coordinator and a worker say to each other.

Typed values only, and the bounds every decoder holds a message's numbers to (rounds, counts,
digit groups); how they become frames and are read back, checked field by field, is
fedcore.protocol's, which re-exports every name here. Runs on the device (Python 3.8).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch

from .training import TrainMetrics, TrainPlan

# 2: train plans may carry `compression` (fedcore.compression). A worker says its version in its
# hello; one below COMPRESSION_PROTOCOL is never sent a compressed request (fedcore.session).
PROTOCOL_VERSION = 2
COMPRESSION_PROTOCOL = 2
Tensors = Dict[str, torch.Tensor]
CLASSES = 10  # MNIST's digits: labels, confusion rows and columns, evaluation groups' members
MAX_ROUND = 2**31 - 1
# No device holds 2^31 images; a count past it is a lie, refused before anyone weights by it.
MAX_COUNT = 2**31 - 1
MAX_GROUPS = 64  # digit groups in an evaluate request
# A hello's facts about its machine (fedcore.device_facts): at most this many, each key a short
# lower-case word (it becomes part of an MLflow tag name), each value a short text.
MAX_FACTS = 32
MAX_FACT_KEY = 32
MAX_FACT_VALUE = 256
# An update's per-round device facts: only these keys, each within its range (MiB, degrees C).
DEVICE_METRICS = {
    "rss_mb": (0.0, float(1 << 24)),
    "rss_peak_mb": (0.0, float(1 << 24)),
    "cuda_max_mb": (0.0, float(1 << 24)),
    "temp_c": (-60.0, 200.0),
}


@dataclass(frozen=True)
class Hello:
    """A worker introducing itself: who, what it holds, what it runs on."""

    worker: str
    shard: str
    label_counts: Dict[int, int]
    python: str
    torch: str
    device: str
    threads: int
    pid: int
    protocol: int = PROTOCOL_VERSION
    # A slowed or steady device (fedcore.pacing): its factor and the mechanism in force. An older
    # worker's hello has neither and reads as unpaced.
    slowdown: float = 1.0
    pacing: str = "none"
    # What it runs on beyond the fields above (fedcore.device_facts.hello_facts): CUDA device,
    # memory, `cryptography`, `torch_func`, a Jetson's model. An older worker's hello has none.
    facts: Dict[str, str] = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return sum(self.label_counts.values())


@dataclass(frozen=True)
class TrainRequest:
    """Train one round from `weights` with `plan`; `extras` are a strategy's named tensor sets."""

    round: int
    plan: TrainPlan
    sample_seed: int
    weights: Tensors
    extras: Dict[str, Tensors] = field(default_factory=dict)


@dataclass(frozen=True)
class Update:
    """What a worker returns from one round: weights, example count, metrics, extras."""

    worker: str
    round: int
    weights: Tensors
    num_examples: int
    metrics: TrainMetrics
    extras: Dict[str, Tensors] = field(default_factory=dict)
    wire_bytes: int = 0  # bytes of the request plus the reply, as sent
    wire_bytes_down: int = 0  # of which the request's (coordinator -> worker)
    # The device after the round (fedcore.device_facts.RoundProbe; keys of DEVICE_METRICS): what
    # the device does not expose is absent, never 0. An older worker's update has none.
    device: Dict[str, float] = field(default_factory=dict)


class RemoteError(Exception):
    """The worker answered with an error frame."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.error = error
        self.message = message
