"""The coordinator's side of one secure-aggregation round: relay, then unmask only the sum.

Bonawitz et al. 2017, Fig. 4 (server side), with the SecAgg+ graph of Bell et al. 2020. The
coordinator sees public keys, ciphertexts it cannot open, masked vectors that are uniformly
random modulo 2^32 one by one, and, at the end, t shares per device of exactly one secret:
the self-mask seed b of a survivor or the mask key s_sk of a device that dropped before
sending its masked input. From those it removes the masks of the sum and nothing else.

Each `collect_*` method takes the replies that arrived in a phase (worker name -> decoded
message; a worker missing from it dropped) and returns the next phase's message per device.
A reply from the wrong sender, for another round or inconsistent with the earlier phases is
left out and named in `refused` (that device counts as dropped); fewer than the threshold left
in any phase raises SecAggAborted. `collect_unmask` returns `SecAggSum`: the dequantised sum of
each block, the count and the survivors, after `fixedpoint.check_sum` (the stand-in for
screening: a sum no set of clipped updates can make is refused).
Python 3.8, torch, cryptography (the same primitives as a device).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Tuple

import torch

from . import fixedpoint, primitives, shamir
from .errors import SecAggAborted
from .neighbours import neighbours
from .secagg_device import check_threshold, commitment, mask_info, sign
from .secagg_messages import (
    AdvertiseKeys,
    EncryptedShares,
    KeyBook,
    MaskedInput,
    RelayedShares,
    Setup,
    UnmaskRequest,
    UnmaskShares,
)


@dataclass(frozen=True)
class SecAggSum:
    """What a round of secure aggregation ends with: the sum and the count, nothing per device."""

    round: int
    count: int
    survivors: Tuple[str, ...]
    sums: Dict[str, torch.Tensor]  # block name -> float64 flat sum of the survivors' blocks


class SecAggCoordinator:
    """The coordinator's state in one round (see the module docstring).

    Raises:
        SecAggUnavailable: `cryptography` is missing on the coordinator.
        SecAggAborted: the setup's threshold is not a majority of every neighbourhood.
    """

    def __init__(self, setup: Setup) -> None:
        primitives.require()
        self.setup = setup
        graph = neighbours(setup.participants, setup.degree, setup.graph_seed)
        self.hood: Dict[str, FrozenSet[str]] = {u: graph[u] | {u} for u in setup.participants}
        for hood in self.hood.values():
            check_threshold(setup, hood)
        self.refused: Dict[str, str] = {}  # worker -> why its reply was left out
        self._keys: Dict[str, Tuple[bytes, bytes]] = {}  # U1
        self._commitments: Dict[str, bytes] = {}
        self._shared: FrozenSet[str] = frozenset()  # U2
        self._masked: Dict[str, torch.Tensor] = {}  # U3
        self._phase = "keys"

    def _enter(self, phase: str, following: str) -> None:
        if self._phase != phase:
            raise RuntimeError(f"collect_{phase} called while expecting collect_{self._phase}")
        self._phase = following

    def _accept(self, replies: Mapping[str, Any], allowed: FrozenSet[str]) -> List[str]:
        """Workers whose reply names them, this round, and who may answer in this phase."""
        out = []
        for worker, msg in sorted(replies.items()):
            if msg.sender != worker:
                self.refused[worker] = f"its reply names sender {msg.sender!r}"
            elif msg.round != self.setup.round:
                self.refused[worker] = f"its reply is for round {msg.round}"
            elif worker not in allowed:
                self.refused[worker] = "it answered a phase it was not asked into"
            else:
                out.append(worker)
        return out

    def _enough(self, members: FrozenSet[str], what: str) -> None:
        if len(members) < self.setup.threshold:
            raise SecAggAborted(
                f"round {self.setup.round}: {len(members)} devices {what}, the threshold is "
                f"{self.setup.threshold}; refused: {self.refused or 'none'}"
            )

    def collect_keys(self, replies: Mapping[str, AdvertiseKeys]) -> Dict[str, KeyBook]:
        """Phase 0 -> 1: each advertising device gets its neighbours' keys (and its own)."""
        self._enter("keys", "shares")
        seen: Dict[bytes, str] = {}
        for worker in self._accept(replies, frozenset(self.setup.participants)):
            msg = replies[worker]
            if msg.c_pk == msg.s_pk or msg.c_pk in seen or msg.s_pk in seen:
                self.refused[worker] = "it advertised a public key already in use"
                continue
            seen[msg.c_pk] = seen[msg.s_pk] = worker
            self._keys[worker] = (msg.c_pk, msg.s_pk)
        members = frozenset(self._keys)
        self._enough(members, "advertised keys")
        books = {}
        for u in sorted(members):
            hood = self.hood[u] & members
            if len(hood) >= self.setup.threshold:
                books[u] = KeyBook(self.setup.round, {v: self._keys[v] for v in sorted(hood)})
            else:
                self.refused[u] = "too few of its neighbours advertised keys"
        self._keys = {u: self._keys[u] for u in books}
        return books

    def collect_shares(self, replies: Mapping[str, EncryptedShares]) -> Dict[str, RelayedShares]:
        """Phase 1 -> 2: relay to each device the ciphertexts addressed to it."""
        self._enter("shares", "masked")
        shared = {}
        for worker in self._accept(replies, frozenset(self._keys)):
            msg = replies[worker]
            expected = self.hood[worker] & frozenset(self._keys) - {worker}
            if frozenset(msg.shares) != expected:
                self.refused[worker] = "its shares are not addressed to exactly its key book"
                continue
            shared[worker] = msg
            self._commitments[worker] = msg.commitment
        self._shared = frozenset(shared)
        self._enough(self._shared, "sent their shares")
        return {
            v: RelayedShares(
                self.setup.round,
                {u: shared[u].shares[v] for u in sorted(self.hood[v] & self._shared - {v})},
            )
            for v in sorted(self._shared)
        }

    def collect_masked(self, replies: Mapping[str, MaskedInput]) -> Dict[str, UnmaskRequest]:
        """Phase 2 -> 3: the survivors are the devices whose masked input arrived."""
        self._enter("masked", "unmask")
        for worker in self._accept(replies, self._shared):
            vector = replies[worker].vector
            if vector.dtype != torch.int64 or tuple(vector.shape) != (self.setup.length,):
                self.refused[worker] = f"its masked input has shape {list(vector.shape)}"
                continue
            self._masked[worker] = vector
        survivors = frozenset(self._masked)
        self._enough(survivors, "sent their masked input")
        request = UnmaskRequest(self.setup.round, tuple(sorted(survivors)))
        return {u: request for u in sorted(survivors)}

    def collect_unmask(self, replies: Mapping[str, UnmaskShares]) -> SecAggSum:
        """Phase 3 -> result: reconstruct what removes the masks, return the checked sum.

        Raises:
            SecAggAborted: fewer than t shares for some secret, or a reconstructed secret that
                does not match its commitment or public key (a device sent a wrong share).
            UpdateRejected: the sum is out of the range clipped updates allow.
        """
        self._enter("unmask", "done")
        survivors = frozenset(self._masked)
        dropped = self._shared - survivors
        seed_shares: Dict[str, Dict[int, int]] = {u: {} for u in survivors}
        key_shares: Dict[str, Dict[int, int]] = {v: {} for v in dropped}
        for worker in self._accept(replies, survivors):
            msg = replies[worker]
            hood = self.hood[worker] & self._shared
            if frozenset(msg.seed_shares) != hood & survivors or frozenset(msg.key_shares) != (
                hood & dropped
            ):
                self.refused[worker] = "its unmasking shares do not match the survivors"
                continue
            x = self.setup.index(worker)
            what = f"unmasking share from {worker!r}"
            for owner, raw in msg.seed_shares.items():
                seed_shares[owner][x] = shamir.share_value(raw, what)
            for owner, raw in msg.key_shares.items():
                key_shares[owner][x] = shamir.share_value(raw, what)
        n, rnd = self.setup.length, self.setup.round
        total = torch.zeros(n, dtype=torch.int64)
        for u in sorted(survivors):
            seed = shamir.reconstruct(seed_shares[u], self.setup.threshold, f"{u!r}'s mask seed")
            if commitment(rnd, u, seed) != self._commitments[u]:
                raise SecAggAborted(f"round {rnd}: {u!r}'s reconstructed seed fails its commitment")
            total = (total + self._masked[u] - primitives.prg_uint32(seed, n)) & fixedpoint.MASK
        for v in sorted(dropped):
            s_sk = shamir.reconstruct(key_shares[v], self.setup.threshold, f"{v!r}'s mask key")
            if primitives.public_key(s_sk) != self._keys[v][1]:
                raise SecAggAborted(f"round {rnd}: {v!r}'s reconstructed key fails its public key")
            for w in sorted(self.hood[v] & survivors):
                pair = primitives.prg_uint32(
                    primitives.agree(s_sk, self._keys[w][1], mask_info(rnd, w, v)), n
                )
                total = (total - sign(self.setup, w, v) * pair) & fixedpoint.MASK
        devices = len(self.setup.participants)
        sums = fixedpoint.decode(total, self.setup.blocks, devices)
        fixedpoint.check_sum(sums, self.setup.blocks, devices, len(survivors))
        return SecAggSum(rnd, len(survivors), tuple(sorted(survivors)), sums)


def block_tensors(
    result: SecAggSum, block: str, spec: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]]
) -> Dict[str, torch.Tensor]:
    """A block of the sum, divided by the count and cut back into named tensors: for block
    "delta" the survivors' mean model delta (add it to the global model, or hand it to the
    server optimizer as FedOpt does with global - average), in `spec`'s order and dtypes."""
    mean = result.sums[block] / result.count
    layout = [(name, tuple(shape), dtype) for name, (shape, dtype) in spec.items()]
    return fixedpoint.unflatten(mean, layout)
