"""The MLflow record of a training, written off the critical path.

One MLflow run per training. Every call is queued to the run's logging thread
(`tasks/tracking/background.py`), so opening the store, and migrating a new SQLite file (5-8 s),
overlaps with the workers starting; the flow calls `ensure_ready()` before round 1 so a store that
cannot be reached stops the training before it starts. `close()` draws the figures, drains the
queue and ends the run; a logging failure is reported once, at the end, never lost.

The record (README, "The MLflow record"): where it goes is `tasks/tracking/store.py`; metrics are
stepped by round and keyed `<quantity>/<model>` (`tasks/tracking/naming.py`), and the run's
description links to MLflow's metric view plotting every model of a quantity on one chart
(`figures/accuracy_by_round.png` too); every round's global model is attached by the flow as
`models/global-rNNN.safetensors`; at evaluation rounds the global model becomes an MLflow logged
model carrying its evaluation metrics, registered as a version of `federated-mnist-cnn` with the
moving aliases `current` and `champion` (`tasks/tracking/models.py`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from fedcore.evaluation import EvalResult
from fedcore.protocol import Hello
from tasks.mlflow_model import SHA_TAG

from .background import LoggingThread
from .batching import log_batch, metric_entities
from .lineage import log_devices
from .links import comparison_note, run_page_url
from .models import CODE_FACTS, evaluation_facts, log_global_model, register
from .naming import FEDERATED, REGISTERED_MODEL, eval_metrics, is_federated
from .store import (
    TrackingUnavailable,
    artifact_root_for,
    experiment_id,
    fix_hint,
    is_server,
    open_store,
    redact_text,
    redact_uri,
    resolve_tracking_uri,
)
from .tags import code_version_tags, context_tags

READY_TIMEOUT_SERVER = 60.0  # a healthy server opens a run in well under a second
READY_TIMEOUT_LOCAL = 180.0  # a new SQLite store migrates for 5-8 s, longer on a loaded machine


def _now_ms() -> int:
    return int(time.time() * 1000)


class MlflowTracker:
    """The `Tracker` writing one MLflow run, its calls queued onto a logging thread."""

    enabled = True

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        artifact_root: Path | None = None,
        registered_model: str | None = REGISTERED_MODEL,
    ) -> None:
        """Start the logging thread; nothing touches the store before `start_run`/`resume_run`.

        Args:
            uri: the store (None: $MLFLOW_TRACKING_URI, else the project's SQLite store).
            experiment: the experiment's name (created when new).
            artifact_root: where a new experiment's artifacts go (default: beside a SQLite
                store; a server decides itself).
            registered_model: the registered model the evaluated global models become versions
                of (None: logged, not registered).
        """
        self.uri = resolve_tracking_uri(uri)  # to connect; `shown_uri` everywhere else
        self.shown_uri = redact_uri(self.uri)
        self.experiment = experiment
        self.artifact_root = artifact_root or artifact_root_for(self.uri)
        self.registered_model = registered_model
        self.experiment_id: str | None = None
        self.model_seconds: list[float] = []  # wall time of logging + registering each model
        self._thread = LoggingThread(scrub=lambda text: redact_text(text, self.uri))
        # Touched only on the logging thread:
        self._evaluations: dict[int, dict[str, EvalResult]] = {}
        self._model_sha: dict[str, str] = {}  # logged model id -> its weights' SHA-256
        self._groups: list[list[int]] = []
        self._code_tags: dict[str, str] = {}
        # Touched only on the caller's (the flow's) thread: the hellos recorded, by worker.
        self._hellos: dict[str, Hello] = {}
        self._description = ""  # the run description's first paragraph (start_run)

    @property
    def run_id(self) -> Future[str]:
        """The run id, once the run is open (or the failure that kept it shut)."""
        return self._thread.run_id

    def start_run(
        self,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        config: Mapping[str, Any] | None = None,
        description: str | None = None,
    ) -> None:
        """Open the store, the experiment and a new run (in the background); `config` is
        logged as `config.json`; `description` is the run's description from the start and
        stays its first paragraph when the comparison links join it at the first evaluation.
        A server is health-checked first (`ensure_ready` reports it).
        Prefect's context (flow run URL, deployment) is read here, in the flow's thread, and the
        code version on the logging thread; `tags` win over both."""
        tags = {**context_tags(), **tags}
        if description:
            self._description = description
            tags["mlflow.note.content"] = description
        params = dict(params)

        def job(_: Any) -> None:
            client = open_store(self.uri)
            self.experiment_id = experiment_id(client, self.experiment, self.artifact_root)
            run_id = client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
            self._thread.client = client
            self.run_id.set_result(run_id)
            self._code_tags = code_version_tags()
            log_batch(client, run_id, params=params, tags=self._code_tags)
            if config is not None:
                client.log_dict(run_id, dict(config), "config.json")

        self._thread.submit(job)

    def resume_run(self, run_id: str, round: int, metrics: Mapping[str, float]) -> None:
        """Continue an interrupted training's run: mark it running again and log round `round`'s
        metrics when they never reached the store (the coordinator died with them queued)."""
        values = dict(metrics)

        def job(_: Any) -> None:
            client = open_store(self.uri)
            self.experiment_id = client.get_run(run_id).info.experiment_id
            client.update_run(run_id, status="RUNNING")
            self._thread.client = client
            steps = {m.step for m in client.get_metric_history(run_id, "round_seconds")}
            if round not in steps:
                log_batch(client, run_id, metric_entities(values, round, _now_ms()))
            client.set_tag(run_id, "resumed_after_round", str(round))
            self.run_id.set_result(run_id)

        self._thread.submit(job)

    def ensure_ready(self, timeout: float | None = None) -> str:
        """Wait until the run exists; call before round 1 so a bad store stops the training.

        Args:
            timeout: seconds (default: 60 for a server, 180 for a local store that may be
                migrating).

        Returns:
            The run id.

        Raises:
            TrackingUnavailable: the store is unreachable, failed, or did not answer in time.
        """
        if timeout is None:
            timeout = READY_TIMEOUT_SERVER if is_server(self.uri) else READY_TIMEOUT_LOCAL
        try:
            return self.run_id.result(timeout)
        except FutureTimeout:
            raise TrackingUnavailable(
                f"MLflow store {self.shown_uri} did not open the run within {timeout:.0f}s. "
                f"{fix_hint(self.shown_uri)}"
            ) from None
        except TrackingUnavailable:
            raise
        except Exception as exc:
            raise TrackingUnavailable(
                f"MLflow store {self.shown_uri} could not open the run ("
                + redact_text(f"{type(exc).__name__}: {exc}", self.uri)
                + f"). {fix_hint(self.shown_uri)}"
            ) from exc

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metrics stepped by round."""
        ts = _now_ms()
        values = dict(metrics)
        # The entities are built on the logging thread: importing MLflow is slow.
        self.call(
            lambda client, run_id: log_batch(client, run_id, metric_entities(values, step, ts))
        )

    def log_evaluation(
        self,
        rnd: int,
        results: Mapping[str, EvalResult],
        groups: Sequence[Sequence[int]],
        model_path: Path | None = None,
    ) -> None:
        """Record an evaluation at round `rnd`: its metrics stepped by round and, when
        `model_path` holds the federated model, that model as an MLflow logged model carrying
        the `*/federated` metrics, registered with the aliases moved."""
        ts = _now_ms()
        evaluated = dict(results)
        group_lists = [list(g) for g in groups]
        metrics = eval_metrics(evaluated, group_lists)

        def job(client: Any, run_id: str) -> None:
            first = not self._evaluations
            self._evaluations[rnd] = evaluated
            self._groups = group_lists
            federated = evaluated.get(FEDERATED)
            started = time.perf_counter()
            model_id = None
            if federated is not None and model_path is not None:
                try:
                    model_id = self._log_model(client, run_id, rnd, Path(model_path), federated)
                except Exception as exc:  # noqa: BLE001 - the metrics below still go in
                    self._thread.record(exc, f"model of round {rnd} not logged: ")
            log_batch(client, run_id, metric_entities(metrics, rnd, ts, model_id, is_federated))
            if federated is not None and model_id is not None:
                client.finalize_logged_model(model_id, "READY")
                if self.registered_model:
                    register(
                        client,
                        self.registered_model,
                        run_id,
                        model_id,
                        {
                            **evaluation_facts(rnd, federated, group_lists),
                            SHA_TAG: self._model_sha.pop(model_id, ""),
                        },
                        federated.accuracy,
                        local_store=None if is_server(self.uri) else self.uri,
                    )
                self.model_seconds.append(time.perf_counter() - started)
            if first and self.experiment_id is not None:
                note = comparison_note(self.experiment_id, run_id, list(evaluated))
                if self._description:
                    note = f"{self._description}\n\n{note}"
                client.set_tag(run_id, "mlflow.note.content", note)

        self.call(job)

    def _log_model(
        self, client: Any, run_id: str, rnd: int, model_path: Path, result: EvalResult
    ) -> str:
        """The global model of round `rnd` as a logged model of the run; returns its id."""
        facts = {
            **evaluation_facts(rnd, result, self._groups),
            "mlflow_run_id": run_id,
            **{k: v for k, v in self._code_tags.items() if k in CODE_FACTS},
        }
        model_id, sha = log_global_model(
            client, str(self.experiment_id), run_id, rnd, model_path, facts
        )
        self._model_sha[model_id] = sha
        return model_id

    def log_devices(self, hellos: Mapping[str, Hello], trainers: Collection[str]) -> None:
        """Record each worker's hello not recorded yet (a restarted worker's new hello is new):
        its device tags and its shard as a dataset input (`tasks/tracking/lineage.py`)."""
        new = {w: h for w, h in hellos.items() if self._hellos.get(w) != h}
        if not new:
            return
        self._hellos.update(new)
        names = frozenset(trainers)
        self.call(lambda client, run_id: log_devices(client, run_id, new, names))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Attach file `path` under folder `artifact_path` of the run."""
        self.call(lambda client, run_id: client.log_artifact(run_id, str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Attach `text` as file `artifact_file` of the run."""
        self.call(lambda client, run_id: client.log_text(run_id, text, artifact_file))

    def set_tag(self, key: str, value: str) -> None:
        """Tag the run."""
        self.call(lambda client, run_id: client.set_tag(run_id, key, value))

    def call(self, fn: Callable[[Any, str], None]) -> None:
        """Run `fn(client, run_id)` on the logging thread (for richer logging)."""
        self._thread.submit(lambda client: fn(client, self.run_id.result()))

    def close(self, status: str = "FINISHED", timeout: float = 300.0) -> list[str]:
        """Draw the figures, drain the queue, end the run with `status`.

        Returns:
            The logging errors seen (and a note of calls skipped after the store failed).
        """

        def job(client: Any, run_id: str) -> None:
            try:
                self._log_figures(client, run_id)
            except Exception as exc:  # noqa: BLE001 - the run must still be ended
                self._thread.record(exc, "figures not logged: ")
            client.set_terminated(run_id, status=status)

        self.call(job)
        return self._thread.close(timeout, self.shown_uri)

    def _log_figures(self, client: Any, run_id: str) -> None:
        """The training's pictures as `figures/` of the run (none before an evaluation)."""
        from tasks import figures

        if not self._evaluations:
            return
        with tempfile.TemporaryDirectory(prefix="fedmnist-figures-") as tmp:
            figures.save_run_figures(self._evaluations, self._groups, Path(tmp))
            client.log_artifacts(run_id, tmp, "figures")

    def run_id_or_none(self) -> str | None:
        """The run id when the run is open (without waiting), else None."""
        return self._thread.opened_run_id()

    def wait_run_id(self, timeout: float = 120.0) -> str:
        """Wait for the run id.

        Raises:
            TimeoutError: not within `timeout` s.
            Exception: what kept the run from opening.
        """
        return self.run_id.result(timeout)

    def run_url(self, ui_url: str | None) -> str | None:
        """Where the run shows in the MLflow UI: the tracking server itself when the store is a
        server, else `ui_url` (the address `mlflow ui` serves on); None before the run exists."""
        run_id = self.run_id_or_none()
        base = _without_userinfo(self.uri) if is_server(self.uri) else ui_url
        if run_id is None or not base:
            return None
        return run_page_url(base, self.experiment_id, run_id)


def _without_userinfo(uri: str) -> str:
    """A server's URI without `user:pass@`, for links people open (their browser asks)."""
    return redact_uri(uri).replace("***@", "", 1)
