"""A worker's stderr as log lines, bounded: the one place both pipes (local, ssh) forward it.

A worker program, or a device pretending to run one, controls every byte of its stderr. So:

- a line keeps at most `max_line` bytes; the rest is counted, never buffered, and named in a
  marker at the end of the line ("[... 33550336 more bytes of this line dropped ...]");
- at most `rate` lines a second are forwarded, with bursts of `burst` (a token bucket); the lines
  over it are counted and reported as one "dropped K lines" line when forwarding resumes and when
  the stream ends;
- control characters (terminal escapes) become U+FFFD, so a line cannot rewrite the terminal;
- a `hook` sees each complete line first (the ssh pipe reads the remote pid from it) and may
  consume it; anything it raises is logged once and the draining goes on: a pump that stopped
  would fill the pipe and stall the worker.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class LogLimits:
    """How much of a worker's stderr reaches the log."""

    max_line: int = 4096  # bytes kept of one line
    rate: float = 50.0  # lines per second, sustained
    burst: int = 200  # lines forwarded at once before `rate` applies


LOG_LIMITS = LogLimits()  # the default


class StderrForwarder:
    """Turns stderr chunks into bounded, rate-limited log lines of `log` (see the module doc).

    `feed` and `close` never raise. The counters (`lines_seen`, `lines_forwarded`,
    `lines_dropped`, `bytes_cut`, `hook_errors`) say what happened to the stream.
    """

    def __init__(
        self,
        log: logging.Logger,
        limits: LogLimits = LOG_LIMITS,
        hook: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.limits = limits
        self._hook = hook
        self._clock = clock
        self._buf = bytearray()
        self._cut = 0  # bytes of the current line beyond max_line
        self._tokens = float(limits.burst)
        self._last = clock()
        self._pending_drops = 0
        self.lines_seen = 0
        self.lines_forwarded = 0
        self.lines_dropped = 0
        self.bytes_cut = 0
        self.hook_errors = 0

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream; complete lines are handled at once."""
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            end = len(chunk) if nl < 0 else nl
            room = self.limits.max_line - len(self._buf)
            take = min(room, end - start)
            self._buf += chunk[start : start + take]
            self._cut += end - start - take
            if nl < 0:
                return
            self._finish_line()
            start = nl + 1

    def close(self) -> None:
        """The stream ended: forward a last line without newline and any pending summary."""
        if self._buf or self._cut:
            self._finish_line()
        self._report_drops()

    def _finish_line(self) -> None:
        raw, cut = bytes(self._buf), self._cut
        self._buf.clear()
        self._cut = 0
        self.lines_seen += 1
        text = _CONTROL.sub("\ufffd", raw.decode("utf-8", "replace").rstrip())
        if self._hook is not None:
            try:
                if self._hook(text):
                    return
            except Exception as exc:  # a hook must never stop the draining
                self.hook_errors += 1
                if self.hook_errors == 1:
                    self.log.warning(
                        "ignored a stderr line the transport could not read (%s: %s); "
                        "further ones are ignored silently",
                        type(exc).__name__,
                        exc,
                    )
        if cut:
            self.bytes_cut += cut
            text += (
                f" [... {cut} more bytes of this line dropped: worker log lines are cut at "
                f"{self.limits.max_line} bytes]"
            )
        self._forward(text)

    def _forward(self, text: str) -> None:
        now = self._clock()
        self._tokens = min(
            float(self.limits.burst), self._tokens + (now - self._last) * self.limits.rate
        )
        self._last = now
        if self._tokens < 1:
            self._pending_drops += 1
            self.lines_dropped += 1
            return
        self._tokens -= 1
        self._report_drops()
        self.lines_forwarded += 1
        self.log.info("%s", text)

    def _report_drops(self) -> None:
        if self._pending_drops:
            self.log.warning(
                "dropped %d lines of this worker's stderr (more than %g lines/s)",
                self._pending_drops,
                self.limits.rate,
            )
            self._pending_drops = 0


def start_pump(
    thread_name: str, read: Callable[[], bytes], forwarder: StderrForwarder
) -> threading.Thread:
    """Drain `read` into `forwarder` on a daemon thread until the stream ends or fails.

    Args:
        thread_name: the thread's name.
        read: one blocking read; b"" at the end of the stream. A TimeoutError is waited
            through (the ssh channel's timeout is shared with the stdout reads).
        forwarder: where the bytes go.

    Returns:
        The started thread.
    """

    def run() -> None:
        while True:
            try:
                chunk = read()
            except TimeoutError:
                continue
            except Exception:  # the stream failed: the pipe's reads report why
                break
            if not chunk:
                break
            try:
                forwarder.feed(chunk)
            except Exception:  # feed does not raise; never let a bug stop the draining
                forwarder.log.exception("forwarding this worker's stderr failed")
        try:
            forwarder.close()
        except Exception:
            forwarder.log.exception("forwarding this worker's stderr failed")

    thread = threading.Thread(target=run, name=thread_name, daemon=True)
    thread.start()
    return thread
