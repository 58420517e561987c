"""A worker's log lines held back until there is a flow run to file them under.

`fedmnist run` starts its local worker programs before Prefect's temporary server is up
(flows/launch.py), and a worker says what it holds as soon as its shard is loaded: seconds
before the flow run exists. Prefect's API handler drops a record that belongs to no run, so
those lines are held here, in order, and handed back when the worker's `start-<worker>` task
forwards its logs (tasks/workers.py `forward_worker_logs`): the flow run's page and the
terminal show them as they show a worker started by the flow. Imports no Prefect.
"""

from __future__ import annotations

import logging
import threading

MAX_HELD = 1000  # lines kept of one worker while held; a start-up says a handful


class HeldLines(logging.Filter):
    """Keeps the records of one worker's logger (at most `MAX_HELD`, the rest counted) until
    `release`; from then on lets every record through."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._records: list[logging.LogRecord] | None = []
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            if self._records is None:
                return True
            if len(self._records) < MAX_HELD:
                self._records.append(record)
            else:
                self.dropped += 1
            return False

    @property
    def held(self) -> int:
        """How many records are held now."""
        with self._lock:
            return len(self._records or [])

    def release(self) -> list[logging.LogRecord]:
        """The held records, in the order they came; later records pass."""
        with self._lock:
            records, self._records = self._records or [], None
        return records


def worker_logger(worker: str) -> logging.Logger:
    """The logger a worker program's own lines arrive on (fedcore.transport)."""
    return logging.getLogger(f"fedcore.worker.{worker}")


def hold_worker_logs(worker: str) -> None:
    """Hold `worker`'s lines from now until `release_worker_logs`."""
    logger = worker_logger(worker)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # before logging is set up, INFO lines are not even made
    if not any(isinstance(f, HeldLines) for f in logger.filters):
        logger.addFilter(HeldLines())


def release_worker_logs(worker: str) -> list[logging.LogRecord]:
    """Stop holding `worker`'s lines; returns those held (none when nothing held them), to be
    handled again by the logger once it knows where they belong."""
    logger = worker_logger(worker)
    records: list[logging.LogRecord] = []
    for held in [f for f in logger.filters if isinstance(f, HeldLines)]:
        records += held.release()
        logger.removeFilter(held)
        if held.dropped:
            records.append(
                logger.makeRecord(
                    logger.name,
                    logging.WARNING,
                    __file__,
                    0,
                    "%d more start-up lines of this worker were not kept",
                    (held.dropped,),
                    None,
                )
            )
    return records
