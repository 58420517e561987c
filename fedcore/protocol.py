"""The worker protocol: typed messages over wire frames.

Coordinator -> worker, each answered by exactly one frame:
  hello     -> hello (worker name, shard description, label counts, python/torch/CUDA)
  train     -> update (weights after local training, example count, metrics)
  evaluate  -> evaluation (per model: accuracy, losses, confusion, group shares)
  bye       -> bye, then the worker exits
Any request may be answered by `error` (type and message). Tensors travel in the frame's
safetensors payload, grouped by a name prefix: `global/...` (the round's model) and strategy
extras in a train request; `weights/...` and extras in an update; `<model>/...` in an evaluate
request. The message types and the bounds on their numbers are fedcore.messages' (re-exported
here); this module turns them into frames and reads them back. Runs on the device (Python 3.8).

Update compression (`TrainPlan.compression`, fedcore.compression) changes only the payload: the
request's float groups travel in the scheme's downlink codec, and the update carries the delta
from the global model the worker received, in the uplink codec (`weights~scale/..`,
`weights~index/..` and the like hold a codec's parts). `decode_update` rebuilds the weights as the
coordinator's own global plus the decoded delta, so everything after it (validation, strategies,
screening, the record) sees float32 weights as without compression. Without compression the
frames are byte for byte those of protocol 1.

Decoders take nothing on trust: every field is checked for its type and range
(`wire.integer`, `wire.number`, `wire.text`), counts are non-negative ints, an evaluation's
numbers must agree with each other and with what the coordinator asked and the evaluator's hello
reported. Any violation is a `WireError` naming the message and the field; the session that
received it drops the connection (fedcore.session).

A round's global model is encoded once for all its workers (`encode_train`'s per-round cache of
the payload, keyed on the tensors themselves): the same bytes each worker would get encoded alone.

Past 400 lines because every frame's encoder sits next to its decoder and its checks: split by
message, a change to one field would have to be made in two modules that must agree.
"""

from __future__ import annotations

import threading
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import compression, tensorcodec, wire
from .errors import WireError
from .evaluation import EvalResult

# The messages are their own module (fedcore.messages); every name stays importable from here.
from .messages import CLASSES as CLASSES
from .messages import COMPRESSION_PROTOCOL as COMPRESSION_PROTOCOL
from .messages import DEVICE_METRICS as DEVICE_METRICS
from .messages import MAX_COUNT as MAX_COUNT
from .messages import MAX_FACT_KEY as MAX_FACT_KEY
from .messages import MAX_FACT_VALUE as MAX_FACT_VALUE
from .messages import MAX_FACTS as MAX_FACTS
from .messages import MAX_GROUPS as MAX_GROUPS
from .messages import MAX_ROUND as MAX_ROUND
from .messages import PROTOCOL_VERSION as PROTOCOL_VERSION
from .messages import Hello as Hello
from .messages import RemoteError as RemoteError
from .messages import Tensors as Tensors
from .messages import TrainRequest as TrainRequest
from .messages import Update as Update
from .model import weight_spec
from .pacing import MAX_SLOWDOWN, MODES
from .training import TrainMetrics, TrainPlan

_LABELS = {str(d): d for d in range(CLASSES)}

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
            "slowdown": h.slowdown,
            "pacing": h.pacing,
            "facts": dict(h.facts),
        }
    )


def decode_hello(meta: wire.Meta) -> Hello:
    expect(meta, "hello")
    raw_counts = wire.mapping(meta.get("label_counts"), "hello label_counts")
    counts = {}
    for key, value in raw_counts.items():
        if key not in _LABELS:
            raise WireError(
                f"hello label_counts has label {wire.quote(key)}, expected 0..{CLASSES - 1}"
            )
        counts[_LABELS[key]] = wire.integer(value, f"hello label count of {key}", 0, MAX_COUNT)
    slowdown = wire.number(meta.get("slowdown", 1.0), "hello slowdown", 1.0, MAX_SLOWDOWN)
    pacing = _pacing(meta.get("pacing", "none"), slowdown)
    return Hello(
        worker=wire.text(meta.get("worker"), "hello worker"),
        shard=wire.text(meta.get("shard"), "hello shard", 1024),
        label_counts=counts,
        python=wire.text(meta.get("python"), "hello python"),
        torch=wire.text(meta.get("torch"), "hello torch"),
        device=wire.text(meta.get("device"), "hello device"),
        threads=wire.integer(meta.get("threads"), "hello threads", 0, 1 << 16),
        pid=wire.integer(meta.get("pid"), "hello pid", 0, 1 << 32),
        protocol=wire.integer(meta.get("protocol"), "hello protocol", 0, MAX_ROUND),
        slowdown=slowdown,
        pacing=pacing,
        facts=_facts(meta.get("facts", {})),
    )


def _facts(value: object) -> Dict[str, str]:
    """A hello's facts about its machine: at most MAX_FACTS, each key a short lower-case word
    (letters, digits, `_`: it becomes part of an MLflow tag name), each value a short text."""
    raw = wire.mapping(value, "hello facts")
    if len(raw) > MAX_FACTS:
        raise WireError(f"hello facts has {len(raw)} entries, limit {MAX_FACTS}")
    facts = {}
    for key, fact in raw.items():
        if not (0 < len(key) <= MAX_FACT_KEY and key.isascii() and _is_word(key)):
            raise WireError(
                f"hello facts key {wire.quote(key)} is not a word of a-z, 0-9 and _ "
                f"(at most {MAX_FACT_KEY} characters)"
            )
        facts[key] = wire.text(fact, f"hello fact {key}", MAX_FACT_VALUE)
    return facts


def _is_word(key: str) -> bool:
    return all(c.islower() or c.isdigit() or c == "_" for c in key)


def _pacing(value: object, slowdown: float) -> str:
    """The hello's pacing mode, which must agree with its slowdown (fedcore.pacing.MODES)."""
    mode = wire.text(value, "hello pacing", 16)
    if mode not in MODES:
        raise WireError(f"hello pacing must be one of {list(MODES)}, got {wire.quote(mode)}")
    if (mode == "none") != (slowdown == 1.0) and mode != "steady":
        raise WireError(f"hello pacing {mode!r} disagrees with its slowdown {slowdown:g}")
    return mode


def encode_train(req: TrainRequest) -> bytes:
    """The train request's frame: the global model and extras in the plan's downlink codec.

    Every trainer of a round gets the same global model, so its payload is encoded once: the
    last payload is kept with the tensors it was made from and reused while a request carries
    the very same tensor objects, unmodified since (`_TrainPayloads`); the frame is byte for
    byte the one encoded afresh. Only the JSON part (round, plan, seed) differs per worker.

    Raises:
        WireError: the plan's compression cannot carry a value (fp16 beyond its range).
    """
    return b"".join(encode_train_parts(req))


def encode_train_parts(req: TrainRequest) -> Tuple[bytes, bytes]:
    """`encode_train`'s frame as (prefix and metadata, payload), to be sent one after the other:
    the payload is the round's shared bytes object, not copied into a frame per worker."""
    groups: Dict[str, Mapping[str, torch.Tensor]] = {"global": req.weights}
    groups.update(req.extras)
    down, _ = compression.codecs(req.plan.compression)
    meta = {
        "type": "train",
        "round": req.round,
        "plan": req.plan.to_dict(),
        "sample_seed": req.sample_seed,
    }
    payload = _TRAIN_PAYLOADS.payload(groups, down)
    return wire.encode_head(meta, len(payload)), payload


class _TrainPayloads:
    """The last train payload and what it was encoded from, shared by the request threads.

    The key holds each tensor's identity, its in-place version counter (`Tensor._version`,
    bumped by every in-place operation), data pointer, shape and dtype, and the cache holds the
    tensors themselves, so no freed tensor's id can come back under the key: a payload is reused
    only for the same unmodified tensors. The lock makes a round's concurrent requests wait for
    the first one's encoding instead of each encoding the model.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Optional[Tuple[Any, ...]] = None
        self._held: List[torch.Tensor] = []
        self._payload = b""

    def payload(self, groups: Mapping[str, Mapping[str, torch.Tensor]], codec: str) -> bytes:
        tensors = [t for g in groups.values() for t in g.values()]
        key = _fingerprint(groups, codec)
        with self._lock:
            if key is not None and key == self._key:
                return self._payload
            if codec != compression.F32:
                groups = dict(compression.encode(codec, groups)[0])
            payload = tensorcodec.dumps(wire.join_prefixed(groups)) if groups else b""
            if key is not None:
                self._key, self._held, self._payload = key, tensors, payload
            return payload

    def clear(self) -> None:
        with self._lock:
            self._key, self._held, self._payload = None, [], b""


def _fingerprint(
    groups: Mapping[str, Mapping[str, torch.Tensor]], codec: str
) -> Optional[Tuple[Any, ...]]:
    """What identifies a payload's input (None: a tensor without a version counter: no reuse)."""
    parts: List[Any] = [codec]
    for g, tensors in groups.items():
        for name, t in tensors.items():
            version = getattr(t, "_version", None)
            if not isinstance(version, int):
                return None
            parts.append((g, name, id(t), version, t.data_ptr(), tuple(t.shape), t.dtype))
    return tuple(parts)


_TRAIN_PAYLOADS = _TrainPayloads()


def decode_train(
    meta: wire.Meta, payload: bytes, spec: Optional[Mapping[str, tuple]] = None
) -> TrainRequest:
    """A train request, its tensors decoded from the plan's downlink codec (checked against
    `spec`, the model's name -> (shape, dtype); default `model.weight_spec()`): at most the
    global model and, with SCAFFOLD, the server's control variate arrive compressed."""
    expect(meta, "train")
    rnd = wire.integer(meta.get("round"), "train request round", 0, MAX_ROUND)
    seed = wire.integer(meta.get("sample_seed"), "train request sample_seed")
    plan = TrainPlan.from_dict(wire.mapping(meta.get("plan"), "train request plan"))
    groups = _groups(payload)
    down, _ = compression.codecs(plan.compression)
    if down != compression.F32:
        spec = spec if spec is not None else weight_spec()
        groups = compression.decode(down, groups, spec, max_groups=2 if plan.scaffold else 1)
    weights = groups.pop("global", None)
    if weights is None:
        raise WireError("train request carries no 'global/' weights")
    return TrainRequest(rnd, plan, seed, weights, groups)


def encode_update(u: Update, wire_groups: Optional[Mapping[str, Tensors]] = None) -> bytes:
    """The update's frame. `wire_groups`: its tensors as compressed (the delta in the plan's
    uplink codec, `compression.encode`), sent instead of `u.weights` and `u.extras`."""
    groups: Mapping[str, Mapping[str, torch.Tensor]]
    if wire_groups is not None:
        groups = wire_groups
    else:
        groups = {"weights": u.weights, **u.extras}
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
                **({"device": dict(u.device)} if u.device else {}),
            },
        },
        groups,
    )


def decode_update(
    meta: wire.Meta,
    payload: bytes,
    wire_bytes: int = 0,
    wire_bytes_down: int = 0,
    plan: Optional[TrainPlan] = None,
    reference: Optional[Mapping[str, torch.Tensor]] = None,
    max_groups: int = 1,
) -> Update:
    """An update; under `plan`'s compression its weights are `reference` (the global model the
    request carried) plus the decoded delta.

    Args:
        meta, payload: the reply.
        wire_bytes, wire_bytes_down: bytes of request plus reply, and of the request.
        plan: the request's plan (None: uncompressed).
        reference: the request's global weights; needed when the plan compresses.
        max_groups: tensor groups the reply may carry, the weights included (checked before
            a compressed group is decoded).

    Raises:
        WireError: a malformed reply (fedcore.compression.decode for the compressed parts).
    """
    expect(meta, "update")
    m = wire.mapping(meta.get("metrics"), "update metrics")
    metrics = TrainMetrics(
        loss=wire.number(m.get("loss"), "update metric loss"),
        samples=wire.integer(m.get("samples"), "update metric samples", 0, MAX_COUNT),
        steps=wire.integer(m.get("steps"), "update metric steps", 0, MAX_COUNT),
        seconds=wire.number(m.get("seconds"), "update metric seconds", 0.0),
    )
    device = _device_metrics(m.get("device", {}))
    worker = wire.text(meta.get("worker"), "update worker")
    rnd = wire.integer(meta.get("round"), "update round", 0, MAX_ROUND)
    num_examples = wire.integer(meta.get("num_examples"), "update num_examples", 0, MAX_COUNT)
    groups = _groups(payload)
    _, up = compression.codecs(plan.compression if plan is not None else "none")
    if up != compression.F32:
        if plan is None or reference is None:
            raise ValueError("decoding a compressed update needs the request's plan and weights")
        spec = {k: (tuple(t.shape), t.dtype) for k, t in reference.items()}
        groups = compression.decode(up, groups, spec, plan.topk_fraction, max_groups)
    weights = groups.pop("weights", None)
    if weights is None:
        raise WireError("update carries no 'weights/' tensors")
    if up != compression.F32:
        assert reference is not None
        weights = {k: _rebuild(reference.get(k), d) for k, d in weights.items()}
    return Update(
        worker, rnd, weights, num_examples, metrics, groups, wire_bytes, wire_bytes_down, device
    )


def _device_metrics(value: object) -> Dict[str, float]:
    """An update's device facts after its round: only DEVICE_METRICS' keys, each in its range."""
    raw = wire.mapping(value, "update device metrics")
    out = {}
    for key, number in raw.items():
        if key not in DEVICE_METRICS:
            raise WireError(
                f"update device metric {wire.quote(key)} is unknown; "
                f"expected some of {sorted(DEVICE_METRICS)}"
            )
        lo, hi = DEVICE_METRICS[key]
        out[key] = wire.number(number, f"update device metric {key}", lo, hi)
    return out


def _rebuild(reference: Optional[torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
    """The coordinator's global tensor plus a worker's decoded delta (float32, exact adds). A
    tensor the global model lacks stays as sent, for validation to refuse by name."""
    if reference is None or not delta.is_floating_point():
        return delta
    return reference + delta


def reply_limit(
    weights: Mapping[str, torch.Tensor], groups: int, plan: Optional[TrainPlan] = None
) -> int:
    """The largest update payload worth reading for a train request carrying `weights`.

    An update holds the weights and at most `groups` extra tensor sets (a strategy's, e.g.
    SCAFFOLD's control delta), none larger than the weights, plus a safetensors header; under
    `plan`'s compression each set in the uplink codec (fp16: half, int8: a quarter plus a scale
    per tensor, top-k: 8 bytes per entry sent). The session refuses a reply that announces more
    from its frame prefix, before reading it.
    """
    _, up = compression.codecs(plan.compression if plan is not None else "none")
    if up == compression.F32:
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        return nbytes * (1 + groups) + 8 + tensorcodec.MAX_HEADER
    assert plan is not None
    spec = {k: (tuple(t.shape), t.dtype) for k, t in weights.items()}
    bound = compression.payload_bound(spec, up, 1 + groups, plan.topk_fraction)
    return bound + 8 + tensorcodec.MAX_HEADER


def encode_evaluate(
    round: int, models: Mapping[str, Mapping[str, torch.Tensor]], groups: Sequence[Sequence[int]]
) -> bytes:
    return _frame({"type": "evaluate", "round": round, "groups": [list(g) for g in groups]}, models)


def decode_evaluate(
    meta: wire.Meta, payload: bytes
) -> Tuple[int, Dict[str, Tensors], List[List[int]]]:
    expect(meta, "evaluate")
    rnd = wire.integer(meta.get("round"), "evaluate request round", 0, MAX_ROUND)
    groups = [
        [
            wire.integer(d, "evaluate request group digit", 0, CLASSES - 1)
            for d in wire.array(g, "evaluate request group", CLASSES)
        ]
        for g in wire.array(meta.get("groups", []), "evaluate request groups", MAX_GROUPS)
    ]
    return rnd, _groups(payload), groups


def encode_evaluation(results: Mapping[str, EvalResult]) -> bytes:
    return _frame({"type": "evaluation", "results": {k: r.to_dict() for k, r in results.items()}})


def decode_evaluation(
    meta: wire.Meta,
    models: Optional[Collection[str]] = None,
    groups: Optional[int] = None,
    total: Optional[int] = None,
) -> Dict[str, EvalResult]:
    """The evaluator's results, each checked for consistency.

    Args:
        meta: the reply's metadata.
        models: the model names the request carried (checked when given): one result each.
        groups: how many digit groups the request carried (checked when given).
        total: the evaluator's test-set size from its hello (checked when given).

    Raises:
        WireError: a result is malformed, its numbers disagree (the confusion matrix's sum and
            diagonal against `total` and `correct`), or it is not what was asked.
    """
    expect(meta, "evaluation")
    results = wire.mapping(meta.get("results"), "evaluation results")
    if models is not None and set(results) != set(models):
        raise WireError(
            f"evaluation results are for {wire.quote(sorted(results))}, "
            f"the request carried {sorted(models)}"
        )
    return {
        name: _eval_result(f"evaluation of {wire.clip(repr(name), 60)}", raw, groups, total)
        for name, raw in results.items()
    }


def _eval_result(what: str, raw: object, groups: Optional[int], total: Optional[int]) -> EvalResult:
    r = wire.mapping(raw, what)
    rows = wire.array(r.get("confusion"), f"{what}: confusion", CLASSES)
    confusion = [
        [wire.integer(v, f"{what}: confusion count", 0, MAX_COUNT) for v in row]
        for row in (wire.array(row, f"{what}: confusion row", CLASSES) for row in rows)
    ]
    if len(confusion) != CLASSES or any(len(row) != CLASSES for row in confusion):
        raise WireError(f"{what}: confusion must be {CLASSES} rows of {CLASSES} counts")
    result = EvalResult(
        correct=wire.integer(r.get("correct"), f"{what}: correct", 0, MAX_COUNT),
        total=wire.integer(r.get("total"), f"{what}: total", 0, MAX_COUNT),
        loss=wire.number(r.get("loss"), f"{what}: loss", 0.0),
        seed_loss=wire.number(r.get("seed_loss"), f"{what}: seed_loss", 0.0),
        confusion=confusion,
        group_shares=[
            wire.number(v, f"{what}: group share", 0.0, 1.0)
            for v in wire.array(r.get("group_shares"), f"{what}: group_shares", MAX_GROUPS)
        ],
    )
    counted = sum(map(sum, confusion))
    diagonal = sum(confusion[d][d] for d in range(CLASSES))
    if result.total != counted or result.correct != diagonal:
        raise WireError(
            f"{what}: correct {result.correct} and total {result.total} disagree with its "
            f"confusion matrix (diagonal {diagonal}, sum {counted})"
        )
    if total is not None and result.total != total:
        raise WireError(
            f"{what}: total {result.total}, but the evaluator's hello reported {total} test images"
        )
    if groups is not None and len(result.group_shares) != groups:
        raise WireError(
            f"{what}: {len(result.group_shares)} group shares for {groups} requested groups"
        )
    return result


def encode_simple(kind: str) -> bytes:
    return _frame({"type": kind})


def encode_error(error: str, message: str) -> bytes:
    return _frame({"type": "error", "error": error, "message": message})


def expect(meta: wire.Meta, kind: str) -> None:
    """Raise WireError unless `meta` is a `kind` message (an `error` reply raises its message)."""
    if meta.get("type") == "error" and kind != "error":
        raise RemoteError(
            wire.clip(str(meta.get("error", "Error")), 60), wire.clip(str(meta.get("message", "")))
        )
    if meta.get("type") != kind:
        raise WireError(f"expected a {kind!r} message, got {wire.quote(meta.get('type'))}")
