"""The MLflow record of a training, written off the critical path.

One MLflow run per training. Every call is queued to a single background thread that owns an
`MlflowClient` and logs with the explicit run id (MLflow's fluent active run is per thread, so
fluent calls from task threads would silently open new runs; FIELD-NOTES). Opening the store, and
migrating a new SQLite file (5-8 s), therefore overlaps with the workers starting; the flow calls
`ensure_ready()` before round 1 so a store that cannot be reached stops the training before it
starts. `close()` draws the figures, drains the queue and ends the run; a logging failure is
reported once, at the end, never lost.

The record (README, "The MLflow record"):
- where: `tracking.uri` in the config, else `$MLFLOW_TRACKING_URI`, else the SQLite store
  `$FEDMNIST_HOME/mlflow.db` with artifacts in `mlartifacts/` beside it;
- metrics stepped by round, keyed `<quantity>/<model>` (`accuracy/federated`, `accuracy/alice`):
  the UI groups each quantity in one section, and the run's description links to MLflow's metric
  view plotting every model of a quantity on one chart (`figures/accuracy_by_round.png` too);
- every round's global model as `models/global-rNNN.safetensors`; at evaluation rounds the global
  model as an MLflow logged model (pyfunc from code, `tasks/mlflow_model.py`) carrying its
  evaluation metrics, registered as a version of `federated-mnist-cnn` with the moving aliases
  `current` (newest; MLflow reserves `latest`) and `champion` (best federated accuracy so far).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fedcore
from fedcore.config import TrackingConfig, fedmnist_home
from fedcore.errors import FedError
from fedcore.evaluation import EvalResult
from fedcore.protocol import Update
from fedcore.shards import format_labels
from fedcore.strategies import Failure

log = logging.getLogger("tasks.tracking")

REGISTERED_MODEL = "federated-mnist-cnn"
FEDERATED = "federated"
ENV_URI = "MLFLOW_TRACKING_URI"
HEALTH_TIMEOUT = 5.0  # seconds for GET <server>/health
READY_TIMEOUT_SERVER = 60.0  # a healthy server opens a run in well under a second
READY_TIMEOUT_LOCAL = 180.0  # a new SQLite store migrates for 5-8 s, longer on a loaded machine
MAX_FAILURES_IN_A_ROW = 3  # then the store is taken for gone and later calls are skipped


class TrackingUnavailable(FedError):
    """The MLflow store cannot be reached or cannot open the run."""


# -- where the record goes ----------------------------------------------------------------


def default_tracking_uri() -> str:
    """The project's SQLite store: $FEDMNIST_HOME/mlflow.db."""
    return f"sqlite:///{fedmnist_home() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    return fedmnist_home() / "mlartifacts"


def resolve_tracking_uri(configured: str | None) -> str:
    """`tracking.uri` from the config, else $MLFLOW_TRACKING_URI, else the project's store."""
    return configured or os.environ.get(ENV_URI) or default_tracking_uri()


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative paths are relative to the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()


def artifact_root_for(uri: str) -> Path | None:
    """Where a SQLite store's artifacts go: `mlartifacts/` beside the database file (MLflow would
    otherwise write them under the current directory). None: the store decides (a server)."""
    db = sqlite_path(uri)
    return db.parent / "mlartifacts" if db is not None else None


def _fix_hint(uri: str) -> str:
    return (
        f"Start the server (e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --host "
        f"127.0.0.1 --port {uri.rsplit(':', 1)[-1].strip('/') or 5000}`), or point tracking.uri "
        f"(`--set tracking.uri=...`) or ${ENV_URI} at a running one, or unset both to use the "
        f"local store {default_tracking_uri()}; `--set tracking.enabled=false` trains without "
        "a record."
    )


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT) -> None:
    """GET `<uri>/health` of an MLflow server.

    Raises:
        TrackingUnavailable: no answer, or not OK; the message names the URI and the fixes.
    """
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status == 200:
                return
            reason = f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise TrackingUnavailable(
        f"MLflow tracking server {uri} is not reachable (GET {url}: {reason}). {_fix_hint(uri)}"
    )


# -- what names and tags the run ----------------------------------------------------------


def run_name(name: str, strategy: str, deployment: str | None = None) -> str:
    """`<deployment>-<config name>-<strategy>-<YYYYmmdd-HHMMSS>` (deployment when there is one)."""
    parts = [deployment] if deployment and deployment != name else []
    return "-".join([*parts, name, strategy, datetime.now().strftime("%Y%m%d-%H%M%S")])


def prefect_context() -> dict[str, str]:
    """Prefect's flow run id, name and UI URL and the deployment name, where there are some."""
    from prefect.runtime import deployment, flow_run

    out = {
        "prefect.flow_run_id": str(flow_run.get_id() or "local"),
        "prefect.flow_run_name": str(flow_run.get_name() or ""),
    }
    url = flow_run.get_flow_run_ui_url()
    if url and url.startswith(("http://", "https://")):
        out["prefect.flow_run_url"] = url
    if deployment.get_id():
        out["prefect.deployment"] = str(deployment.get_name() or deployment.get_id())
    return out


def context_tags() -> dict[str, str]:
    """Tags every run gets besides the flow's own: Prefect's context and MLflow's source fields."""
    try:
        tags = prefect_context()
    except Exception as exc:  # noqa: BLE001 - a missing Prefect context must not stop the record
        log.debug("no Prefect context: %s", exc)
        tags = {}
    return {**tags, "mlflow.source.name": "flows/federated.py", "mlflow.source.type": "JOB"}


def code_version_tags() -> dict[str, str]:
    """`code_version` (fedcore version, plus `+g<commit>[.dirty]` in a git checkout) and the
    commit itself; `git` runs here, on the tracking thread, never on the critical path."""
    version = fedcore.__version__
    checkout = Path(fedcore.__file__).resolve().parents[1]
    tags = {"code_version": version}
    if not (checkout / ".git").exists():
        return tags

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        full = git("rev-parse", "HEAD")
        if not full:
            return tags
        dirty = ".dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    except (OSError, subprocess.SubprocessError):
        return tags
    tags.update(
        code_version=f"{version}+g{full[:7]}{dirty}",
        git_commit=full[:7],
        **{"mlflow.source.git.commit": full},
    )
    return tags


def metric_chart_url(experiment_id: str, run_id: str, keys: Sequence[str]) -> str:
    """UI route of MLflow's metric view plotting `keys` of one run on one chart (the route the UI
    builds itself, `getMetricPageRoute`), relative to the UI's root."""

    def enc(value: Any) -> str:
        return quote(json.dumps(value, separators=(",", ":")), safe="")

    query = (
        f"runs={enc([run_id])}&metric={enc(keys[0])}&experiments={enc([experiment_id])}"
        f"&plot_metric_keys={enc(list(keys))}&plot_layout={enc({})}&x_axis=step"
        "&y_axis_scale=linear&line_smoothness=1&show_point=true"
        f"&deselected_curves={enc([])}&last_linear_y_axis_range={enc([])}"
    )
    return f"#/metric?{query}"


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


# -- what the flow records ----------------------------------------------------------------


def round_metrics(updates: Sequence[Update], failures: Sequence[Failure]) -> dict[str, float]:
    """A round's training metrics, `<quantity>/<worker>` plus round totals."""
    out: dict[str, float] = {}
    for u in updates:
        out[f"train_loss/{u.worker}"] = u.metrics.loss
        out[f"train_samples/{u.worker}"] = u.metrics.samples
        out[f"train_seconds/{u.worker}"] = u.metrics.seconds
        out[f"wire_bytes/{u.worker}"] = u.wire_bytes
        out[f"failed/{u.worker}"] = 0
    for f in failures:
        out[f"failed/{f.worker}"] = 1
    out["workers_ok"] = len(updates)
    out["workers_failed"] = len(failures)
    out["round_bytes"] = sum(u.wire_bytes for u in updates)
    return out


def eval_metrics(
    results: Mapping[str, EvalResult], groups: Sequence[Sequence[int]]
) -> dict[str, float]:
    """An evaluation's metrics, `<quantity>/<model>` (`federated` or a worker's name)."""
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


def comparison_note(experiment_id: str, run_id: str, models: Sequence[str]) -> str:
    """The run's description: links that chart every model of a quantity on one chart."""
    workers = [m for m in models if m != FEDERATED]
    ordered = [FEDERATED, *workers] if FEDERATED in models else workers
    charts = [
        ("test accuracy", [f"accuracy/{m}" for m in ordered]),
        ("average test loss", [f"loss/{m}" for m in ordered]),
        ("training loss", [f"train_loss/{w}" for w in workers]),
        ("local training seconds", [f"train_seconds/{w}" for w in workers]),
    ]
    links = " · ".join(
        f"[{label}]({metric_chart_url(experiment_id, run_id, keys)})"
        for label, keys in charts
        if keys
    )
    return (
        f"**Every model on one chart** (federated vs {', '.join(workers)}): {links}.\n\n"
        "Metrics are `<quantity>/<model>`, stepped by round. Pictures: `figures/`; every round's "
        "global model: `models/global-rNNN.safetensors`; evaluated rounds' models are logged "
        f"models registered as `{REGISTERED_MODEL}` versions (aliases `current`, `champion`)."
    )


# -- the tracker ----------------------------------------------------------------------------


class Tracker:
    """Queue MLflow calls for one run onto a background thread."""

    enabled = True

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        artifact_root: Path | None = None,
        registered_model: str | None = REGISTERED_MODEL,
    ) -> None:
        self.uri = resolve_tracking_uri(uri)
        self.experiment = experiment
        self.artifact_root = artifact_root or artifact_root_for(self.uri)
        self.registered_model = registered_model
        self.run_id: Future[str] = Future()
        self.experiment_id: str | None = None
        self.model_seconds: list[float] = []  # wall time of logging + registering each model
        self._queue: queue.Queue[Callable[[Any], None] | None] = queue.Queue()
        self._errors: list[str] = []
        self._skipped = 0
        self._failures_in_row = 0
        self._client: Any = None
        # Touched only on the tracking thread:
        self._evaluations: dict[int, dict[str, EvalResult]] = {}
        self._groups: list[list[int]] = []
        self._code_tags: dict[str, str] = {}
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # -- background thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._gone():
                self._skipped += 1
                continue
            try:
                job(self._client)
                self._failures_in_row = 0
            except Exception as exc:  # noqa: BLE001 - recorded and reported at close()
                self._failures_in_row += 1
                self._record(exc)
                if not self.run_id.done():
                    self.run_id.set_exception(exc)

    def _gone(self) -> bool:
        """The run never opened, or the store failed several calls in a row."""
        if self.run_id.done() and self.run_id.exception() is not None:
            return True
        return self._failures_in_row >= MAX_FAILURES_IN_A_ROW

    def _record(self, exc: BaseException, what: str = "") -> None:
        msg = f"{what}{type(exc).__name__}: {exc}"
        log.warning("MLflow logging failed: %s", msg)
        self._errors.append(msg)

    def _submit(self, job: Callable[[Any], None]) -> None:
        self._queue.put(job)

    # -- API --------------------------------------------------------------------------------

    def start_run(
        self,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Open the store, the experiment and a new run (in the background); `config` is
        logged as `config.json`. A server is health-checked first (`ensure_ready` reports it).
        Prefect's context (flow run URL, deployment) is read here, in the flow's thread, and the
        code version on the tracking thread; `tags` win over both."""
        tags = {**context_tags(), **tags}
        params = dict(params)

        def job(_: Any) -> None:
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient

            if is_server(self.uri):
                check_server(self.uri)
            # One INFO line per registered version ("Waiting up to 300 seconds ...") otherwise.
            logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(
                logging.WARNING
            )
            db = sqlite_path(self.uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = None
                if self.artifact_root is not None:
                    self.artifact_root.mkdir(parents=True, exist_ok=True)
                    location = (self.artifact_root / self.experiment).as_uri()
                exp_id = client.create_experiment(self.experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            self.experiment_id = exp_id
            run = client.create_run(exp_id, run_name=run_name, tags=tags)
            self._client = client
            run_id = run.info.run_id
            self.run_id.set_result(run_id)
            self._code_tags = code_version_tags()
            extra = [RunTag(k, v) for k, v in self._code_tags.items()]
            items = list(params.items())
            for i in range(0, max(len(items), 1), 100):
                client.log_batch(
                    run_id,
                    params=[Param(k, v) for k, v in items[i : i + 100]],
                    tags=extra if i == 0 else [],
                )
            if config is not None:
                client.log_dict(run_id, dict(config), "config.json")

        self._submit(job)

    def resume_run(self, run_id: str, round: int, metrics: Mapping[str, float]) -> None:
        """Continue an interrupted training's run: mark it running again and log round `round`'s
        metrics when they never reached the store (the coordinator died with them queued)."""

        def job(_: Any) -> None:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            if is_server(self.uri):
                check_server(self.uri)
            client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            run = client.get_run(run_id)
            self.experiment_id = run.info.experiment_id
            client.update_run(run_id, status="RUNNING")
            self._client = client
            steps = {m.step for m in client.get_metric_history(run_id, "round_seconds")}
            if round not in steps and metrics:
                ts = int(time.time() * 1000)
                batch = [Metric(k, float(v), ts, round) for k, v in metrics.items()]
                for i in range(0, len(batch), 1000):
                    client.log_batch(run_id, metrics=batch[i : i + 1000])
            client.set_tag(run_id, "resumed_after_round", str(round))
            self.run_id.set_result(run_id)

        self._submit(job)

    def ensure_ready(self, timeout: float | None = None) -> str:
        """Wait until the run exists; call before round 1 so a bad store stops the training.

        Raises:
            TrackingUnavailable: the store is unreachable, failed, or did not answer in time
                (default: 60 s for a server, 180 s for a local store that may be migrating).
        """
        if timeout is None:
            timeout = READY_TIMEOUT_SERVER if is_server(self.uri) else READY_TIMEOUT_LOCAL
        try:
            return self.run_id.result(timeout)
        except FutureTimeout:
            raise TrackingUnavailable(
                f"MLflow store {self.uri} did not open the run within {timeout:.0f}s. "
                f"{_fix_hint(self.uri)}"
            ) from None
        except TrackingUnavailable:
            raise
        except Exception as exc:
            raise TrackingUnavailable(
                f"MLflow store {self.uri} could not open the run ({type(exc).__name__}: {exc}). "
                f"{_fix_hint(self.uri)}"
            ) from exc

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
        ts = int(time.time() * 1000)
        results = dict(results)
        groups = [list(g) for g in groups]
        metrics = eval_metrics(results, groups)

        def job(client: Any) -> None:
            from mlflow.entities import Metric

            run_id = self.run_id.result()
            first = not self._evaluations
            self._evaluations[rnd] = results
            self._groups = groups
            federated = results.get(FEDERATED)
            model_id = None
            started = time.perf_counter()
            if federated is not None and model_path is not None:
                try:
                    model_id = self._log_model(client, run_id, rnd, Path(model_path), federated)
                except Exception as exc:  # noqa: BLE001 - the metrics below still go in
                    self._record(exc, f"model of round {rnd} not logged: ")
            batch = [
                Metric(
                    k, float(v), ts, rnd, model_id=model_id if k.endswith("/federated") else None
                )
                for k, v in metrics.items()
            ]
            for i in range(0, len(batch), 1000):
                client.log_batch(run_id, metrics=batch[i : i + 1000])
            if model_id is not None:
                client.finalize_logged_model(model_id, "READY")
                if self.registered_model:
                    self._register(client, run_id, rnd, model_id, federated)
                self.model_seconds.append(time.perf_counter() - started)
            if first and self.experiment_id is not None:
                client.set_tag(
                    run_id,
                    "mlflow.note.content",
                    comparison_note(self.experiment_id, run_id, list(results)),
                )

        self._submit(job)

    def _log_model(
        self, client: Any, run_id: str, rnd: int, model_path: Path, result: EvalResult
    ) -> str:
        """The global model of round `rnd` as a pyfunc logged model; returns its model id."""
        from tasks import mlflow_model

        facts = {
            "round": str(rnd),
            "accuracy": f"{result.accuracy:.6f}",
            "correct": str(result.correct),
            "total": str(result.total),
            "groups": json.dumps(self._groups),
            "mlflow_run_id": run_id,
            **{k: v for k, v in self._code_tags.items() if k in ("code_version", "git_commit")},
        }
        return mlflow_model.log(
            client, str(self.experiment_id), run_id, f"global-r{rnd:03d}", rnd, model_path, facts
        )

    def _register(
        self, client: Any, run_id: str, rnd: int, model_id: str, result: EvalResult
    ) -> None:
        from tasks import mlflow_model

        tags = {
            "round": str(rnd),
            "accuracy": f"{result.accuracy:.6f}",
            "correct": str(result.correct),
            "total": str(result.total),
            "groups": json.dumps(self._groups),
        }
        mlflow_model.register(
            client,
            str(self.registered_model),
            run_id,
            model_id,
            tags,
            result.accuracy,
            local_store=None if is_server(self.uri) else self.uri,
        )

    def _figures(self, client: Any, run_id: str) -> None:
        """accuracy_by_round.png, confusion_federated_rNNN.png, group_shares_rNNN.png."""
        from tasks import figures

        if not self._evaluations:
            return
        last = max(self._evaluations)
        results = self._evaluations[last]
        history = {
            r: {m: res.accuracy for m, res in rs.items()} for r, rs in self._evaluations.items()
        }
        with tempfile.TemporaryDirectory(prefix="fedmnist-figures-") as tmp:
            out = Path(tmp)
            figures.save_png(figures.accuracy_by_round(history), out / "accuracy_by_round.png")
            if FEDERATED in results:
                figures.save_png(
                    figures.confusion_matrix(
                        results[FEDERATED].confusion, f"Federated model, round {last}"
                    ),
                    out / f"confusion_federated_r{last:03d}.png",
                )
            if self._groups:
                figures.save_png(
                    figures.group_shares(
                        {m: r.group_shares for m, r in results.items()},
                        self._groups,
                        f"Share of predictions per digit group, round {last}",
                    ),
                    out / f"group_shares_r{last:03d}.png",
                )
            client.log_artifacts(run_id, str(out), "figures")

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
        """Draw the figures, drain the queue, end the run with `status`; returns the logging
        errors seen (and a note of calls skipped after the store failed)."""

        def job(client: Any) -> None:
            run_id = self.run_id.result()
            try:
                self._figures(client, run_id)
            except Exception as exc:  # noqa: BLE001 - the run must still be ended
                self._record(exc, "figures not logged: ")
            client.set_terminated(run_id, status=status)

        self._submit(job)
        self._queue.put(None)
        self._thread.join(timeout)
        errors = list(self._errors)
        if self._thread.is_alive():
            errors.append(f"MLflow logging to {self.uri} still busy after {timeout:.0f}s")
        if self._skipped:
            errors.append(f"{self._skipped} MLflow call(s) skipped after the store failed")
        return errors

    def run_id_or_none(self) -> str | None:
        """The run id when the run is open (without waiting), else None."""
        if self.run_id.done() and self.run_id.exception() is None:
            return self.run_id.result()
        return None

    def wait_run_id(self, timeout: float = 120.0) -> str:
        return self.run_id.result(timeout)

    def run_url(self, ui_url: str | None) -> str | None:
        """Where the run shows in the MLflow UI: the tracking server itself when the store is a
        server, else `ui_url` (the address `mlflow ui` serves on); None before the run exists."""
        if not self.run_id.done() or self.run_id.exception() is not None:
            return None
        base = self.uri if is_server(self.uri) else ui_url
        if not base:
            return None
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id.result()}"


class NullTracker:
    """The tracker of `tracking.enabled: false`: same calls, no record."""

    enabled = False
    uri = None
    run_id = None

    def start_run(self, *args: Any, **kwargs: Any) -> None: ...

    def resume_run(self, *args: Any, **kwargs: Any) -> None: ...

    def ensure_ready(self, timeout: float | None = None) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_evaluation(self, *args: Any, **kwargs: Any) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def set_tag(self, key: str, value: str) -> None: ...

    def call(self, fn: Callable[[Any, str], None]) -> None: ...

    def close(self, status: str = "FINISHED", timeout: float = 300.0) -> list[str]:
        return []

    def run_id_or_none(self) -> None:
        return None

    def wait_run_id(self, timeout: float = 120.0) -> None:
        return None

    def run_url(self, ui_url: str | None) -> None:
        return None


def make_tracker(config: TrackingConfig) -> Tracker | NullTracker:
    """The tracker `config` asks for (its thread starts now; the store opens on `start_run`)."""
    if not config.enabled:
        return NullTracker()
    return Tracker(config.uri, config.experiment, registered_model=config.registered_model)
