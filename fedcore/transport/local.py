"""The `local` transport: each worker program is a subprocess of the coordinator.

The embedded default: one machine, no devices. The worker's stderr becomes log lines of the
logger `fedcore.worker.<name>`.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

from .base import Pipe, Transport, WorkerLaunch

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class LocalPipe(Pipe):
    """Pipes to a worker subprocess."""

    def __init__(self, proc: subprocess.Popen, name: str) -> None:
        self.proc = proc
        self.description = f"local worker {name} (pid {proc.pid})"
        self._out = proc.stdout.fileno()  # type: ignore[union-attr]
        self._log = logging.getLogger(f"fedcore.worker.{name}")
        self._stderr_thread = threading.Thread(
            target=self._pump_stderr, name=f"stderr-{name}", daemon=True
        )
        self._stderr_thread.start()

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._log.info(raw.decode("utf-8", "replace").rstrip())

    def send(self, data: bytes) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise ConnectionError(f"{self.description} is gone: {exc}") from None

    def read_available(self, n: int, wait: float | None) -> bytes:
        ready, _, _ = select.select([self._out], [], [], wait)
        if not ready:
            raise TimeoutError
        return os.read(self._out, n)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


class LocalTransport(Transport):
    """Start workers as `python -m fedcore.worker` subprocesses of this machine."""

    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable

    def open(self, launch: WorkerLaunch) -> LocalPipe:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        env.setdefault("OMP_NUM_THREADS", str(launch.threads or 1))
        try:
            proc = subprocess.Popen(
                [self.python, *launch.argv()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                bufsize=0,
            )
        except OSError as exc:
            raise ConnectionError(
                f"cannot start {self.python} for worker {launch.name}: {exc}"
            ) from None
        return LocalPipe(proc, launch.name)
