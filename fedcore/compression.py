"""Update compression: fewer bytes per worker-round, decoded and validated like any update.

A training's `train.compression` names a scheme; the train plan carries it to the worker
(`TrainPlan.compression`, `TrainPlan.topk_fraction`), and each direction of a worker-round uses
one codec of the scheme:

    scheme  coordinator -> worker (global, SCAFFOLD's c)   worker -> coordinator (delta, delta c_i)
    none    float32, as without compression                float32 weights, as without
    fp16    float16                                        float16 of the delta
    int8    int8 + one float32 scale per tensor            int8 + scale of the delta
    topk    float16                                        top-k of the delta (indices + values)

Decisions, and why:

- **The worker sends the delta, never its weights.** It replies with d = y - x (y its trained
  weights, x the global model as it received them); the coordinator rebuilds y' = g + d' with
  its own exact global g and the delta d' as decoded. A delta is about a hundred times smaller
  than the weights, so the same relative error of a codec is that much smaller in absolute
  terms, and what the downlink's rounding did to x (x = g + rounding) is not added to the
  global model: the coordinator's global stays in float32 and every round moves it by decoded
  deltas only.
- **The downlink is stateless.** The coordinator compresses the global model itself (and
  SCAFFOLD's c), with no reference the two sides would have to keep in step: a restarted worker,
  a retried round or a stale version under an asynchronous schedule need nothing. The rounding
  changes only the point the worker computes its gradients at, never the global model. float16
  rounds a weight by at most 2^-11 of its size; int8 by at most (max |w| of its tensor) / 254,
  which the benchmark (benchmarks/compression_accuracy.py) prices in accuracy. Top-k of weights
  would zero most of the model, so `topk` sends the downlink as float16.
- **Error feedback on the model's delta** (Stich, Cordonnier, Jaggi, 2018, "Sparsified SGD with
  Memory", NeurIPS): the worker keeps what the codec left out of its weights' delta,
  e = v - decoded(v), and adds it to its next delta (v = d + e), so a part rounded away (int8)
  or not chosen (top-k) is sent later rather than lost; without it int8's rounding to nearest
  drops every entry smaller than half a step round after round. `ErrorFeedback` holds e per
  tensor for the worker's process; a new process starts from e = 0, and a reply the coordinator
  lost loses its delta as it would uncompressed. SCAFFOLD's control delta gets none: it is a
  target minus the present (c_i+ - c_i ~ the worker's mean gradient - c_i), so what a round
  did not send is asked for again by the next round's delta by itself, and feeding it back
  too counts it twice (with top-k 1%, the best recipe diverged to NaN in our trials).
- **What the coordinator adds is what the worker accounts for.** `encode` returns, besides the
  wire tensors, the values the receiver will decode from them (bit-equal: one decoder on both
  sides, float32 arithmetic on the CPU), so SCAFFOLD's worker keeps c_i + delta as sent
  (fedcore.local_algorithms) and both records of c_i stay bit-equal.
- **int8**: symmetric, per tensor: scale = max |v| / 127, q = round(v / scale) in -127..127
  (-128 is refused), decoded q * scale. **top-k**: k = ceil(fraction * n) entries of each
  tensor's n, those of largest |v|, as int32 indices in increasing order (so in range and unique
  are checked in one pass) and their float32 values.

Wire form of a compressed tensor group G (one tensor per model tensor name n; groups as in
fedcore.protocol): `G/n` float16 (fp16); `G/n` int8 with `G~scale/n` a float32 scalar (int8);
`G~index/n` int32 [k] and `G~value/n` float32 [k] (top-k). Integer tensors (SCAFFOLD's
`control_base/round`) travel as they are in every scheme.

Decoding takes nothing on trust and checks, before any work proportional to what a frame
claims: at most `max_groups` compressed groups, each tensor named and shaped as the model's spec
says, only the dtypes its codec allows (a float32 tensor in an fp16 frame is refused), every part
present once; then the values: scales finite, >= 0 and small enough that 127 x scale is a finite
float32, int8 values in -127..127, top-k counts exact and indices increasing within the tensor,
float values finite. Any violation is a `WireError` naming the tensor; the session then drops the
connection (fedcore.session). Runs on the device (Python 3.8, torch and the standard library).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .errors import WireError
from .wire import quote

Tensors = Dict[str, torch.Tensor]
Spec = Mapping[str, Tuple[tuple, torch.dtype]]

F32, F16, I8, TOPK = "f32", "f16", "i8", "topk"
# scheme -> (coordinator -> worker codec, worker -> coordinator codec); see the module docstring
SCHEMES: Dict[str, Tuple[str, str]] = {
    "none": (F32, F32),
    "fp16": (F16, F16),
    "int8": (I8, I8),
    "topk": (F16, TOPK),
}
PART = "~"  # separates a compressed group's name from its part: `weights~scale`
SCALE, INDEX, VALUE = "scale", "index", "value"
FP16_MAX = 65504.0  # the largest finite float16
FLOAT32_MAX = 3.4028234663852886e38
# 127 x scale must stay a finite float32, so a decoded int8 tensor is finite by construction.
MAX_SCALE = FLOAT32_MAX / 128


def codecs(scheme: str) -> Tuple[str, str]:
    """(downlink codec, uplink codec) of `scheme`.

    Raises:
        WireError: an unknown scheme (it comes from the network on the worker's side).
    """
    if scheme not in SCHEMES:
        raise WireError(f"unknown compression {quote(scheme)}, expected one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def topk_count(numel: int, fraction: float) -> int:
    """How many of a tensor's `numel` entries top-k sends: ceil(fraction x numel), at least 1
    (a non-empty tensor), at most numel."""
    if numel == 0:
        return 0
    return max(1, min(numel, math.ceil(fraction * numel)))


def payload_bound(spec: Spec, codec: str, groups: int, fraction: float = 0.0) -> int:
    """The tensor bytes of `groups` model-shaped groups encoded with `codec` (no header): what
    a reply limit allows for them."""
    total = 0
    for shape, dtype in spec.values():
        numel = math.prod(shape)
        size = torch.empty((), dtype=dtype).element_size()
        if not dtype.is_floating_point:  # travels as it is
            total += numel * size
        elif codec == F16:
            total += numel * 2
        elif codec == I8:
            total += numel + 4  # int8 values and a float32 scale
        elif codec == TOPK:
            total += topk_count(numel, fraction) * 8  # int32 index and float32 value
        else:
            total += numel * size
    return total * groups


class ErrorFeedback:
    """The worker's memory of what compression left out (Stich et al. 2018), per group and tensor.

    `encode` adds a tensor's residual e to the value before compressing it and keeps the new
    residual v - decoded(v). The residuals belong to one codec: a plan with another scheme or
    fraction starts from zero.
    """

    def __init__(self) -> None:
        self._codec: Optional[Tuple[str, float]] = None
        self._residual: Dict[Tuple[str, str], torch.Tensor] = {}

    def use(self, codec: str, fraction: float) -> None:
        """Forget the residuals if they were kept for another codec or fraction."""
        if self._codec != (codec, fraction):
            self._codec, self._residual = (codec, fraction), {}

    def add(self, group: str, name: str, t: torch.Tensor) -> torch.Tensor:
        r = self._residual.get((group, name))
        return t if r is None or r.shape != t.shape else t + r

    def keep(self, group: str, name: str, residual: torch.Tensor) -> None:
        self._residual[(group, name)] = residual

    def norm(self) -> float:
        """The residuals' L2 norm (0.0 with none): how much is still to be sent."""
        return math.sqrt(sum(float(r.double().pow(2).sum()) for r in self._residual.values()))


# -- encoding ------------------------------------------------------------------------------------


def encode(
    codec: str,
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    fraction: float = 0.0,
    feedback: Optional[ErrorFeedback] = None,
) -> Tuple[Dict[str, Tensors], Dict[str, Tensors]]:
    """(wire groups, decoded groups): the floating-point tensors of `groups` compressed with
    `codec`, and what the receiver will decode from them (bit-equal to its `decode`).

    Integer tensors pass unchanged (in both results). With `feedback`, each tensor's residual
    is added before compressing and the new one kept (the uplink).

    Raises:
        ValueError: a group name holds `PART`, or an int8 tensor to pass unchanged under int8
            (it would read as compressed).
        WireError: a value is not finite, or (fp16) beyond float16's range.
    """
    if feedback is not None:
        feedback.use(codec, fraction)
    wire: Dict[str, Tensors] = {}
    decoded: Dict[str, Tensors] = {}
    for group, tensors in groups.items():
        if PART in group:
            raise ValueError(f"tensor group {group!r} must not contain {PART!r}")
        for name, t in tensors.items():
            t = t.detach().to("cpu")
            if codec == F32 or not t.is_floating_point():
                if codec == I8 and t.dtype == torch.int8:
                    raise ValueError(f"{group}/{name}: int8 tensors cannot pass under int8")
                wire.setdefault(group, {})[name] = t
                decoded.setdefault(group, {})[name] = t
                continue
            dtype = t.dtype
            v = feedback.add(group, name, t.float()) if feedback is not None else t.float()
            if not bool(torch.isfinite(v).all()):
                raise WireError(f"cannot compress {group}/{name}: it holds NaN or Inf values")
            parts = _encode_one(codec, group, name, v, fraction)
            for part, value in parts.items():
                wire.setdefault(group if part == "" else f"{group}{PART}{part}", {})[name] = value
            out = _decode_one(codec, parts, tuple(t.shape), dtype)
            decoded.setdefault(group, {})[name] = out
            if feedback is not None:
                feedback.keep(group, name, v - out.float())
    return wire, decoded


def _encode_one(
    codec: str, group: str, name: str, v: torch.Tensor, fraction: float
) -> Dict[str, torch.Tensor]:
    """The parts of one float32 tensor `v` under `codec` ("" is the group's own tensor)."""
    if codec == F16:
        biggest = float(v.abs().max()) if v.numel() else 0.0
        if biggest > FP16_MAX:
            raise WireError(
                f"cannot send {group}/{name} as float16: a value of size {biggest:.3g} exceeds "
                f"float16's range ({FP16_MAX:g}); use train.compression int8 or none"
            )
        return {"": v.to(torch.float16)}
    if codec == I8:
        peak = v.abs().max() if v.numel() else torch.zeros(())
        scale = (peak / 127).to(torch.float32).reshape(())  # a 0-dim tensor: float32 math
        if float(scale) == 0.0:
            q = torch.zeros(v.shape, dtype=torch.int8)
        else:
            q = torch.round(v / scale).clamp_(-127, 127).to(torch.int8)
        return {"": q, SCALE: scale}
    if codec == TOPK:
        flat = v.reshape(-1)
        k = topk_count(flat.numel(), fraction)
        index = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        return {INDEX: index.to(torch.int32), VALUE: flat[index].clone()}
    raise ValueError(f"unknown codec {codec!r}")


def _decode_one(
    codec: str, parts: Mapping[str, torch.Tensor], shape: tuple, dtype: torch.dtype
) -> torch.Tensor:
    """The tensor of `shape` and `dtype` that `parts` (already checked) decode to."""
    if codec == F16:
        return parts[""].to(dtype)
    if codec == I8:
        return (parts[""].to(torch.float32) * parts[SCALE].to(torch.float32)).to(dtype)
    out = torch.zeros(shape, dtype=dtype)
    out.view(-1)[parts[INDEX].to(torch.int64)] = parts[VALUE].to(dtype)
    return out


# -- decoding ------------------------------------------------------------------------------------


def decode(
    codec: str,
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    spec: Spec,
    fraction: float = 0.0,
    max_groups: int = 1,
) -> Dict[str, Tensors]:
    """The tensor groups a frame compressed with `codec` decodes to, every check first.

    Args:
        codec: the codec the receiver expects (from the plan it sent or received).
        groups: the frame's tensor groups as read (`wire.split_prefixed`).
        spec: name -> (shape, dtype) of the model: every compressed tensor is one of its
            floating-point tensors, decoded to its shape and dtype.
        fraction: top-k's fraction (the counts it implies are checked exactly).
        max_groups: the most compressed groups the frame may carry (what the request asked
            for), checked before anything is decoded.

    Raises:
        WireError: see the module docstring; the message names the group and tensor.
    """
    if codec == F32:
        return {g: dict(ts) for g, ts in groups.items()}
    plan = _check_structure(codec, groups, spec, fraction, max_groups)
    _check_values(codec, groups, plan, spec)
    out: Dict[str, Tensors] = {}
    for group, tensors in groups.items():
        if PART not in group:  # integer tensors that travel as they are
            kept = {n: t for n, t in tensors.items() if n not in plan.get(group, ())}
            if kept:
                out[group] = kept
    for group, names in plan.items():
        for name in names:
            shape, dtype = spec[name]
            parts = _parts(codec, groups, group, name)
            out.setdefault(group, {})[name] = _decode_one(codec, parts, tuple(shape), dtype)
    return out


def _parts(
    codec: str, groups: Mapping[str, Mapping[str, torch.Tensor]], group: str, name: str
) -> Dict[str, torch.Tensor]:
    if codec == TOPK:
        return {
            INDEX: groups[f"{group}{PART}{INDEX}"][name],
            VALUE: groups[f"{group}{PART}{VALUE}"][name],
        }
    parts = {"": groups[group][name]}
    if codec == I8:
        parts[SCALE] = groups[f"{group}{PART}{SCALE}"][name]
    return parts


def _check_structure(
    codec: str,
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    spec: Spec,
    fraction: float,
    max_groups: int,
) -> Dict[str, List[str]]:
    """group -> the names of its compressed tensors, after checking names, dtypes,
    shapes and parts (metadata only: no work proportional to a tensor's size)."""
    allowed_parts = {F16: (), I8: (SCALE,), TOPK: (INDEX, VALUE)}[codec]
    compressed: Dict[str, List[str]] = {}
    part_groups: Dict[str, Dict[str, Mapping[str, torch.Tensor]]] = {}
    for group, tensors in groups.items():
        base, sep, part = group.partition(PART)
        if sep:
            if part not in allowed_parts or not base or PART in part:
                raise WireError(
                    f"tensor group {quote(group)} is not a part of a {codec} compressed group "
                    f"(expected {[f'<group>{PART}{p}' for p in allowed_parts] or 'none'})"
                )
            part_groups.setdefault(base, {})[part] = tensors
            continue
        for name, t in tensors.items():
            if t.is_floating_point():
                if codec != F16 or t.dtype != torch.float16:
                    raise WireError(
                        f"{quote(group)}/{quote(name)} is {t.dtype} in a {codec} compressed frame "
                        f"(allowed: {'float16' if codec == F16 else 'no floating point'})"
                    )
            elif not (codec == I8 and t.dtype == torch.int8):
                continue  # an integer tensor that travels as it is (control_base/round)
            _check_model_tensor(group, name, spec)
            if tuple(t.shape) != tuple(spec[name][0]):
                raise WireError(
                    f"{quote(group)}/{quote(name)} has shape {list(t.shape)}, "
                    f"expected {list(spec[name][0])}"
                )
            compressed.setdefault(group, []).append(name)
    for base, parts in part_groups.items():
        if codec == TOPK:
            if base in groups:
                raise WireError(f"tensor group {quote(base)} is sent both dense and as top-k")
            missing = [p for p in (INDEX, VALUE) if p not in parts]
            if missing:
                raise WireError(f"top-k group {quote(base)} lacks its {missing} part")
            names = set(parts[INDEX])
            if set(parts[VALUE]) != names:
                raise WireError(f"top-k group {quote(base)}: index and value names differ")
            for name in sorted(names):
                _check_model_tensor(base, name, spec)
                k = topk_count(math.prod(spec[name][0]), fraction)
                for part, dtype in ((INDEX, torch.int32), (VALUE, torch.float32)):
                    t = parts[part][name]
                    if t.dtype != dtype or tuple(t.shape) != (k,):
                        raise WireError(
                            f"top-k {quote(base)}/{quote(name)} {part}: {t.dtype} "
                            f"{list(t.shape)}, expected {dtype} [{k}]"
                        )
                compressed.setdefault(base, []).append(name)
        else:  # int8's scales
            scales = parts[SCALE]
            names = set(compressed.get(base, ()))
            if set(scales) != names:
                raise WireError(
                    f"int8 group {quote(base)}: scales for {quote(sorted(scales))}, "
                    f"values for {quote(sorted(names))}"
                )
            for name, t in scales.items():
                if t.dtype != torch.float32 or t.dim() != 0:
                    raise WireError(
                        f"int8 scale {quote(base)}/{quote(name)}: {t.dtype} {list(t.shape)}, "
                        "expected one float32 scalar"
                    )
    if codec == I8:
        unscaled = sorted(g for g in compressed if g not in part_groups)
        if unscaled:
            raise WireError(f"int8 group {quote(unscaled[0])} has no {PART}{SCALE} part")
    if len(compressed) > max_groups:
        raise WireError(
            f"{len(compressed)} compressed tensor groups, at most {max_groups} expected: "
            f"{quote(sorted(compressed))}"
        )
    return compressed


def _check_model_tensor(group: str, name: str, spec: Spec) -> None:
    if name not in spec or not spec[name][1].is_floating_point:
        raise WireError(
            f"{quote(group)}/{quote(name)} is not one of the model's floating-point tensors"
        )


def _check_values(
    codec: str,
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    plan: Mapping[str, List[str]],
    spec: Spec,
) -> None:
    """Values of the received parts: finite, in range, indices increasing within the tensor."""
    for group, names in plan.items():
        for name in names:
            parts = _parts(codec, groups, group, name)
            what = f"{quote(group)}/{quote(name)}"
            if codec == F16:
                if not bool(torch.isfinite(parts[""]).all()):
                    raise WireError(f"{what} holds NaN or Inf values")
            elif codec == I8:
                scale = float(parts[SCALE])
                if not (math.isfinite(scale) and 0.0 <= scale <= MAX_SCALE):
                    raise WireError(f"int8 scale of {what} is {scale!r}, expected 0..{MAX_SCALE:g}")
                q = parts[""]
                if q.numel() and int(q.min()) < -127:
                    raise WireError(f"int8 {what} holds -128, outside the scheme's -127..127")
            else:
                index, value = parts[INDEX], parts[VALUE]
                if not bool(torch.isfinite(value).all()):
                    raise WireError(f"top-k values of {what} hold NaN or Inf")
                if index.numel():
                    numel = math.prod(spec[name][0])
                    first, last = int(index[0]), int(index[-1])
                    if first < 0 or last >= numel:
                        raise WireError(
                            f"top-k indices of {what} leave 0..{numel - 1}: {first}..{last}"
                        )
                    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
                        raise WireError(
                            f"top-k indices of {what} must increase strictly (unique, sorted)"
                        )
