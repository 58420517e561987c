"""What can go wrong reaching a device over SSH, beyond fedcore's general worker errors.

No paramiko here, so code that only catches these (the CLI, tests) need not load it.
"""

from __future__ import annotations

from ...errors import HostKeyMismatch, WorkerError, WorkerFailed


class UnknownHostKey(HostKeyMismatch):
    """The device's host key is not in known_hosts (status 'unknown')."""

    status = "unknown"

    def __init__(self, worker: str, message: str, offered: str) -> None:
        super().__init__(worker, message)
        self.offered = offered


class ChangedHostKey(HostKeyMismatch):
    """known_hosts holds another key for this device (status 'changed')."""

    status = "changed"

    def __init__(self, worker: str, message: str, offered: str, expected: str) -> None:
        super().__init__(worker, message)
        self.offered = offered
        self.expected = expected


class SSHAuthFailed(WorkerError):
    """The device refused our key (or no key was available). Not transient: fix the config."""


class RemoteSetupError(WorkerFailed):
    """The device's Python, torch or work folder is not usable. Not transient."""


class RevokedHostKey(HostKeyMismatch):
    """The device offers a key that known_hosts marks `@revoked` (status 'revoked')."""

    status = "revoked"

    def __init__(self, worker: str, message: str, offered: str) -> None:
        super().__init__(worker, message)
        self.offered = offered


class UnsupportedKnownHosts(HostKeyMismatch):
    """known_hosts has a line this client cannot honour, e.g. `@cert-authority` (status
    'unsupported'). Never retried: the file must change."""

    status = "unsupported"


class UnprotectedPrivateKey(SSHAuthFailed):
    """A private key file others can read; refused as OpenSSH does. Not transient."""
