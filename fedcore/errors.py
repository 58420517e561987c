"""Typed errors of fedcore, each carrying its cause and whether it is transient.

Each says what was wrong, with which value, and what to do. Every class sets two attributes that
the coordinator's policy reads instead of matching class names:

- `cause`: the word a worker's `Failure` in a round and its log line use: "unreachable",
  "timeout" or "rejected" for those three, "failed" for every other error (the worker answered
  with an error, or the coordinator failed to build or read its request).
- `transient`: retrying the same call may succeed, so a task that raised it is retried. A false
  value means retrying would give the same answer or is pointless (the deadline has passed).

Runs on the device too (Python 3.8).
"""

from __future__ import annotations


class FedError(Exception):
    """Base class of every error fedcore raises on purpose. Not transient."""

    cause: str = "failed"
    transient: bool = False


class ConfigError(FedError):
    """A configuration file or field is invalid. Not transient: the same config fails again."""

    cause = "failed"
    transient = False


class DataError(FedError):
    """MNIST files are missing, corrupted or could not be obtained. Not transient."""

    cause = "failed"
    transient = False


class ShardError(DataError):
    """A worker's shard is missing or empty. Not transient."""

    cause = "failed"
    transient = False


class WireError(FedError):
    """Bytes received from a peer are not a valid frame or tensor file. Not transient."""

    cause = "failed"
    transient = False


class FrameTooLarge(WireError):
    """A frame announces more bytes than the receiver accepts. Not transient."""

    cause = "failed"
    transient = False


class UpdateRejected(FedError):
    """A model update failed validation (names, shapes, dtypes, finite values).

    Not transient: the worker computed this update from the round's request, so asking again
    gives the same update. The round goes on without it.
    """

    cause = "rejected"
    transient = False

    def __init__(self, worker: str, reason: str) -> None:
        super().__init__(f"update from worker {worker!r} rejected: {reason}")
        self.worker = worker
        self.reason = reason


class WorkerError(FedError):
    """A worker failed; `worker` names it. Not transient unless a subclass says so."""

    cause = "failed"
    transient = False

    def __init__(self, worker: str, message: str) -> None:
        super().__init__(f"worker {worker!r}: {message}")
        self.worker = worker


class WorkerUnreachable(WorkerError):
    """The worker program could not be started or its connection dropped.

    Transient: the call is retried, and the session starts the program again first.
    """

    cause = "unreachable"
    transient = True


class WorkerTimeout(WorkerUnreachable):
    """The worker did not answer within its deadline.

    Not retried within the round: the round's deadline has passed, so the round goes on without
    the worker. The session drops the connection and reopens it on the worker's next call
    (the next round).
    """

    cause = "timeout"
    transient = False


class WorkerFailed(WorkerError):
    """The worker answered with an error. Not transient: retrying gives the same answer."""

    cause = "failed"
    transient = False


class HostKeyMismatch(WorkerError):
    """The device's SSH host key is unknown or changed. Never retried: a person must check it."""

    cause = "failed"
    transient = False


class QuorumNotReached(FedError):
    """Fewer workers than the quorum returned a valid update in a round.

    Transient: the round as a whole may succeed when tried again (a dropped worker may be back),
    so the flow trains the round again when the config says `below_quorum: retry` (at most
    `round_retries` times) and fails the training otherwise.
    """

    cause = "failed"
    transient = True


def cause_of(exc: object) -> str:
    """The failure word for `exc`: its `cause` if it is a FedError, "failed" for anything else
    (any other exception, or what a crashed task left)."""
    return exc.cause if isinstance(exc, FedError) else FedError.cause
