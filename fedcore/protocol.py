"""The worker protocol: typed messages over wire frames.

Coordinator -> worker, each answered by exactly one frame:
  hello     -> hello (worker name, shard description, label counts, python/torch/CUDA)
  train     -> update (weights after local training, example count, metrics)
  evaluate  -> evaluation (per model: accuracy, losses, confusion, group shares)
  bye       -> bye, then the worker exits
Any request may be answered by `error` (type and message). Tensors travel in the frame's
safetensors payload, grouped by a name prefix: `global/...` (the round's model) and strategy
extras in a train request; `weights/...` and extras in an update; `<model>/...` in an evaluate
request. Runs on the device (Python 3.8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import tensorcodec, wire
from .errors import WireError
from .evaluation import EvalResult
from .training import TrainMetrics, TrainPlan

PROTOCOL_VERSION = 1
Tensors = Dict[str, torch.Tensor]


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


# -- encoding -------------------------------------------------------------------------------


def _frame(
    meta: Dict[str, Any], groups: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None
) -> bytes:
    payload = tensorcodec.dumps(wire.join_prefixed(groups)) if groups else b""
    return wire.encode_frame(meta, payload)


def _groups(payload: bytes) -> Dict[str, Tensors]:
    if not payload:
        return {}
    tensors, _ = tensorcodec.loads(payload)
    return wire.split_prefixed(tensors)


def encode_hello_request() -> bytes:
    return _frame({"type": "hello", "protocol": PROTOCOL_VERSION})


def encode_hello(h: Hello) -> bytes:
    return _frame(
        {
            "type": "hello",
            "protocol": h.protocol,
            "worker": h.worker,
            "shard": h.shard,
            "label_counts": {str(k): v for k, v in h.label_counts.items()},
            "python": h.python,
            "torch": h.torch,
            "device": h.device,
            "threads": h.threads,
            "pid": h.pid,
        }
    )


def decode_hello(meta: wire.Meta) -> Hello:
    expect(meta, "hello")
    try:
        counts = {int(k): int(v) for k, v in meta["label_counts"].items()}
        return Hello(
            worker=str(meta["worker"]),
            shard=str(meta["shard"]),
            label_counts=counts,
            python=str(meta["python"]),
            torch=str(meta["torch"]),
            device=str(meta["device"]),
            threads=int(meta["threads"]),
            pid=int(meta["pid"]),
            protocol=int(meta["protocol"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WireError(f"malformed hello: {exc!r}") from None


def encode_train(req: TrainRequest) -> bytes:
    groups = {"global": req.weights}
    groups.update(req.extras)
    return _frame(
        {
            "type": "train",
            "round": req.round,
            "plan": req.plan.to_dict(),
            "sample_seed": req.sample_seed,
        },
        groups,
    )


def decode_train(meta: wire.Meta, payload: bytes) -> TrainRequest:
    expect(meta, "train")
    groups = _groups(payload)
    weights = groups.pop("global", None)
    if weights is None:
        raise WireError("train request carries no 'global/' weights")
    rnd = wire.optional(meta, "round", int)
    seed = wire.optional(meta, "sample_seed", int)
    plan = wire.optional(meta, "plan", dict)
    if rnd is None or seed is None or plan is None:
        raise WireError("train request needs round, sample_seed and plan")
    return TrainRequest(rnd, TrainPlan.from_dict(plan), seed, weights, groups)


def encode_update(u: Update) -> bytes:
    groups = {"weights": u.weights}
    groups.update(u.extras)
    m = u.metrics
    return _frame(
        {
            "type": "update",
            "worker": u.worker,
            "round": u.round,
            "num_examples": u.num_examples,
            "metrics": {
                "loss": m.loss,
                "samples": m.samples,
                "steps": m.steps,
                "seconds": m.seconds,
            },
        },
        groups,
    )


def decode_update(meta: wire.Meta, payload: bytes, wire_bytes: int = 0) -> Update:
    expect(meta, "update")
    groups = _groups(payload)
    weights = groups.pop("weights", None)
    if weights is None:
        raise WireError("update carries no 'weights/' tensors")
    try:
        m = meta["metrics"]
        metrics = TrainMetrics(
            loss=float(m["loss"]),
            samples=int(m["samples"]),
            steps=int(m["steps"]),
            seconds=float(m["seconds"]),
        )
        return Update(
            worker=str(meta["worker"]),
            round=int(meta["round"]),
            weights=weights,
            num_examples=int(meta["num_examples"]),
            metrics=metrics,
            extras=groups,
            wire_bytes=wire_bytes,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed update: {exc!r}") from None


def encode_evaluate(
    round: int, models: Mapping[str, Mapping[str, torch.Tensor]], groups: Sequence[Sequence[int]]
) -> bytes:
    return _frame({"type": "evaluate", "round": round, "groups": [list(g) for g in groups]}, models)


def decode_evaluate(
    meta: wire.Meta, payload: bytes
) -> Tuple[int, Dict[str, Tensors], List[List[int]]]:
    expect(meta, "evaluate")
    groups = wire.optional(meta, "groups", list, [])
    try:
        digit_groups = [[int(d) for d in g] for g in groups]
    except (TypeError, ValueError):
        raise WireError("evaluate groups must be lists of digits") from None
    return int(wire.optional(meta, "round", int, 0)), _groups(payload), digit_groups


def encode_evaluation(results: Mapping[str, EvalResult]) -> bytes:
    return _frame({"type": "evaluation", "results": {k: r.to_dict() for k, r in results.items()}})


def decode_evaluation(meta: wire.Meta) -> Dict[str, EvalResult]:
    expect(meta, "evaluation")
    try:
        return {k: EvalResult.from_dict(v) for k, v in meta["results"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WireError(f"malformed evaluation: {exc!r}") from None


def encode_simple(kind: str) -> bytes:
    return _frame({"type": kind})


def encode_error(error: str, message: str) -> bytes:
    return _frame({"type": "error", "error": error, "message": message})


def expect(meta: wire.Meta, kind: str) -> None:
    """Raise WireError unless `meta` is a `kind` message (an `error` reply raises its message)."""
    if meta.get("type") == "error" and kind != "error":
        raise RemoteError(str(meta.get("error", "Error")), str(meta.get("message", "")))
    if meta.get("type") != kind:
        raise WireError(f"expected a {kind!r} message, got {meta.get('type')!r}")


class RemoteError(Exception):
    """The worker answered with an error frame."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.error = error
        self.message = message
