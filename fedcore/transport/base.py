"""What every transport provides: open a byte pipe to a started worker program.

The read loop (deadline, end of stream, a frame cut in the middle) lives once, in
`Pipe.read_exact`; a pipe supplies only `read_available`, one wait for whatever bytes come.
"""

from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass

from ..shards import ShardSpec


@dataclass(frozen=True)
class WorkerLaunch:
    """How to start one worker program: its name, where its data is, which shard, how.

    `slowdown` and `step_seconds` make it a slower or a steady device (fedcore.pacing).
    """

    name: str
    data_dir: str
    shard: ShardSpec
    threads: int = 0
    device: str = "auto"
    slowdown: float = 1.0
    step_seconds: float | None = None

    def argv(self) -> list[str]:
        """Arguments after the interpreter: `-m fedcore.worker ...`.

        The pacing flags only where they differ from the defaults, so an unpaced worker starts
        with the command line it had before they existed (which an older worker accepts).
        """
        pace = [] if self.slowdown == 1.0 else ["--slowdown", repr(float(self.slowdown))]
        if self.step_seconds is not None:
            pace += ["--step-seconds", repr(float(self.step_seconds))]
        return [
            "-m",
            "fedcore.worker",
            "--name",
            self.name,
            "--data-dir",
            self.data_dir,
            "--shard",
            self.shard.to_json(),
            "--threads",
            str(self.threads),
            "--device",
            self.device,
            *pace,
        ]


class Pipe(abc.ABC):
    """A bidirectional byte stream to one running worker program."""

    description: str = "worker"

    @abc.abstractmethod
    def send(self, data: bytes, timeout: float | None = None) -> None:
        """Write all of `data` within `timeout` seconds and within the pipe's own send deadline,
        where it has one (None: that deadline alone).

        Raises:
            TimeoutError: the worker took no input until the deadline (it is wedged).
            ConnectionError: the worker is gone.
        """

    def read_exact(self, n: int, timeout: float | None) -> bytes:
        """Read exactly n bytes within `timeout` seconds.

        Args:
            n: how many bytes.
            timeout: seconds for all n bytes; None waits for ever.

        Returns:
            The n bytes.

        Raises:
            EOFError: the stream ends before any byte.
            ConnectionError: it ends in the middle, or fails.
            TimeoutError: the time runs out (checked before each wait).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks: list[bytes] = []
        left = n
        while left:
            wait = None if deadline is None else deadline - time.monotonic()
            try:
                if wait is not None and wait <= 0:
                    raise TimeoutError
                chunk = self.read_available(min(left, 1 << 20), wait)
            except TimeoutError:
                raise TimeoutError(f"{self.description} sent nothing for {timeout:.0f}s") from None
            if not chunk:
                why = self.end_reason()
                if left == n:
                    raise EOFError(f"{self.description} closed its output{why}")
                raise ConnectionError(f"{self.description} closed its output mid-frame{why}")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def read_into(self, view: memoryview, timeout: float | None) -> None:
        """Fill `view` with the next len(view) bytes within `timeout` seconds (a reply's payload
        read straight into the buffer it is decoded from: no pieces to join).

        Raises:
            As `read_exact`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        while done < len(view):
            wait = None if deadline is None else deadline - time.monotonic()
            try:
                if wait is not None and wait <= 0:
                    raise TimeoutError
                got = self.read_available_into(view[done:], wait)
            except TimeoutError:
                raise TimeoutError(f"{self.description} sent nothing for {timeout:.0f}s") from None
            if not got:
                why = self.end_reason()
                if done == 0:
                    raise EOFError(f"{self.description} closed its output{why}")
                raise ConnectionError(f"{self.description} closed its output mid-frame{why}")
            done += got

    def read_available_into(self, view: memoryview, wait: float | None) -> int:
        """As `read_available`, into `view`: how many bytes were written there (0: the stream
        has ended). A pipe that can read into a buffer directly overrides this copy."""
        chunk = self.read_available(min(len(view), 1 << 20), wait)
        view[: len(chunk)] = chunk
        return len(chunk)

    @abc.abstractmethod
    def read_available(self, n: int, wait: float | None) -> bytes:
        """Wait for the stream to have bytes, then return what is there, up to n.

        Args:
            n: the most bytes to return (> 0).
            wait: the most seconds to wait (> 0); None waits for ever.

        Returns:
            1 to n bytes, or b"" when the stream has ended.

        Raises:
            TimeoutError: nothing arrived within `wait`.
            ConnectionError: the stream failed.
        """

    def end_reason(self) -> str:
        """Why the stream ended, as a suffix for the error (e.g. " (exit status 1)"), or ""."""
        return ""

    @abc.abstractmethod
    def alive(self) -> bool:
        """Whether the worker program still runs."""

    @abc.abstractmethod
    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker program (politely first) and release the stream."""

    def close_in_background(self, timeout: float = 5.0) -> threading.Thread:
        """`close(timeout)` on a daemon thread, returned started: for a program that was told
        to exit (it answered bye), whose exit the caller need not wait for. Should this process
        end first, the program still sees its input end and exits by itself."""
        thread = threading.Thread(
            target=self.close, args=(timeout,), name=f"close-{self.description}", daemon=True
        )
        thread.start()
        return thread


class Transport(abc.ABC):
    """Starts worker programs and hands back pipes to them."""

    @abc.abstractmethod
    def open(self, launch: WorkerLaunch) -> Pipe:
        """Start the worker program described by `launch`; returns at once (no hello yet)."""
