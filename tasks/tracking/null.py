"""The tracker of `tracking.enabled: false`: the `Tracker` protocol's calls, no record."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcore.evaluation import EvalResult
from fedcore.protocol import Hello


class NullTracker:
    """Accepts every call of the `Tracker` protocol and records nothing."""

    enabled = False
    uri = None
    run_id = None

    def start_run(
        self,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        config: Mapping[str, Any] | None = None,
        description: str | None = None,
    ) -> None: ...

    def resume_run(self, run_id: str, round: int, metrics: Mapping[str, float]) -> None: ...

    def ensure_ready(self, timeout: float | None = None) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_evaluation(
        self,
        rnd: int,
        results: Mapping[str, EvalResult],
        groups: Sequence[Sequence[int]],
        model_path: Path | None = None,
    ) -> None: ...

    def log_devices(self, hellos: Mapping[str, Hello], trainers: Collection[str]) -> None: ...

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
