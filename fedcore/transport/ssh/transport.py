"""`SSHTransport`: start the worker program on a device over SSH (agentless).

A device needs only sshd and a Python with torch: `open` connects, bootstraps (checks the Python
and torch, ships the code bundle when missing) and runs the worker on one SSH channel.
"""

from __future__ import annotations

import dataclasses
import shlex

import paramiko

from ...errors import WorkerUnreachable
from ..base import Transport, WorkerLaunch
from ..stderr import LOG_LIMITS, LogLimits
from .bootstrap import BootstrapInfo, bootstrap_device
from .commands import within
from .config import SSHConfig
from .connection import connect
from .pipe import SSHPipe


class SSHTransport(Transport):
    """Start workers on a device over SSH, shipping their code first (agentless)."""

    def __init__(
        self, cfg: SSHConfig, name: str | None = None, log_limits: LogLimits = LOG_LIMITS
    ) -> None:
        self.cfg = cfg
        self.name = name or cfg.alias or cfg.host or "worker"
        self.log_limits = log_limits
        self.last_bootstrap: BootstrapInfo | None = None

    def bootstrap(self) -> BootstrapInfo:
        """Check the device's Python and torch and ship the worker code (skipped when there).

        Raises:
            HostKeyMismatch, SSHAuthFailed, WorkerUnreachable, RemoteSetupError.
        """
        conn = connect(self.cfg, self.name)
        try:
            self.last_bootstrap = bootstrap_device(conn, self.cfg, self.name)
        finally:
            conn.close()
        return self.last_bootstrap

    def worker_command(self, launch: WorkerLaunch, info: BootstrapInfo) -> str:
        """The shell command that starts the worker on the device."""
        data_dir = launch.data_dir or self.cfg.data_dir or ""
        if data_dir == "~" or data_dir.startswith("~/"):
            data_dir = info.home + data_dir[1:]
        argv = dataclasses.replace(launch, data_dir=data_dir).argv()
        env = f"export OMP_NUM_THREADS={launch.threads} && " if launch.threads > 0 else ""
        return (
            f"cd {shlex.quote(info.code_dir)} && {env}echo fedmnist-worker-pid $$ >&2 && "
            f"exec {shlex.join([self.cfg.python, *argv])}"
        )

    def open(self, launch: WorkerLaunch) -> SSHPipe:
        """Connect, bootstrap, start the worker; returns before its hello.

        Raises:
            HostKeyMismatch, SSHAuthFailed, WorkerUnreachable, RemoteSetupError.
        """
        name = launch.name
        conn = connect(self.cfg, name)
        try:
            info = bootstrap_device(conn, self.cfg, name)
            self.last_bootstrap = info
            chan = conn.transport.open_session(timeout=self.cfg.connect_timeout)
            command = self.worker_command(launch, info)
            within(
                chan,
                self.cfg.command_timeout,
                "starting the worker",
                lambda: chan.exec_command(command),
            )
        except (paramiko.SSHException, OSError) as exc:
            conn.close()
            raise WorkerUnreachable(
                name, f"starting the worker on {conn.endpoint} failed: {exc}"
            ) from None
        except BaseException:
            conn.close()
            raise
        return SSHPipe(
            chan, conn, name, send_timeout=self.cfg.command_timeout, log_limits=self.log_limits
        )
