"""The MLflow record of a training, written off the critical path.

One MLflow run per training. Every call is queued to a single background thread that owns an
`MlflowClient` and logs with the explicit run id (MLflow's fluent active run is per thread, so
fluent calls from task threads would silently open new runs; FIELD-NOTES). Opening the store, and
migrating a new SQLite file (5-8 s), therefore overlaps with the workers starting. `close()`
drains the queue and ends the run; a logging failure is reported once, at the end, never lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fedcore.config import fedmnist_home
from fedcore.evaluation import EvalResult
from fedcore.protocol import Update
from fedcore.shards import format_labels
from fedcore.strategies import Failure

log = logging.getLogger("tasks.tracking")


def default_tracking_uri() -> str:
    """The project's SQLite store: $FEDMNIST_HOME/mlflow.db."""
    return f"sqlite:///{fedmnist_home() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    return fedmnist_home() / "mlartifacts"


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """Nested config -> {'train.lr': '0.1', ...} (MLflow params are flat strings)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            key = v.get("name", i) if isinstance(v, Mapping) else i
            flatten(f"{prefix}.{key}", v, out)
    else:
        out[prefix] = str(value)[:6000]
    return out


class Tracker:
    """Queue MLflow calls for one run onto a background thread."""

    def __init__(self, uri: str | None, experiment: str, artifact_root: Path | None = None) -> None:
        self.uri = uri or default_tracking_uri()
        self.experiment = experiment
        self.artifact_root = artifact_root or default_artifact_root()
        self.run_id: Future[str] = Future()
        self._queue: queue.Queue[Callable[[Any], None] | None] = queue.Queue()
        self._errors: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._client: Any = None
        self.experiment_id: str | None = None
        self._thread.start()

    # -- background thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job(self._client)
            except Exception as exc:  # noqa: BLE001 - recorded and reported at close()
                msg = f"{type(exc).__name__}: {exc}"
                log.warning("MLflow logging failed: %s", msg)
                self._errors.append(msg)
                if not self.run_id.done():
                    self.run_id.set_exception(exc)

    def _submit(self, job: Callable[[Any], None]) -> None:
        self._queue.put(job)

    # -- API --------------------------------------------------------------------------------

    def start_run(self, run_name: str, tags: Mapping[str, str], params: Mapping[str, str]) -> None:
        """Open the store, the experiment and a new run (in the background)."""

        def job(_: Any) -> None:
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=self.uri)
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                self.artifact_root.mkdir(parents=True, exist_ok=True)
                exp_id = client.create_experiment(
                    self.experiment,
                    artifact_location=(self.artifact_root / self.experiment).as_uri(),
                )
            else:
                exp_id = exp.experiment_id
            self.experiment_id = exp_id
            run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
            self._client = client
            items = list(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), 100):
                client.log_batch(
                    run.info.run_id, params=[Param(k, v) for k, v in items[i : i + 100]]
                )
            self.run_id.set_result(run.info.run_id)

        self._submit(job)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metrics stepped by round (one batch request)."""
        ts = int(time.time() * 1000)
        values = dict(metrics)

        def job(client: Any) -> None:
            from mlflow.entities import Metric

            batch = [Metric(k, float(v), ts, step) for k, v in values.items()]
            run_id = self.run_id.result()
            for i in range(0, len(batch), 1000):
                client.log_batch(run_id, metrics=batch[i : i + 1000])

        self._submit(job)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        def job(client: Any) -> None:
            client.log_artifact(self.run_id.result(), str(path), artifact_path)

        self._submit(job)

    def log_text(self, text: str, artifact_file: str) -> None:
        def job(client: Any) -> None:
            client.log_text(self.run_id.result(), text, artifact_file)

        self._submit(job)

    def set_tag(self, key: str, value: str) -> None:
        def job(client: Any) -> None:
            client.set_tag(self.run_id.result(), key, value)

        self._submit(job)

    def call(self, fn: Callable[[Any, str], None]) -> None:
        """Run `fn(client, run_id)` on the tracking thread (for richer logging)."""
        self._submit(lambda client: fn(client, self.run_id.result()))

    def close(self, status: str = "FINISHED", timeout: float = 300.0) -> list[str]:
        """Drain the queue, end the run with `status`; returns the logging errors seen."""

        def job(client: Any) -> None:
            client.set_terminated(self.run_id.result(), status=status)

        self._submit(job)
        self._queue.put(None)
        self._thread.join(timeout)
        return list(self._errors)

    def wait_run_id(self, timeout: float = 120.0) -> str:
        return self.run_id.result(timeout)

    def run_url(self, ui_url: str | None) -> str | None:
        """Where the run shows in the MLflow UI: the tracking server itself when the store is a
        server, else `ui_url` (the address `mlflow ui` serves on); None before the run exists."""
        if not self.run_id.done() or self.run_id.exception() is not None:
            return None
        base = self.uri if self.uri.startswith(("http://", "https://")) else ui_url
        if not base:
            return None
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id.result()}"


# -- what the flow records --------------------------------------------------------------


def round_metrics(updates: Sequence[Update], failures: Sequence[Failure]) -> dict[str, float]:
    out: dict[str, float] = {}
    for u in updates:
        out[f"train_loss/{u.worker}"] = u.metrics.loss
        out[f"train_samples/{u.worker}"] = u.metrics.samples
        out[f"train_seconds/{u.worker}"] = u.metrics.seconds
        out[f"wire_bytes/{u.worker}"] = u.wire_bytes
    out["workers_ok"] = len(updates)
    out["workers_failed"] = len(failures)
    out["round_bytes"] = sum(u.wire_bytes for u in updates)
    return out


def eval_metrics(
    results: Mapping[str, EvalResult], groups: Sequence[Sequence[int]]
) -> dict[str, float]:
    out: dict[str, float] = {}
    for model, r in results.items():
        out[f"accuracy/{model}"] = r.accuracy
        out[f"loss/{model}"] = r.loss
        out[f"seed_loss/{model}"] = r.seed_loss
        for g, share in zip(groups, r.group_shares):
            out[f"share_{format_labels(g)}/{model}"] = share
        for d, acc in enumerate(r.per_digit_accuracy):
            if acc == acc:  # skip NaN (digit absent)
                out[f"digit_{d}_accuracy/{model}"] = acc
    return out
