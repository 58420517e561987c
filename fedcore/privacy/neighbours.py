"""Who shares keys with whom in a round: the SecAgg+ neighbour graph (Bell et al. 2020).

Bell, Bonawitz, Gascon, Lepoint, Raykova, 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS). Instead of every pair of devices agreeing a mask (n^2 work),
each device masks with and secret-shares to its k neighbours in a random k-regular graph: a
Harary graph H(k, n) over a random ordering of the devices, each joined to the k/2 nearest on
either side of a ring. With k >= n - 1 it is the complete graph, i.e. the original SecAgg
(Bonawitz et al. 2017). The ordering comes from a seed the coordinator announces, so every
device recomputes the same graph itself instead of trusting a list it is sent.

Runs on the device (Python 3.8, standard library only).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import random
from typing import Dict, FrozenSet, Sequence


def neighbours(names: Sequence[str], degree: int, seed: int) -> Dict[str, FrozenSet[str]]:
    """Each device's neighbours (itself excluded) in the round's graph.

    Args:
        names: the round's participants (distinct).
        degree: k, the neighbours each device gets; even when below len(names) - 1.
        seed: the ordering's seed (announced by the coordinator).

    Raises:
        ValueError: fewer than 2 names, repeated names, or an odd degree below n - 1.
    """
    n = len(names)
    if n < 2 or len(set(names)) != n:
        raise ValueError(f"a round needs at least 2 distinct participants, got {list(names)}")
    if degree >= n - 1:
        everyone = frozenset(names)
        return {u: everyone - {u} for u in names}
    if degree < 2 or degree % 2:
        raise ValueError(f"degree {degree} must be even and >= 2 when below {n - 1}")
    order = list(names)
    random.Random(seed).shuffle(order)
    half = degree // 2
    return {
        u: frozenset(order[(i + j) % n] for j in range(-half, half + 1) if j)
        for i, u in enumerate(order)
    }
