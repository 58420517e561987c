"""Typed errors of fedcore.

Each says what was wrong, with which value, and what to do. Runs on the device too (Python 3.8).
"""

from __future__ import annotations


class FedError(Exception):
    """Base class of every error fedcore raises on purpose."""


class ConfigError(FedError):
    """A configuration file or field is invalid."""


class DataError(FedError):
    """MNIST files are missing, corrupted or could not be obtained."""


class ShardError(DataError):
    """A worker's shard is missing or empty."""


class WireError(FedError):
    """Bytes received from a peer are not a valid frame or tensor file."""


class FrameTooLarge(WireError):
    """A frame announces more bytes than the receiver accepts."""


class UpdateRejected(FedError):
    """A model update failed validation (names, shapes, dtypes, finite values)."""

    def __init__(self, worker: str, reason: str) -> None:
        super().__init__(f"update from worker {worker!r} rejected: {reason}")
        self.worker = worker
        self.reason = reason


class WorkerError(FedError):
    """A worker failed; `worker` names it."""

    def __init__(self, worker: str, message: str) -> None:
        super().__init__(f"worker {worker!r}: {message}")
        self.worker = worker


class WorkerUnreachable(WorkerError):
    """The worker program could not be started or its connection dropped (transient)."""


class WorkerTimeout(WorkerUnreachable):
    """The worker did not answer within its deadline (transient)."""


class WorkerFailed(WorkerError):
    """The worker answered with an error (not transient: retrying gives the same answer)."""


class HostKeyMismatch(WorkerError):
    """The device's SSH host key is unknown or changed. Never retried."""


class QuorumNotReached(FedError):
    """Fewer workers than the quorum returned a valid update in a round."""
