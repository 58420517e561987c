"""`SSHPipe`: a worker's stdin/stdout over one SSH channel; its stderr becomes log lines.

The worker runs `exec`'d behind a shell that first writes `fedmnist-worker-pid <pid>` to stderr,
so `close` can kill a worker that is still busy when the channel goes.
"""

from __future__ import annotations

import logging
import threading
import time

import paramiko

from ..base import Pipe
from .connection import Connection


class SSHPipe(Pipe):
    """The worker's stdin/stdout over one SSH channel; its stderr goes to the log."""

    def __init__(self, chan: paramiko.Channel, conn: Connection, name: str, send_timeout: float):
        self._chan = chan
        self._conn = conn
        self._send_timeout = send_timeout
        self.remote_pid: int | None = None
        self.description = f"ssh worker {name} ({conn.endpoint})"
        self._log = logging.getLogger(f"fedcore.worker.{name}")
        self._stderr_thread = threading.Thread(
            target=self._pump_stderr, name=f"ssh-stderr-{name}", daemon=True
        )
        self._stderr_thread.start()

    def _pump_stderr(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self._chan.recv_stderr(32768)
            except TimeoutError:  # read_available set a timeout on the shared channel: keep going
                continue
            except Exception:
                break
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                self._line(raw.decode("utf-8", "replace").rstrip())
        if buf.strip():
            self._line(buf.decode("utf-8", "replace").rstrip())

    def _line(self, text: str) -> None:
        if self.remote_pid is None and text.startswith("fedmnist-worker-pid "):
            self.remote_pid = int(text.split()[1])
            return
        self._log.info(text)

    def send(self, data: bytes) -> None:
        try:
            self._chan.settimeout(self._send_timeout)
            self._chan.sendall(data)
        except TimeoutError:
            raise TimeoutError(
                f"{self.description} took no input for {self._send_timeout:.0f}s"
            ) from None
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
