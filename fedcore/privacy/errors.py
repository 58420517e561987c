"""Typed errors of secure aggregation and the privacy budget (cause, transient; fedcore.errors).

- `SecAggUnavailable`: this Python lacks a usable `cryptography` package; the message says how to
  install it. Not transient: the device must be fixed.
- `SecAggAborted`: a round of secure aggregation cannot finish safely (fewer than the threshold
  of devices left, a set of devices inconsistent between phases, a reconstructed key that does
  not match its public key). Transient, like `QuorumNotReached`: the same round tried again with
  the devices that are back may succeed.
- `ShareRejected`: an encrypted share failed authentication (tampered, misaddressed, replayed
  from another round). A `WireError`: bytes from a peer that are not what the protocol allows.
- `PrivacyBudgetSpent`: the coordinator's privacy ledger (fedcore.privacy.budget) ends the
  training: a device's budget is spent and the config says stop-training, or too few devices
  have budget left for the quorum. Raised on the coordinator only.

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


class PrivacyBudgetSpent(FedError):
    """The training cannot go on within the privacy budget (`privacy.on_budget_spent:
    stop-training`, or too few devices left with budget for the quorum). Coordinator only.
    Not transient: trying again spends more."""

    cause = "failed"
    transient = False
