"""Short commands and SFTP sessions on a device, each with a total deadline and a byte cap.

paramiko waits for the answer to a channel request (`exec_command`, `invoke_subsystem`) with no
timeout at all (`Channel._wait_for_event` is a bare `Event.wait()`, paramiko issues #319, #1248,
#2599), and `Channel.settimeout` bounds only each single read. So a device that never answers
would hold the coordinator for ever. Here a watchdog closes the channel when the deadline passes
(closing sets the event the request waits on), and a command's output is read from stdout and
stderr together, up to `max_output` bytes each, before one total deadline.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import paramiko

T = TypeVar("T")

MAX_OUTPUT = 256 * 1024  # bytes of stdout, and of stderr, a setup command may print


class OutputTooLarge(Exception):
    """A command printed more than its cap (the caller turns it into a typed error)."""

    def __init__(self, stream: str, cap: int) -> None:
        super().__init__(f"it wrote more than {cap} bytes to {stream}")
        self.stream = stream
        self.cap = cap


def within(chan: paramiko.Channel, timeout: float, what: str, request: Callable[[], T]) -> T:
    """Run `request` (a blocking call on `chan`), closing `chan` if it takes over `timeout` s.

    Raises:
        TimeoutError: the deadline passed (the channel is closed).
        paramiko.SSHException, OSError: as `request`.
    """
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        chan.close()

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        return request()
    except (paramiko.SSHException, OSError, EOFError):
        if fired.is_set():
            raise TimeoutError(f"{what} got no answer within {timeout:g}s") from None
        raise
    finally:
        timer.cancel()


def run_command(
    transport: paramiko.Transport, command: str, timeout: float, max_output: int = MAX_OUTPUT
) -> tuple[int, bytes, bytes]:
    """Run `command` on a new session channel; everything within `timeout` seconds.

    Returns:
        (exit status, stdout, stderr); the status is -1 when the device sent none.

    Raises:
        TimeoutError: the deadline passed first.
        OutputTooLarge: stdout or stderr went over `max_output` bytes.
        paramiko.SSHException, OSError: the channel failed.
    """
    deadline = time.monotonic() + timeout
    chan = transport.open_session(timeout=timeout)
    try:
        within(chan, timeout, "starting a command", lambda: chan.exec_command(command))
        out, err = bytearray(), bytearray()
        poll = chan.fileno()  # set while stdout or stderr has data, and at the end
        while True:
            got = False
            for ready, recv, buf, stream in (
                (chan.recv_ready, chan.recv, out, "stdout"),
                (chan.recv_stderr_ready, chan.recv_stderr, err, "stderr"),
            ):
                if ready():
                    buf += recv(65536)
                    got = True
                    if len(buf) > max_output:
                        raise OutputTooLarge(stream, max_output)
            if not got and (chan.eof_received or chan.closed):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the command did not finish within {timeout:g}s")
            if not got:
                select.select([poll], [], [], left)
        if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"the command did not finish within {timeout:g}s")
        return chan.recv_exit_status(), bytes(out), bytes(err)
    finally:
        chan.close()


def open_sftp(transport: paramiko.Transport, timeout: float) -> paramiko.SFTPClient:
    """An SFTP session whose every step (open, subsystem, version, each later op) has a timeout.

    Raises:
        TimeoutError, paramiko.SSHException, OSError.
    """
    chan = transport.open_session(timeout=timeout)
    try:
        chan.settimeout(timeout)  # each read of the version exchange and of every later op
        within(chan, timeout, "the sftp subsystem", lambda: chan.invoke_subsystem("sftp"))
        return paramiko.SFTPClient(chan)
    except BaseException:
        chan.close()
        raise
