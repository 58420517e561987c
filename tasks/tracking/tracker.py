"""What the flow records a training through: the `Tracker` protocol, and `make_tracker` choosing
the MLflow tracker or, with `tracking.enabled: false`, the null tracker.

Both trackers satisfy the protocol (mypy checks `make_tracker`'s returns, a test the signatures),
so the flow never asks which one it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedcore.config import TrackingConfig
from fedcore.evaluation import EvalResult
from fedcore.protocol import Hello

from .mlflow_tracker import MlflowTracker
from .null import NullTracker


class Tracker(Protocol):
    """The record of one training. Calls return at once; the work happens elsewhere or not at
    all, and failures come back from `ensure_ready` (opening the run) and `close` (the rest)."""

    @property
    def enabled(self) -> bool:
        """Whether anything is recorded."""
        ...

    def start_run(
        self,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        config: Mapping[str, Any] | None = None,
        description: str | None = None,
    ) -> None:
        """Open a new run named `run_name` with `tags` and `params`; `config` as a document;
        `description` (markdown: e.g. the privacy guarantee) opens the run's description."""
        ...

    def resume_run(self, run_id: str, round: int, metrics: Mapping[str, float]) -> None:
        """Continue run `run_id` after round `round`, whose `metrics` may never have arrived."""
        ...

    def ensure_ready(self, timeout: float | None = None) -> str | None:
        """Wait until the run is open; returns its id (None: no record).

        Raises:
            TrackingUnavailable: the store cannot open the run.
        """
        ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record `metrics` at round `step`."""
        ...

    def log_evaluation(
        self,
        rnd: int,
        results: Mapping[str, EvalResult],
        groups: Sequence[Sequence[int]],
        model_path: Path | None = None,
    ) -> None:
        """Record round `rnd`'s evaluation, and the federated model at `model_path` with it."""
        ...

    def log_devices(self, hellos: Mapping[str, Hello], trainers: Collection[str]) -> None:
        """Record each worker's hello (device tags, its shard as a dataset input: `training`
        for the names in `trainers`, else `evaluation`); a hello already recorded is skipped."""
        ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Attach file `path` under folder `artifact_path` of the run."""
        ...

    def log_text(self, text: str, artifact_file: str) -> None:
        """Attach `text` as file `artifact_file` of the run."""
        ...

    def set_tag(self, key: str, value: str) -> None:
        """Tag the run."""
        ...

    def call(self, fn: Callable[[Any, str], None]) -> None:
        """Run `fn(client, run_id)` where the record is written (for richer logging)."""
        ...

    def close(self, status: str = "FINISHED", timeout: float = 300.0) -> list[str]:
        """Finish the record with `status`; returns the errors seen while recording."""
        ...

    def run_id_or_none(self) -> str | None:
        """The run id when the run is open (without waiting), else None."""
        ...

    def wait_run_id(self, timeout: float = 120.0) -> str | None:
        """Wait for the run id (None: no record).

        Raises:
            Exception: the run could not be opened, or not within `timeout` s.
        """
        ...

    def run_url(self, ui_url: str | None) -> str | None:
        """Where the run shows in the MLflow UI, if anywhere."""
        ...


def make_tracker(config: TrackingConfig) -> Tracker:
    """The tracker `config` asks for (an MLflow tracker's thread starts now; the store opens on
    `start_run`)."""
    if not config.enabled:
        return NullTracker()
    return MlflowTracker(config.uri, config.experiment, registered_model=config.registered_model)
