"""The thread that talks to the MLflow store, so that logging never waits on the critical path.

One thread per run owns the `MlflowClient` and runs queued jobs in order, each with the explicit
run id: MLflow's fluent active run is per thread, so fluent calls from task threads would silently
open new runs. A job that fails is recorded (warned now, reported at `close()`, never lost); after
the run failed to open, or after several failures in a row, the store is taken for gone and later
jobs are skipped and counted instead of each waiting on a dead store.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("tasks.tracking")

MAX_FAILURES_IN_A_ROW = 3  # then the store is taken for gone and later calls are skipped

Job = Callable[[Any], None]  # called with the client on the logging thread


class LoggingThread:
    """A queue of jobs for one MLflow run and the daemon thread running them.

    `client` and `run_id` are set by the job that opens the run; until `run_id` is set, a failing
    job fails it too (nothing can be logged without a run).
    """

    def __init__(
        self, name: str = "mlflow-tracker", scrub: Callable[[str], str] = lambda text: text
    ) -> None:
        """`scrub` rewrites every failure message before it is logged or kept (it removes the
        store's credentials)."""
        self.client: Any = None
        self._scrub = scrub
        self.run_id: Future[str] = Future()
        self.errors: list[str] = []
        self.skipped = 0
        self._failures_in_row = 0
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job(client)`."""
        self._queue.put(job)

    def record(self, exc: BaseException, what: str = "") -> None:
        """Note a logging failure (`what` prefixes the message), for `close()` to return."""
        msg = self._scrub(f"{what}{type(exc).__name__}: {exc}")
        log.warning("MLflow logging failed: %s", msg)
        self.errors.append(msg)

    def opened_run_id(self) -> str | None:
        """The run id when the run is open (without waiting), else None."""
        if self.run_id.done() and self.run_id.exception() is None:
            return self.run_id.result()
        return None

    def close(self, timeout: float, store: str) -> list[str]:
        """Run the jobs queued so far, then stop the thread (waiting at most `timeout` s).

        Args:
            timeout: seconds to wait for the queue to drain.
            store: the store's URI, for the message when it is still busy.

        Returns:
            The failures recorded, then a note when the thread is still busy and a count of the
            jobs skipped after the store failed.
        """
        self._queue.put(None)
        self._thread.join(timeout)
        errors = list(self.errors)
        if self._thread.is_alive():
            errors.append(f"MLflow logging to {store} still busy after {timeout:.0f}s")
        if self.skipped:
            errors.append(f"{self.skipped} MLflow call(s) skipped after the store failed")
        return errors

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._gone():
                self.skipped += 1
                continue
            try:
                job(self.client)
                self._failures_in_row = 0
            except Exception as exc:  # noqa: BLE001 - recorded and reported at close()
                self._failures_in_row += 1
                self.record(exc)
                if not self.run_id.done():
                    self.run_id.set_exception(exc)

    def _gone(self) -> bool:
        """The run never opened, or the store failed several calls in a row."""
        if self.run_id.done() and self.run_id.exception() is not None:
            return True
        return self._failures_in_row >= MAX_FAILURES_IN_A_ROW
