"""Shamir secret sharing over the prime field GF(2^521 - 1): t of n shares give the secret back.

Shamir, 1979, "How to share a secret" (CACM 22(11)). A secret s (here: a 32-byte seed or X25519
private key, read as an integer) is the constant term of a random polynomial f of degree t - 1;
share i is (x_i, f(x_i)) for a non-zero x_i. Any t shares determine f and so s = f(0) by
Lagrange interpolation; fewer than t are independent of s (every s is equally likely), so
`reconstruct` refuses them instead of returning a wrong value.

The field is the Mersenne prime P = 2^521 - 1 (so any 32-byte secret is one field element and a
share is 66 bytes); the coefficients come from `secrets`, the operating system's CSPRNG. In
secure aggregation (Bonawitz et al. 2017) x_i is a device's 1-based index in the round's
participant list. Runs on the device (Python 3.8, standard library only).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import secrets
from typing import Dict, Mapping, Sequence

from .errors import SecAggAborted

P = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8): one field element, big-endian
SECRET_BYTES = 32
MAX_SHARES = 1 << 16


def split(secret: bytes, xs: Sequence[int], threshold: int) -> Dict[int, int]:
    """Shares of `secret` at the points `xs`: {x: f(x)}, any `threshold` of which recover it.

    Raises:
        ValueError: the secret is not 32 bytes, `xs` repeat or leave 1..MAX_SHARES, or the
            threshold is outside 1..len(xs) (a programming error, not a peer's).
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs) or not all(1 <= x <= MAX_SHARES for x in xs):
        raise ValueError(f"share points must be distinct integers in 1..{MAX_SHARES}: {xs}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must lie in 1..{len(xs)} (the share count)")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(P) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % P
        out[x] = y
    return out


def reconstruct(shares: Mapping[int, int], threshold: int, what: str = "secret") -> bytes:
    """The 32-byte secret from at least `threshold` shares {x: y} (Lagrange at 0).

    Raises:
        SecAggAborted: fewer than `threshold` shares, a point outside 1..MAX_SHARES, a value
            outside the field, or shares that do not interpolate to a 32-byte secret (some share
            is wrong).
    """
    if len(shares) < threshold:
        raise SecAggAborted(
            f"{what}: {len(shares)} shares, the threshold is {threshold}; fewer than the "
            "threshold reveal nothing, so the round cannot be unmasked"
        )
    points = sorted(shares.items())[:threshold]
    for x, y in points:
        if not (1 <= x <= MAX_SHARES and 0 <= y < P):
            raise SecAggAborted(f"{what}: share ({x}, ...) lies outside the field")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % P
                den = den * (xi - xj) % P
        secret = (secret + yi * num * pow(den, P - 2, P)) % P
    if secret >> (8 * SECRET_BYTES):
        raise SecAggAborted(f"{what}: the shares do not interpolate to a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def share_bytes(y: int) -> bytes:
    """A share's value as SHARE_BYTES big-endian bytes."""
    return y.to_bytes(SHARE_BYTES, "big")


def share_value(raw: bytes, what: str) -> int:
    """The field element in `raw`; SecAggAborted when it is not SHARE_BYTES or not below P."""
    if len(raw) != SHARE_BYTES:
        raise SecAggAborted(f"{what}: a share is {SHARE_BYTES} bytes, got {len(raw)}")
    y = int.from_bytes(raw, "big")
    if y >= P:
        raise SecAggAborted(f"{what}: share value lies outside the field")
    return y
