"""The wire form of a compressed tensor group, and the checks a received one passes first.

fedcore.compression encodes and decodes; this module says what its frames look like and holds
every check `compression.decode` makes of a frame before it decodes anything, so the bounds a
hostile frame meets can be read (and fuzzed) in one place.

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
from typing import Dict, List, Mapping, Tuple

import torch

from .errors import WireError
from .wire import quote

Spec = Mapping[str, Tuple[tuple, torch.dtype]]
Groups = Mapping[str, Mapping[str, torch.Tensor]]

F32, F16, I8, TOPK = "f32", "f16", "i8", "topk"  # the codecs (fedcore.compression.SCHEMES)
PART = "~"  # separates a compressed group's name from its part: `weights~scale`
SCALE, INDEX, VALUE = "scale", "index", "value"
FP16_MAX = 65504.0  # the largest finite float16
FLOAT32_MAX = 3.4028234663852886e38
# 127 x scale must stay a finite float32, so a decoded int8 tensor is finite by construction.
MAX_SCALE = FLOAT32_MAX / 128


def topk_count(numel: int, fraction: float) -> int:
    """How many of a tensor's `numel` entries top-k sends: ceil(fraction x numel), at least 1
    (a non-empty tensor), at most numel."""
    if numel == 0:
        return 0
    return max(1, min(numel, math.ceil(fraction * numel)))


def parts_of(codec: str, groups: Groups, group: str, name: str) -> Dict[str, torch.Tensor]:
    """The parts of tensor `name` of compressed `group` ("" is the group's own tensor); the
    groups must hold them (`check_structure` has seen to it)."""
    if codec == TOPK:
        return {
            INDEX: groups[f"{group}{PART}{INDEX}"][name],
            VALUE: groups[f"{group}{PART}{VALUE}"][name],
        }
    found = {"": groups[group][name]}
    if codec == I8:
        found[SCALE] = groups[f"{group}{PART}{SCALE}"][name]
    return found


def check_structure(
    codec: str,
    groups: Groups,
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
            check_model_tensor(group, name, spec)
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
                check_model_tensor(base, name, spec)
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


def check_model_tensor(group: str, name: str, spec: Spec) -> None:
    if name not in spec or not spec[name][1].is_floating_point:
        raise WireError(
            f"{quote(group)}/{quote(name)} is not one of the model's floating-point tensors"
        )


def check_values(
    codec: str,
    groups: Groups,
    plan: Mapping[str, List[str]],
    spec: Spec,
) -> None:
    """Values of the received parts: finite, in range, indices increasing within the tensor."""
    for group, names in plan.items():
        for name in names:
            parts = parts_of(codec, groups, group, name)
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
