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

How a compressed group looks on the wire, and every check `decode` makes of a received one before
any work proportional to what it claims, are fedcore.compressed_form's. Any violation is a
`WireError` naming the tensor; the session then drops the connection (fedcore.session). Runs on
the device (Python 3.8, torch and the standard library).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch

# The wire form and the checks of a received frame are their own module; every name that was
# importable from here still is.
from .compressed_form import F16 as F16
from .compressed_form import F32 as F32
from .compressed_form import FP16_MAX as FP16_MAX
from .compressed_form import I8 as I8
from .compressed_form import INDEX as INDEX
from .compressed_form import MAX_SCALE as MAX_SCALE
from .compressed_form import PART as PART
from .compressed_form import SCALE as SCALE
from .compressed_form import TOPK as TOPK
from .compressed_form import VALUE as VALUE
from .compressed_form import Spec as Spec
from .compressed_form import check_structure, check_values, parts_of
from .compressed_form import topk_count as topk_count
from .errors import WireError
from .wire import quote

Tensors = Dict[str, torch.Tensor]
# scheme -> (coordinator -> worker codec, worker -> coordinator codec); see the module docstring
SCHEMES: Dict[str, Tuple[str, str]] = {
    "none": (F32, F32),
    "fp16": (F16, F16),
    "int8": (I8, I8),
    "topk": (F16, TOPK),
}


def codecs(scheme: str) -> Tuple[str, str]:
    """(downlink codec, uplink codec) of `scheme`.

    Raises:
        WireError: an unknown scheme (it comes from the network on the worker's side).
    """
    if scheme not in SCHEMES:
        raise WireError(f"unknown compression {quote(scheme)}, expected one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


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
    plan = check_structure(codec, groups, spec, fraction, max_groups)
    check_values(codec, groups, plan, spec)
    out: Dict[str, Tensors] = {}
    for group, tensors in groups.items():
        if PART not in group:  # integer tensors that travel as they are
            kept = {n: t for n, t in tensors.items() if n not in plan.get(group, ())}
            if kept:
                out[group] = kept
    for group, names in plan.items():
        for name in names:
            shape, dtype = spec[name]
            parts = parts_of(codec, groups, group, name)
            out.setdefault(group, {})[name] = _decode_one(codec, parts, tuple(shape), dtype)
    return out
