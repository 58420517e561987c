"""Fixed-point quantisation into Z_2^32, so masked updates can be summed modulo 2^32.

Secure aggregation adds integers modulo 2^32 (Bonawitz et al. 2017, Sec. 3: inputs in Z_R), so a
device's float update becomes integers first. A `Block` is one flat part of the vector a device
contributes (its model delta, SCAFFOLD's control delta, ...), with its own stated range:

1. clip: the block's L2 norm is scaled down to at most `clip_norm` (the device clips its own
   update, since the coordinator can no longer screen single updates), then every coordinate is
   clamped to [-bound, bound];
2. scale: q = round(x * scale), scale = M / bound with M = floor((2^31 - 1) / devices), so the
   sum of `devices` such integers lies in [-(2^31 - 1), 2^31 - 1] and never wraps;
3. the integer travels modulo 2^32 (an int64 tensor holding 0..2^32 - 1).

The sum of `count` devices' blocks is read back as a signed integer divided by the scale; its
error per coordinate is at most count * 0.5 / scale (`error_bound`), e.g. 7.0e-10 for 3 devices
with bound 1. Runs on the device (Python 3.8, torch).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Sequence, Tuple

import torch

from ..errors import UpdateRejected

MODULUS = 1 << 32
MASK = MODULUS - 1
HALF = 1 << 31
MAX_LENGTH = 1 << 28  # entries in all blocks together: 1 GiB of uint32, far above any model here


@dataclass(frozen=True)
class Block:
    """One flat part of a device's input: its name, entry count and stated range."""

    name: str
    length: int
    clip_norm: float  # L2 norm bound of the block, per device
    bound: float  # each coordinate is clamped to [-bound, bound]

    def __post_init__(self) -> None:
        if not (1 <= self.length <= MAX_LENGTH):
            raise ValueError(f"block {self.name!r}: length {self.length} outside 1..{MAX_LENGTH}")
        for what in ("clip_norm", "bound"):
            value = getattr(self, what)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"block {self.name!r}: {what} must be finite and > 0: {value}")


def integer_limit(devices: int) -> int:
    """M: the largest |q| one of `devices` devices may send so that their sum cannot wrap."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    return (HALF - 1) // devices


def scale(block: Block, devices: int) -> float:
    """Integers per unit of `block`'s values when up to `devices` devices are summed."""
    return integer_limit(devices) / block.bound


def error_bound(block: Block, devices: int, count: int) -> float:
    """Largest rounding error per coordinate of a sum of `count` devices' quantised blocks."""
    return count * 0.5 / scale(block, devices)


def clip(values: torch.Tensor, block: Block) -> torch.Tensor:
    """`values` (flat) in float64 with L2 norm <= clip_norm and every entry in [-bound, bound]."""
    x = values.detach().to(torch.float64).reshape(-1)
    norm = float(torch.linalg.vector_norm(x))
    if norm > block.clip_norm:
        x = x * (block.clip_norm / norm)
    return x.clamp(-block.bound, block.bound)


def quantize(values: torch.Tensor, block: Block, devices: int) -> torch.Tensor:
    """`values` clipped and scaled to integers modulo 2^32 (int64 tensor, entries 0..2^32 - 1).

    Raises:
        ValueError: `values` has the wrong number of entries or a non-finite one.
    """
    if values.numel() != block.length:
        raise ValueError(f"block {block.name!r} has {block.length} entries, got {values.numel()}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"block {block.name!r} has non-finite values")
    limit = integer_limit(devices)
    q = torch.round(clip(values, block) * scale(block, devices)).clamp(-limit, limit)
    return q.to(torch.int64) & MASK


def dequantize(total: torch.Tensor, block: Block, devices: int) -> torch.Tensor:
    """A sum modulo 2^32 of quantised blocks, back to float64 values."""
    signed = total.to(torch.int64) & MASK
    signed = torch.where(signed >= HALF, signed - MODULUS, signed)
    return signed.to(torch.float64) / scale(block, devices)


def encode(
    values: Mapping[str, torch.Tensor], blocks: Sequence[Block], devices: int
) -> torch.Tensor:
    """The device's whole input: every block quantised, concatenated in `blocks` order."""
    missing = sorted(set(b.name for b in blocks) - set(values))
    extra = sorted(set(values) - set(b.name for b in blocks))
    if missing or extra:
        raise ValueError(
            f"blocks differ: missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    return torch.cat([quantize(values[b.name], b, devices) for b in blocks])


def decode(total: torch.Tensor, blocks: Sequence[Block], devices: int) -> Dict[str, torch.Tensor]:
    """A summed input split into its blocks, each dequantised (float64, flat)."""
    out, start = {}, 0
    for b in blocks:
        out[b.name] = dequantize(total[start : start + b.length], b, devices)
        start += b.length
    return out


def check_sum(
    sums: Mapping[str, torch.Tensor], blocks: Sequence[Block], devices: int, count: int
) -> None:
    """Refuse a sum that `count` clipped devices cannot have produced.

    What stands in for per-update screening under secure aggregation: every honest device
    clipped its block to norm <= clip_norm, so the sum's norm is at most count * clip_norm (plus
    the rounding of `error_bound` per coordinate). A device that skipped clipping shows here
    unless the others' updates happen to cancel it.

    Raises:
        UpdateRejected: the count is outside 1..devices or a block's sum is out of range.
    """
    if not 1 <= count <= devices:
        raise UpdateRejected("secure-aggregate", f"count {count} outside 1..{devices}")
    for b in blocks:
        x = sums[b.name]
        slack = error_bound(b, devices, count)
        norm = float(torch.linalg.vector_norm(x))
        allowed = count * b.clip_norm + slack * math.sqrt(b.length)
        if norm > allowed:
            raise UpdateRejected(
                "secure-aggregate",
                f"block {b.name!r}: the sum of {count} updates has norm {norm:.6g}, above "
                f"{count} x clip_norm {b.clip_norm} = {allowed:.6g}: a device did not clip",
            )
        peak = float(x.abs().max())
        if peak > count * b.bound + slack:
            raise UpdateRejected(
                "secure-aggregate",
                f"block {b.name!r}: a coordinate of the sum of {count} updates is {peak:.6g}, "
                f"above {count} x bound {b.bound}: a device did not clamp its update",
            )


def flatten(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Tensors concatenated flat in `names` order (float64)."""
    return torch.cat([tensors[n].detach().to(torch.float64).reshape(-1) for n in names])


def unflatten(
    flat: torch.Tensor, spec: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]]
) -> Dict[str, torch.Tensor]:
    """Inverse of `flatten` for `spec` = [(name, shape, dtype)] in order."""
    out, start = {}, 0
    for name, shape, dtype in spec:
        n = math.prod(shape) if shape else 1
        out[name] = flat[start : start + n].reshape(shape).to(dtype)
        start += n
    if start != flat.numel():
        raise ValueError(f"spec covers {start} entries, the vector has {flat.numel()}")
    return out
