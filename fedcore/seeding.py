"""Derived seeds: one experiment seed fixes model init and every worker's sampling in every round.

Runs on the device too (Python 3.8, standard library only).
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from `seed` and `parts` (stable across processes and machines)."""
    text = "/".join([str(seed)] + [str(p) for p in parts]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1
