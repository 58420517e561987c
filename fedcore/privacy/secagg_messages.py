"""The messages of one secure-aggregation round, typed, encoded as wire frames, checked on decode.

A round (Bonawitz et al. 2017, Fig. 4, honest-but-curious server; SecAgg+ graph, Bell et al.
2020), coordinator <-> each device, every message a frame (fedcore.wire: JSON + payload):

  Setup          coord -> all    round, participants (index = x of their Shamir shares),
                                 threshold t, graph degree and seed, the input's blocks
  AdvertiseKeys  device -> coord two X25519 public keys: c (share channel), s (masks)
  KeyBook        coord -> device the keys of the device's neighbours that advertised
  EncryptedShares device -> coord AES-GCM ciphertexts, one per neighbour, of Shamir shares of
                                 its s private key and self-mask seed b; a SHA-256 commitment to b
  RelayedShares  coord -> device the ciphertexts addressed to it (their senders: who masks)
  MaskedInput    device -> coord y = x + PRG(b) +/- PRG(s_uv) for each neighbour v, mod 2^32
                                 (SCAFFOLD: and `control_lost` when it lost its c_i)
  UnmaskRequest  coord -> device the survivors (devices whose masked input arrived)
  UnmaskShares   device -> coord shares of b for surviving neighbours, of s for dropped ones

Bytes travel base64 in the JSON; the masked vector is the frame's payload (little-endian
uint32). Decoding bounds everything before work: counts of devices (MAX_DEVICES), names (the
config's name pattern), exact key, share and ciphertext sizes, the vector's length; any
violation is a `WireError` naming the message and field. Nothing is unpickled.
Runs on the device (Python 3.8, torch).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import base64
import binascii
import ctypes
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from .. import wire
from ..errors import WireError
from .fixedpoint import MAX_LENGTH, Block
from .primitives import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from .shamir import SHARE_BYTES

MAX_DEVICES = 1024
MAX_ROUND = 2**31 - 1
MAX_BLOCKS = 8
PLAINTEXT_BYTES = 2 * SHARE_BYTES  # share of s, share of b
CIPHERTEXT_BYTES = NONCE_BYTES + PLAINTEXT_BYTES + TAG_BYTES
DIGEST_BYTES = 32
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Setup:
    round: int
    participants: Tuple[str, ...]
    threshold: int
    degree: int
    graph_seed: int
    blocks: Tuple[Block, ...]

    def index(self, name: str) -> int:
        """`name`'s Shamir x: its 1-based position among the participants."""
        return self.participants.index(name) + 1

    @property
    def length(self) -> int:
        return sum(b.length for b in self.blocks)


@dataclass(frozen=True)
class AdvertiseKeys:
    round: int
    sender: str
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class KeyBook:
    round: int
    keys: Dict[str, Tuple[bytes, bytes]]  # name -> (c_pk, s_pk)


@dataclass(frozen=True)
class EncryptedShares:
    round: int
    sender: str
    commitment: bytes  # SHA-256 of the self-mask seed b (fedcore.privacy.secagg_device)
    shares: Dict[str, bytes]  # recipient -> ciphertext


@dataclass(frozen=True)
class RelayedShares:
    round: int
    shares: Dict[str, bytes]  # sender -> ciphertext addressed to the receiving device


@dataclass(frozen=True)
class MaskedInput:
    round: int
    sender: str
    vector: torch.Tensor  # int64, entries 0..2^32 - 1
    # SCAFFOLD: the device no longer holds the control variate the server counts for it (a new
    # process): it says only that, in the clear, so the server can start every c_i again at 0
    control_lost: bool = False


@dataclass(frozen=True)
class UnmaskRequest:
    round: int
    survivors: Tuple[str, ...]


@dataclass(frozen=True)
class UnmaskShares:
    round: int
    sender: str
    seed_shares: Dict[str, bytes]  # surviving owner -> share of its b
    key_shares: Dict[str, bytes]  # dropped owner -> share of its s private key


Message = Union[
    Setup,
    AdvertiseKeys,
    KeyBook,
    EncryptedShares,
    RelayedShares,
    MaskedInput,
    UnmaskRequest,
    UnmaskShares,
]
KINDS = {
    Setup: "secagg_setup",
    AdvertiseKeys: "secagg_keys",
    KeyBook: "secagg_book",
    EncryptedShares: "secagg_shares",
    RelayedShares: "secagg_relay",
    MaskedInput: "secagg_masked",
    UnmaskRequest: "secagg_unmask",
    UnmaskShares: "secagg_reveal",
}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _bytes(value: Any, what: str, size: int) -> bytes:
    """Exactly `size` bytes from base64 text, bounded before decoding."""
    limit = 4 * math.ceil(size / 3)
    text = wire.text(value, what, limit)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{what} is not base64: {wire.quote(text)}") from None
    if len(raw) != size:
        raise WireError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def _name(value: Any, what: str) -> str:
    name = wire.text(value, what, 64)
    if not NAME.match(name):
        raise WireError(f"{what} {wire.quote(name)} is not a worker name")
    return name


def _names(value: Any, what: str) -> Tuple[str, ...]:
    names = tuple(_name(v, what) for v in wire.array(value, what, MAX_DEVICES))
    if len(set(names)) != len(names):
        raise WireError(f"{what} repeats a name")
    return names


def _by_name(value: Any, what: str, size: int) -> Dict[str, bytes]:
    table = wire.mapping(value, what)
    if len(table) > MAX_DEVICES:
        raise WireError(f"{what} names {len(table)} devices, at most {MAX_DEVICES}")
    return {_name(k, f"{what} key"): _bytes(v, f"{what}[{k!r}]", size) for k, v in table.items()}


def encode(msg: Message) -> bytes:
    """`msg` as one wire frame."""
    kind = KINDS[type(msg)]
    payload = b""
    meta: Dict[str, Any]
    if isinstance(msg, Setup):
        blocks = [
            {"name": b.name, "length": b.length, "clip_norm": b.clip_norm, "bound": b.bound}
            for b in msg.blocks
        ]
        meta = {
            "participants": list(msg.participants),
            "threshold": msg.threshold,
            "degree": msg.degree,
            "graph_seed": msg.graph_seed,
            "blocks": blocks,
        }
    elif isinstance(msg, AdvertiseKeys):
        meta = {"sender": msg.sender, "c_pk": _b64(msg.c_pk), "s_pk": _b64(msg.s_pk)}
    elif isinstance(msg, KeyBook):
        meta = {"keys": {k: [_b64(c), _b64(s)] for k, (c, s) in msg.keys.items()}}
    elif isinstance(msg, EncryptedShares):
        meta = {
            "sender": msg.sender,
            "commitment": _b64(msg.commitment),
            "shares": {k: _b64(v) for k, v in msg.shares.items()},
        }
    elif isinstance(msg, RelayedShares):
        meta = {"shares": {k: _b64(v) for k, v in msg.shares.items()}}
    elif isinstance(msg, MaskedInput):
        v = msg.vector.to(torch.int64)
        signed = torch.where(v >= 2**31, v - 2**32, v).to(torch.int32).contiguous()
        payload = ctypes.string_at(signed.data_ptr(), signed.numel() * 4)
        meta = {"sender": msg.sender, "length": int(signed.numel())}
        if msg.control_lost:
            meta["control_lost"] = True
    elif isinstance(msg, UnmaskRequest):
        meta = {"survivors": list(msg.survivors)}
    else:
        meta = {
            "sender": msg.sender,
            "seed_shares": {k: _b64(v) for k, v in msg.seed_shares.items()},
            "key_shares": {k: _b64(v) for k, v in msg.key_shares.items()},
        }
    return wire.encode_frame({"type": kind, "round": msg.round, **meta}, payload)


def decode(data: bytes, length: Optional[int] = None) -> Message:
    """The message in one frame, every field checked.

    Args:
        length: the entries a masked input must have (the round's `Setup.length`); a masked
            input is refused without it, so its payload is bounded by what the round expects.

    Raises:
        WireError: not a frame, an unknown type, a missing, extra or malformed field.
    """
    max_payload = 4 * length if length is not None else 0
    meta, payload = wire.decode_frame(data, max_payload=max_payload)
    return decode_meta(meta, payload, length)


def decode_meta(meta: Mapping[str, Any], payload: bytes, length: Optional[int] = None) -> Message:
    """`decode` for a frame already split into (meta, payload) by the session's reader."""
    kinds = {v: k for k, v in KINDS.items()}
    kind = meta.get("type")
    cls = kinds.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(f"not a secure-aggregation message: type {wire.quote(kind)}")
    fields = {
        Setup: {"participants", "threshold", "degree", "graph_seed", "blocks"},
        AdvertiseKeys: {"sender", "c_pk", "s_pk"},
        KeyBook: {"keys"},
        EncryptedShares: {"sender", "commitment", "shares"},
        RelayedShares: {"shares"},
        MaskedInput: {"sender", "length"},
        UnmaskRequest: {"survivors"},
        UnmaskShares: {"sender", "seed_shares", "key_shares"},
    }[cls] | {"type", "round"}
    if cls is MaskedInput and "control_lost" in meta:
        fields = fields | {"control_lost"}  # only when true, so older devices still decode
    if set(meta) != fields:
        raise WireError(f"{kind}: fields {sorted(meta)} differ from the expected {sorted(fields)}")
    what = str(kind)
    rnd = wire.integer(meta["round"], f"{what} round", 1, MAX_ROUND)
    if cls is not MaskedInput and payload:
        raise WireError(f"{what} carries {len(payload)} payload bytes, expected none")
    if cls is Setup:
        return _setup(meta, rnd)
    if cls is AdvertiseKeys:
        return AdvertiseKeys(
            rnd,
            _name(meta["sender"], f"{what} sender"),
            _bytes(meta["c_pk"], f"{what} c_pk", KEY_BYTES),
            _bytes(meta["s_pk"], f"{what} s_pk", KEY_BYTES),
        )
    if cls is KeyBook:
        table = wire.mapping(meta["keys"], f"{what} keys")
        if len(table) > MAX_DEVICES:
            raise WireError(f"{what} keys name {len(table)} devices, at most {MAX_DEVICES}")
        keys = {}
        for k, pair in table.items():
            c, s = wire.array(pair, f"{what} keys[{k!r}]", 2) + [None, None][len(pair) :]
            keys[_name(k, f"{what} key")] = (
                _bytes(c, f"{what} c_pk of {k!r}", KEY_BYTES),
                _bytes(s, f"{what} s_pk of {k!r}", KEY_BYTES),
            )
        return KeyBook(rnd, keys)
    if cls is EncryptedShares:
        return EncryptedShares(
            rnd,
            _name(meta["sender"], f"{what} sender"),
            _bytes(meta["commitment"], f"{what} commitment", DIGEST_BYTES),
            _by_name(meta["shares"], f"{what} shares", CIPHERTEXT_BYTES),
        )
    if cls is RelayedShares:
        return RelayedShares(rnd, _by_name(meta["shares"], f"{what} shares", CIPHERTEXT_BYTES))
    if cls is MaskedInput:
        n = wire.integer(meta["length"], f"{what} length", 1, MAX_LENGTH)
        if length is None or n != length:
            raise WireError(f"{what} has {n} entries, this round's input has {length}")
        if len(payload) != 4 * n:
            raise WireError(f"{what} payload is {len(payload)} bytes, expected {4 * n}")
        lost = "control_lost" in meta
        if lost and meta["control_lost"] is not True:
            got = wire.quote(meta["control_lost"])
            raise WireError(f"{what} control_lost must be true if sent, got {got}")
        vector = torch.frombuffer(bytearray(payload), dtype=torch.int32).to(torch.int64)
        sender = _name(meta["sender"], f"{what} sender")
        return MaskedInput(rnd, sender, vector & 0xFFFFFFFF, control_lost=lost)
    if cls is UnmaskRequest:
        return UnmaskRequest(rnd, _names(meta["survivors"], f"{what} survivors"))
    return UnmaskShares(
        rnd,
        _name(meta["sender"], f"{what} sender"),
        _by_name(meta["seed_shares"], f"{what} seed_shares", SHARE_BYTES),
        _by_name(meta["key_shares"], f"{what} key_shares", SHARE_BYTES),
    )


def _setup(meta: Mapping[str, Any], rnd: int) -> Setup:
    what = "secagg_setup"
    participants = _names(meta["participants"], f"{what} participants")
    n = len(participants)
    if n < 2:
        raise WireError(f"{what} needs at least 2 participants, got {n}")
    threshold = wire.integer(meta["threshold"], f"{what} threshold", 2, n)
    degree = wire.integer(meta["degree"], f"{what} degree", 2, MAX_DEVICES)
    if degree < n - 1 and degree % 2:
        raise WireError(f"{what} degree {degree} must be even when below {n - 1}")
    seed = wire.integer(meta["graph_seed"], f"{what} graph_seed")
    blocks = []
    for i, raw in enumerate(wire.array(meta["blocks"], f"{what} blocks", MAX_BLOCKS)):
        b = wire.mapping(raw, f"{what} blocks[{i}]")
        if set(b) != {"name", "length", "clip_norm", "bound"}:
            raise WireError(f"{what} blocks[{i}] has fields {sorted(b)}")
        blocks.append(
            Block(
                _name(b["name"], f"{what} block name"),
                wire.integer(b["length"], f"{what} block length", 1, MAX_LENGTH),
                wire.number(b["clip_norm"], f"{what} block clip_norm", 1e-12, 1e12),
                wire.number(b["bound"], f"{what} block bound", 1e-12, 1e12),
            )
        )
    if not blocks or len({b.name for b in blocks}) != len(blocks):
        raise WireError(f"{what} needs at least one block, with distinct names")
    if sum(b.length for b in blocks) > MAX_LENGTH:
        raise WireError(f"{what} blocks hold more than {MAX_LENGTH} entries")
    return Setup(rnd, participants, threshold, degree, seed, tuple(blocks))
