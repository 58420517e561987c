"""Waiting in a test for a condition, never for a fixed time.

A test that needs another process to reach a state (a server healthy, a worker mid-round, a
cgroup removed) polls that state with a deadline: it goes on as soon as the state holds, however
fast or loaded the machine is, and when the state never comes it fails naming what it waited for,
instead of passing or failing by luck on a fixed sleep.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

FIRST_POLL = 0.01  # seconds between the first polls: most states arrive within milliseconds
MAX_POLL = 0.25  # ... doubling up to this, so a long wait does not spin


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    details: Callable[[], str] | None = None,
) -> T:
    """Poll `check` until it returns a truthy value, and return that value.

    Args:
        check: reads the state; may raise to fail at once (a process that exited, say).
        timeout: the most seconds to wait: a deadline for a state that should come, not a pace.
        what: the state, as the failure names it ("the mlflow server healthy").
        details: called once on failure, its text appended (a log's tail).

    Raises:
        pytest.fail.Exception: `check` never held within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    pause = FIRST_POLL
    while True:
        value = check()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            extra = f"\n{details()}" if details is not None else ""
            pytest.fail(f"not {what} after {timeout:g}s{extra}")
        time.sleep(min(pause, left))  # the poll's interval, not a wait for the state
        pause = min(pause * 2, MAX_POLL)


class LogWatch(logging.Handler):
    """The records of some loggers, held by a handler on each of those loggers itself: a logging
    setup that stops them propagating to the root (Prefect's, once a flow module is imported)
    cannot hide them, as it hides them from pytest's caplog. Use it as a context manager.

    A worker's stderr reaches its logger (`fedcore.worker.<name>`) through a pump thread, so its
    line about a request may be logged a moment after the reply has arrived: `wait_for` it.
    """

    def __init__(self, *names: str) -> None:
        super().__init__(logging.INFO)
        self.loggers = [logging.getLogger(n) for n in names]
        self.records: list[logging.LogRecord] = []
        self._levels: list[int] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self.records.append(record)

    def __enter__(self) -> LogWatch:
        for logger in self.loggers:
            self._levels.append(logger.level)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, level in zip(self.loggers, self._levels):
            logger.removeHandler(self)
            logger.setLevel(level)

    def messages(self, logger: str) -> list[str]:
        """What `logger` and its children logged so far."""
        with self._lock:
            records = list(self.records)
        return [
            r.getMessage() for r in records if r.name == logger or r.name.startswith(logger + ".")
        ]

    def wait_for(self, logger: str, pattern: str, timeout: float = 60) -> re.Match[str]:
        """Wait for a message of `logger` matching `pattern` (re.search); returns the match."""
        regex = re.compile(pattern)

        def find() -> re.Match[str] | None:
            return next(filter(None, map(regex.search, self.messages(logger))), None)

        return wait_until(
            find,
            timeout,
            f"logged by {logger}: /{pattern}/",
            lambda: "\n".join(self.messages(logger))[-3000:],
        )
