"""Typed errors of secure aggregation, in the style of fedcore.errors (cause, transient).

- `SecAggUnavailable`: this Python lacks a usable `cryptography` package; the message says how to
  install it. Not transient: the device must be fixed.
- `SecAggAborted`: a round of secure aggregation cannot finish safely (fewer than the threshold
  of devices left, a set of devices inconsistent between phases, a reconstructed key that does
  not match its public key). Transient, like `QuorumNotReached`: the same round tried again with
  the devices that are back may succeed.
- `ShareRejected`: an encrypted share failed authentication (tampered, misaddressed, replayed
  from another round). A `WireError`: bytes from a peer that are not what the protocol allows.

Runs on the device (Python 3.8).
"""

from __future__ import annotations

from ..errors import FedError, WireError


class SecAggUnavailable(FedError):
    """The `cryptography` package is missing or too old here. Not transient."""

    cause = "failed"
    transient = False


class SecAggAborted(FedError):
    """A secure-aggregation round cannot complete safely. Transient: retry the round."""

    cause = "failed"
    transient = True


class ShareRejected(WireError):
    """An encrypted share failed authentication or names the wrong sender, receiver or round."""

    cause = "failed"
    transient = False
