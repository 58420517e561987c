"""A device's side of one secure-aggregation round, as a state machine without transport.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth, 2017, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning" (CCS), Fig. 4 (the honest-but-curious
server variant), with the SecAgg+ neighbour graph of Bell et al. 2020 (fedcore.privacy.neighbours).
One object per round; each method is one phase and must be called in order:

  advertise()          -> AdvertiseKeys: fresh X25519 pairs (c for the share channel, s for masks)
  share_keys(book)     -> EncryptedShares: Shamir shares (threshold t) of s_sk and of a fresh
                          self-mask seed b, one AES-GCM ciphertext per neighbour
  mask(relayed, input) -> MaskedInput: y = q(x) + PRG(b) + sum_v +/-PRG(s_uv) mod 2^32, over the
                          neighbours whose shares arrived (they, and only they, masked with us)
  unmask(request)      -> UnmaskShares: for each neighbour, the share of b if it survived or the
                          share of s_sk if it dropped, never both: that rule is what keeps a
                          surviving device's input hidden from the coordinator

The device refuses (SecAggAborted) whenever fewer than t devices remain in a phase, when the
coordinator's sets are inconsistent (a survivor that never sent shares, a dropped device that
later reappears), and when it is asked twice. The threshold must be a majority of the device's
neighbourhood (itself included), so a coordinator cannot lower it to learn more.
Runs on the device (Python 3.8, torch, cryptography).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import hashlib
import secrets
import struct
from typing import Dict, FrozenSet, Mapping, Tuple

import torch

from . import fixedpoint, primitives, shamir
from .errors import SecAggAborted
from .neighbours import neighbours
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


def channel_info(round: int, a: str, b: str) -> bytes:
    """HKDF info of the share channel between devices a and b in `round` (order-free)."""
    lo, hi = sorted((a, b))
    return b"fedmnist secagg share\0" + struct.pack("<Q", round) + f"{lo}\0{hi}".encode()


def mask_info(round: int, a: str, b: str) -> bytes:
    """HKDF info of the pairwise mask between devices a and b in `round` (order-free)."""
    lo, hi = sorted((a, b))
    return b"fedmnist secagg mask\0" + struct.pack("<Q", round) + f"{lo}\0{hi}".encode()


def share_aad(round: int, sender: str, receiver: str) -> bytes:
    """What a share's ciphertext is bound to: round, sender and receiver (AES-GCM's aad)."""
    return struct.pack("<Q", round) + f"{sender}\0{receiver}".encode()


def commitment(round: int, owner: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed, checked by the coordinator after reconstruction."""
    return hashlib.sha256(
        b"fedmnist secagg seed\0" + struct.pack("<Q", round) + owner.encode() + b"\0" + seed
    ).digest()


def sign(setup: Setup, owner: str, other: str) -> int:
    """+1 if `owner` adds the pairwise mask it shares with `other`, -1 if it subtracts it."""
    return 1 if setup.index(owner) < setup.index(other) else -1


def check_threshold(setup: Setup, hood: FrozenSet[str]) -> None:
    """Refuse a threshold below a majority of `hood` (a device and its neighbours) or above it."""
    size = len(hood)
    if not (2 * setup.threshold > size and setup.threshold <= size):
        raise SecAggAborted(
            f"round {setup.round}: threshold {setup.threshold} must be a majority of a "
            f"neighbourhood of {size} devices (more than {size // 2}, at most {size})"
        )


class SecAggDevice:
    """One device's state in one round (see the module docstring).

    Args:
        name: this device's worker name; must be among `setup.participants`.
        setup: the round's parameters, as decoded from the coordinator's Setup message.

    Raises:
        SecAggUnavailable: `cryptography` is missing here.
        SecAggAborted: this device is not a participant, or the threshold is not a majority
            of its neighbourhood.
    """

    def __init__(self, name: str, setup: Setup) -> None:
        primitives.require()
        if name not in setup.participants:
            raise SecAggAborted(f"round {setup.round}: {name!r} is not among the participants")
        self.name = name
        self.setup = setup
        graph = neighbours(setup.participants, setup.degree, setup.graph_seed)
        self.hood = graph[name] | {name}
        check_threshold(setup, self.hood)
        self._c_sk, self.c_pk = primitives.generate_keypair()
        self._s_sk, self.s_pk = primitives.generate_keypair()
        self._seed = secrets.token_bytes(shamir.SECRET_BYTES)
        self._phase = "advertise"
        self._book: Dict[str, Tuple[bytes, bytes]] = {}
        self._own: Tuple[int, int] = (0, 0)  # this device's own shares of (s_sk, b)
        self._held: Dict[str, Tuple[int, int]] = {}  # owner -> its shares of (s_sk, b) for us
        self._maskers: FrozenSet[str] = frozenset()  # U2 within our neighbourhood

    def _enter(self, phase: str, following: str) -> None:
        if self._phase != phase:
            raise SecAggAborted(
                f"round {self.setup.round}: {self.name!r} was asked to {phase} while expecting "
                f"to {self._phase}; a phase is answered once, in order"
            )
        self._phase = following

    def _check_round(self, got: int, what: str) -> None:
        if got != self.setup.round:
            raise SecAggAborted(f"{what} is for round {got}, this is round {self.setup.round}")

    def _enough(self, members: FrozenSet[str], what: str) -> None:
        if len(members) < self.setup.threshold:
            raise SecAggAborted(
                f"round {self.setup.round}: {what}: {len(members)} devices of "
                f"{self.name!r}'s neighbourhood remain, the threshold is {self.setup.threshold}"
            )

    def advertise(self) -> AdvertiseKeys:
        """Phase 0: this round's two public keys."""
        self._enter("advertise", "share")
        return AdvertiseKeys(self.setup.round, self.name, self.c_pk, self.s_pk)

    def share_keys(self, book: KeyBook) -> EncryptedShares:
        """Phase 1: encrypted shares of s_sk and b for every neighbour in `book` (and ourselves)."""
        self._enter("share", "mask")
        self._check_round(book.round, "the key book")
        members = frozenset(book.keys)
        if not members <= self.hood or book.keys.get(self.name) != (self.c_pk, self.s_pk):
            raise SecAggAborted(
                f"round {self.setup.round}: the key book must hold {self.name!r}'s own keys "
                "and otherwise only its neighbours'"
            )
        publics = [k for pair in book.keys.values() for k in pair]
        if len(set(publics)) != len(publics):
            raise SecAggAborted(f"round {self.setup.round}: the key book repeats a public key")
        self._enough(members, "advertised keys")
        self._book = dict(book.keys)
        xs = {v: self.setup.index(v) for v in members}
        s_shares = shamir.split(self._s_sk, list(xs.values()), self.setup.threshold)
        b_shares = shamir.split(self._seed, list(xs.values()), self.setup.threshold)
        out = {}
        for v, x in xs.items():
            if v == self.name:
                self._own = (s_shares[x], b_shares[x])
                continue
            key = primitives.agree(
                self._c_sk, book.keys[v][0], channel_info(book.round, self.name, v)
            )
            plain = shamir.share_bytes(s_shares[x]) + shamir.share_bytes(b_shares[x])
            out[v] = primitives.encrypt(key, plain, share_aad(book.round, self.name, v))
        digest = commitment(book.round, self.name, self._seed)
        return EncryptedShares(self.setup.round, self.name, digest, out)

    def mask(self, relayed: RelayedShares, values: Mapping[str, torch.Tensor]) -> MaskedInput:
        """Phase 2: decrypt the shares held for others, then send the masked, quantised input.

        Args:
            relayed: the ciphertexts addressed to this device; their senders are the neighbours
                that masked with it.
            values: block name -> this device's flat float values (e.g. its model delta); each
                is clipped and quantised to the block's stated range (fedcore.privacy.fixedpoint).

        Raises:
            ShareRejected: a ciphertext fails authentication.
            SecAggAborted: a sender outside the key book, or fewer than t devices left.
        """
        self._enter("mask", "unmask")
        self._check_round(relayed.round, "the relayed shares")
        senders = frozenset(relayed.shares)
        if not senders <= frozenset(self._book) - {self.name}:
            raise SecAggAborted(
                f"round {self.setup.round}: shares relayed from devices outside the key book"
            )
        self._maskers = senders | {self.name}
        self._enough(self._maskers, "devices that shared keys")
        for u, blob in relayed.shares.items():
            key = primitives.agree(
                self._c_sk, self._book[u][0], channel_info(relayed.round, u, self.name)
            )
            plain = primitives.decrypt(key, blob, share_aad(relayed.round, u, self.name))
            s_raw, b_raw = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            what = f"share from {u!r}"
            self._held[u] = (shamir.share_value(s_raw, what), shamir.share_value(b_raw, what))
        n = self.setup.length
        y = fixedpoint.encode(values, self.setup.blocks, len(self.setup.participants))
        y = y + primitives.prg_uint32(self._seed, n)
        for v in sorted(senders):
            seed = primitives.agree(
                self._s_sk, self._book[v][1], mask_info(relayed.round, self.name, v)
            )
            y = y + sign(self.setup, self.name, v) * primitives.prg_uint32(seed, n)
        return MaskedInput(self.setup.round, self.name, y & fixedpoint.MASK)

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Phase 3: shares of b for surviving neighbours, of s_sk for dropped ones.

        Raises:
            SecAggAborted: this device is not among the survivors, a survivor never shared keys,
                or fewer than t survivors remain in its neighbourhood.
        """
        self._enter("unmask", "done")
        self._check_round(request.round, "the unmask request")
        survivors = frozenset(request.survivors)
        if self.name not in survivors:
            raise SecAggAborted(f"round {self.setup.round}: {self.name!r} is not a survivor")
        if not survivors & self.hood <= self._maskers:
            raise SecAggAborted(
                f"round {self.setup.round}: a survivor that never shared keys with {self.name!r}"
            )
        alive = survivors & self._maskers
        self._enough(alive, "survivors")
        held = dict(self._held)
        held[self.name] = self._own
        seeds = {v: shamir.share_bytes(held[v][1]) for v in sorted(alive)}
        keys = {v: shamir.share_bytes(held[v][0]) for v in sorted(self._maskers - alive)}
        return UnmaskShares(self.setup.round, self.name, seeds, keys)
