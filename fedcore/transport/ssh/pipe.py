"""`SSHPipe`: a worker's stdin/stdout over one SSH channel; its stderr becomes log lines.

The worker runs `exec`'d behind a shell that first writes `fedmnist-worker-pid <pid>` to stderr,
so `close` can kill a worker that is still busy when the channel goes. The stderr goes through
the bounded forwarder shared with the local pipe (`..stderr`); a pid line that is not a pid is
logged once and ignored, and the draining goes on.
"""

from __future__ import annotations

import logging
import re
import time

import paramiko

from ..base import Pipe
from ..stderr import LOG_LIMITS, LogLimits, StderrForwarder, start_pump
from .connection import Connection

_PID_LINE = re.compile(r"fedmnist-worker-pid ([1-9][0-9]{0,9})")


class BadPidLine(ValueError):
    """The first `fedmnist-worker-pid` line does not hold a pid."""


class SSHPipe(Pipe):
    """The worker's stdin/stdout over one SSH channel; its stderr goes to the log."""

    def __init__(
        self,
        chan: paramiko.Channel,
        conn: Connection,
        name: str,
        send_timeout: float,
        log_limits: LogLimits = LOG_LIMITS,
    ):
        self._chan = chan
        self._conn = conn
        self._send_timeout = send_timeout
        self.remote_pid: int | None = None
        self.description = f"ssh worker {name} ({conn.endpoint})"
        self.stderr = StderrForwarder(
            logging.getLogger(f"fedcore.worker.{name}"), log_limits, hook=self._pid_line
        )
        self._stderr_thread = start_pump(
            f"ssh-stderr-{name}", lambda: chan.recv_stderr(32768), self.stderr
        )

    def _pid_line(self, text: str) -> bool:
        """Take the first `fedmnist-worker-pid N` line (True: consumed, not logged).

        Raises:
            BadPidLine: that line holds no pid (the forwarder logs it once and goes on).
        """
        if self.remote_pid is not None or not text.startswith("fedmnist-worker-pid"):
            return False
        found = _PID_LINE.fullmatch(text)
        if found is None:
            raise BadPidLine(f"{text[:80]!r} is not `fedmnist-worker-pid <pid>`")
        self.remote_pid = int(found.group(1))
        return True

    def send(self, data: bytes, timeout: float | None = None) -> None:
        seconds = self._send_timeout if timeout is None else timeout
        try:
            self._chan.settimeout(seconds)
            self._chan.sendall(data)
        except TimeoutError:
            raise TimeoutError(f"{self.description} took no input for {seconds:g}s") from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise ConnectionError(f"{self.description} is gone: {exc}") from None

    def read_available(self, n: int, wait: float | None) -> bytes:
        try:
            self._chan.settimeout(wait)
            return self._chan.recv(n)
        except TimeoutError:
            raise
        except (OSError, paramiko.SSHException) as exc:
            raise ConnectionError(f"{self.description} failed: {exc}") from None

    def end_reason(self) -> str:
        t = self._conn.client.get_transport()
        if t is None or not t.is_active():
            return " (the SSH connection dropped)"
        if self._chan.exit_status_ready():
            return f" (exit status {self._chan.recv_exit_status()})"
        return ""

    def alive(self) -> bool:
        t = self._conn.client.get_transport()
        return (
            t is not None
            and t.is_active()
            and not self._chan.closed
            and not self._chan.exit_status_ready()
        )

    def close(self, timeout: float = 5.0) -> None:
        try:
            if self.alive():
                self._chan.shutdown_write()  # end of input: the worker exits by itself
                deadline = time.monotonic() + timeout
                while not self._chan.exit_status_ready() and time.monotonic() < deadline:
                    time.sleep(0.01)
                if not self._chan.exit_status_ready() and self.remote_pid:
                    # Still busy (e.g. mid-round): closing the channel alone would leave it
                    # running on the device until it next writes.
                    self._conn.run(f"kill {self.remote_pid} 2>/dev/null", 5.0)
        except Exception:  # closing never raises; the connection goes below
            pass
        finally:
            self._chan.close()
            self._conn.close()
            self._stderr_thread.join(1.0)  # the forwarder reports what it dropped
