"""The `local` transport: each worker program is a subprocess of the coordinator.

The embedded default: one machine, no devices. The worker's stderr becomes bounded log lines of
the logger `fedcore.worker.<name>` (`stderr.StderrForwarder`). Writing to a worker has a deadline:
its stdin is non-blocking and each write waits in `select`, so a wedged worker (stopped, or one
that no longer reads) is a TimeoutError naming it, never a coordinator blocked for ever. Reading
allocates nothing per reply: a payload goes straight into the caller's buffer (`os.readv`), and
a smaller read asks for at most what a pipe holds (64 KiB).
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from .base import Pipe, Transport, WorkerLaunch
from .stderr import LOG_LIMITS, LogLimits, StderrForwarder, start_pump

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
SEND_TIMEOUT = 120.0  # seconds for a worker to take one request in
# A pipe holds 64 KiB: asking os.read for more allocates the larger buffer, then shrinks it.
PIPE_CHUNK = 1 << 16


class LocalPipe(Pipe):
    """Pipes to a worker subprocess."""

    def __init__(
        self,
        proc: subprocess.Popen,
        name: str,
        send_timeout: float = SEND_TIMEOUT,
        log_limits: LogLimits = LOG_LIMITS,
    ) -> None:
        self.proc = proc
        self.description = f"local worker {name} (pid {proc.pid})"
        self.send_timeout = send_timeout
        self._out = proc.stdout.fileno()  # type: ignore[union-attr]
        self._in = proc.stdin.fileno()  # type: ignore[union-attr]
        os.set_blocking(self._in, False)
        err = proc.stderr.fileno()  # type: ignore[union-attr]
        self.stderr = StderrForwarder(logging.getLogger(f"fedcore.worker.{name}"), log_limits)
        self._stderr_thread = start_pump(f"stderr-{name}", lambda: os.read(err, 65536), self.stderr)

    def send(self, data: bytes, timeout: float | None = None) -> None:
        # an idle worker takes a request in at once: past its send deadline it is wedged, even
        # while the call's own deadline (a training's) is further away
        seconds = self.send_timeout if timeout is None else min(timeout, self.send_timeout)
        deadline = time.monotonic() + seconds
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            try:
                ready = left > 0 and select.select([], [self._in], [], left)[1]
                if not ready:
                    raise TimeoutError(
                        f"{self.description} took no input for {seconds:g}s "
                        f"({len(data) - len(view)} of {len(data)} bytes written)"
                    )
                view = view[os.write(self._in, view) :]
            except (BlockingIOError, InterruptedError):
                continue
            except TimeoutError:
                raise
            except (OSError, ValueError) as exc:  # BrokenPipeError: it exited
                raise ConnectionError(f"{self.description} is gone: {exc}") from None

    def read_available(self, n: int, wait: float | None) -> bytes:
        ready, _, _ = select.select([self._out], [], [], wait)
        if not ready:
            raise TimeoutError
        return os.read(self._out, min(n, PIPE_CHUNK))

    def read_available_into(self, view: memoryview, wait: float | None) -> int:
        ready, _, _ = select.select([self._out], [], [], wait)
        if not ready:
            raise TimeoutError
        return os.readv(self._out, [view])

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
        self._stderr_thread.join(1.0)  # the forwarder reports what it dropped
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


class LocalTransport(Transport):
    """Start workers as `python -m fedcore.worker` subprocesses of this machine.

    Args:
        python: the interpreter (default: this one).
        send_timeout: seconds a worker has to take in one request.
        log_limits: how much of each worker's stderr reaches the log.
    """

    def __init__(
        self,
        python: str | None = None,
        send_timeout: float = SEND_TIMEOUT,
        log_limits: LogLimits = LOG_LIMITS,
    ) -> None:
        self.python = python or sys.executable
        self.send_timeout = send_timeout
        self.log_limits = log_limits

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
        return LocalPipe(proc, launch.name, self.send_timeout, self.log_limits)
