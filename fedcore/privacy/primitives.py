"""The cryptography secure aggregation needs, from the `cryptography` package, imported lazily.

Nothing here is hand-rolled: X25519 key agreement, HKDF-SHA256, AES-256-GCM for the encrypted
Shamir shares, and AES-256-CTR as the PRG that expands a 32-byte seed into a mask of uint32
values (Bonawitz et al. 2017, Sec. 3 and 6: key agreement, authenticated encryption and a PRG).
`cryptography` is imported on first use only, so a worker without it starts and trains as long
as secure aggregation is off; `secagg_available()` says whether this Python can take part, for
`workers check` and for refusing a device before round 1.

Older `cryptography` releases (2.x, as in Ubuntu 20.04's python3-cryptography on JetPack 5)
require a `backend` argument that newer ones ignore, so it is always passed. Masks are read as
little-endian uint32 (every Jetson and x86 host is little-endian; fedcore.tensorcodec refuses
others). Runs on the device (Python 3.8, torch, cryptography).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import os
from typing import Any, Tuple

import torch

from ..errors import WireError
from .errors import SecAggUnavailable, ShareRejected

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
INSTALL = (
    "install it on this Python (`python3 -m pip install --user cryptography`, or the system "
    "package python3-cryptography), or turn secure_aggregation off"
)


def _crypto() -> Any:
    """The `cryptography` modules we use, imported once; SecAggUnavailable names the fix."""
    global _MODULES
    if _MODULES is None:
        try:
            from cryptography.exceptions import InvalidTag
            from cryptography.hazmat.backends import default_backend
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import x25519
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        except ImportError as exc:
            raise SecAggUnavailable(
                f"secure aggregation needs the `cryptography` package ({exc}): {INSTALL}"
            ) from None
        _MODULES = {
            "InvalidTag": InvalidTag,
            "backend": default_backend(),
            "hashes": hashes,
            "serialization": serialization,
            "x25519": x25519,
            "Cipher": Cipher,
            "algorithms": algorithms,
            "modes": modes,
            "AESGCM": AESGCM,
            "HKDF": HKDF,
        }
    return _MODULES


_MODULES: Any = None


def secagg_available() -> Tuple[bool, str]:
    """(True, version) when this Python can take part in secure aggregation, else (False, why
    and how to fix it). Exercises every primitive once, so an OpenSSL without X25519 shows too."""
    try:
        sk, pk = generate_keypair()
        key = agree(sk, pk, b"check")
        blob = encrypt(key, b"x", b"aad")
        decrypt(key, blob, b"aad")
        prg_uint32(key, 4)
    except SecAggUnavailable as exc:
        return False, str(exc)
    except Exception as exc:  # an old OpenSSL or cryptography: say what failed
        return False, f"secure aggregation cannot run here ({type(exc).__name__}: {exc}): {INSTALL}"
    import cryptography

    return True, f"cryptography {cryptography.__version__}"


def require() -> None:
    """Raise SecAggUnavailable unless `secagg_available()`."""
    ok, message = secagg_available()
    if not ok:
        raise SecAggUnavailable(message)


def generate_keypair() -> Tuple[bytes, bytes]:
    """A fresh X25519 (private, public) key pair as 32 raw bytes each."""
    c = _crypto()
    sk = c["x25519"].X25519PrivateKey.generate()
    return _raw_private(sk), _raw_public(sk.public_key())


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a raw private key (e.g. one reconstructed from shares)."""
    c = _crypto()
    if len(private) != KEY_BYTES:
        raise WireError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(private)}")
    return _raw_public(c["x25519"].X25519PrivateKey.from_private_bytes(private).public_key())


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256(X25519(private, peer_public), info).

    Raises:
        WireError: the peer's key is not 32 bytes or is a low-order point (all-zero secret).
    """
    c = _crypto()
    if len(peer_public) != KEY_BYTES:
        raise WireError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(peer_public)}")
    sk = c["x25519"].X25519PrivateKey.from_private_bytes(private)
    try:
        shared = sk.exchange(c["x25519"].X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise WireError(f"X25519 public key refused: {exc}") from None
    if shared == bytes(KEY_BYTES):
        raise WireError("X25519 public key refused: it is a low-order point")
    hkdf = c["HKDF"](
        algorithm=c["hashes"].SHA256(), length=KEY_BYTES, salt=None, info=info, backend=c["backend"]
    )
    return bytes(hkdf.derive(shared))


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: a fresh random nonce, then the ciphertext and its tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + bytes(_crypto()["AESGCM"](key).encrypt(nonce, plaintext, aad))


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of `encrypt`; ShareRejected when the blob was changed or the aad differs."""
    c = _crypto()
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ShareRejected(f"ciphertext of {len(blob)} bytes is shorter than nonce and tag")
    try:
        return bytes(c["AESGCM"](key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad))
    except c["InvalidTag"]:
        raise ShareRejected(
            "encrypted share failed authentication: changed in transit, or not sent by the "
            "named device to this device in this round"
        ) from None


def prg_uint32(seed: bytes, length: int) -> torch.Tensor:
    """`length` pseudo-random uint32 values (an int64 tensor, 0..2^32 - 1) expanded from `seed`
    by AES-256-CTR from a zero counter: the same seed gives the same mask on every host."""
    c = _crypto()
    if len(seed) != KEY_BYTES:
        raise ValueError(f"a PRG seed is {KEY_BYTES} bytes, got {len(seed)}")
    cipher = c["Cipher"](
        c["algorithms"].AES(seed), c["modes"].CTR(bytes(16)), backend=c["backend"]
    ).encryptor()
    stream = bytearray(cipher.update(bytes(4 * length)) + cipher.finalize())
    return torch.frombuffer(stream, dtype=torch.int32).to(torch.int64) & 0xFFFFFFFF


def _raw_private(sk: Any) -> bytes:
    s = _crypto()["serialization"]
    return bytes(sk.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption()))


def _raw_public(pk: Any) -> bytes:
    s = _crypto()["serialization"]
    return bytes(pk.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw))
