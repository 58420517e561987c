"""What a training needs to resume after the coordinator died: written atomically every round.

After round k the run folder holds `global-r<k>.safetensors` (the model),
`strategy-r<k>.safetensors` (the strategy's tensors, e.g. momentum buffers, control variates) and
`state.json`: the config, the
last completed round, the strategy's JSON values, the round's metrics and the MLflow run id. The
model and strategy files are written first and `state.json` last (temp file + rename), so
`state.json` never names a round whose files are incomplete. Workers need nothing: their sampling
seeds derive from (seed, worker, round), and a worker that lost its SCAFFOLD control variate
re-synchronises (fedcore.local_algorithms).

`RoundWriter` takes the writing off the round's critical path without weakening that order: one
thread writes the rounds in the order given, and runs what records a round only once that round's
files are durable; the next round trains meanwhile. A crash then loses at most the rounds still
queued, which were never recorded either, so a resumed training repeats them.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import tensorcodec
from .checkpoint import atomic_write, fsync_dir, load_weights, save_weights
from .errors import ConfigError, FedError
from .model import initial_weights
from .strategies.base import StrategyState

STATE_FILE = "state.json"


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted training stands: its last completed round and everything to go on."""

    run_dir: Path
    config: dict[str, Any]
    round: int
    weights: dict[str, torch.Tensor]
    strategy: StrategyState
    metrics: dict[str, float]
    mlflow_run_id: str | None
    config_path: str
    schedule: dict[str, Any] | None = None  # a non-sync schedule's state (schedules.fleet)
    schedule_tensors: dict[str, torch.Tensor] | None = None  # its models (memory: true)
    privacy: dict[str, Any] | None = None  # the privacy ledger (PrivacyBudget.state_dict)


def write_round(
    run_dir: Path,
    *,
    config: Mapping[str, Any],
    config_path: str,
    round: int,
    weights: Mapping[str, torch.Tensor],
    strategy: StrategyState,
    metrics: Mapping[str, float],
    mlflow_run_id: str | None,
    meta: Mapping[str, object],
    schedule: Mapping[str, Any] | None = None,
    schedule_tensors: Mapping[str, torch.Tensor] | None = None,
    privacy: Mapping[str, Any] | None = None,
) -> Path:
    """Record round `round` (a version, under a non-sync schedule) as completed, with the
    schedule's state and the privacy ledger when there are; returns the model file's path."""
    model = save_weights(
        run_dir / f"global-r{round:03d}.safetensors", weights, {**meta, "round": round}
    )
    strategy_file = run_dir / f"strategy-r{round:03d}.safetensors"
    atomic_write(strategy_file, tensorcodec.dumps(strategy.tensors))
    state = {
        "round": round,
        "config": config,
        "config_path": config_path,
        "model_file": model.name,
        "strategy": {
            "name": strategy.strategy,
            "file": strategy_file.name,
            "values": strategy.values,
        },
        "metrics": dict(metrics),
        "mlflow_run_id": mlflow_run_id,
    }
    if schedule is not None:
        state["schedule"] = dict(schedule)
    if privacy is not None:
        state["privacy"] = dict(privacy)
    if schedule_tensors:
        schedule_file = run_dir / f"schedule-r{round:03d}.safetensors"
        atomic_write(schedule_file, tensorcodec.dumps(dict(schedule_tensors)))
        state["schedule_file"] = schedule_file.name
    atomic_write(run_dir / STATE_FILE, json.dumps(state, indent=1, default=float).encode())
    previous = run_dir / f"strategy-r{round - 1:03d}.safetensors"
    previous.unlink(missing_ok=True)  # only the latest strategy state is needed
    (run_dir / f"schedule-r{round - 1:03d}.safetensors").unlink(missing_ok=True)
    fsync_dir(run_dir)
    return model


class RoundWriter:
    """A thread writing rounds in order, each round's record run once its state is durable.

    `submit(write, then)` queues `write()` (e.g. `write_round`) and `then(written)` (the
    record); a failed `write` runs no `then`, skips every job after it and is raised, as it was,
    by the next `submit`, `flush` or `close` in the caller's thread. A failing `then` is raised
    the same way (after the later rounds were written: their state is sound).
    """

    def __init__(self, name: str = "round-writer") -> None:
        self._queue: queue.Queue[tuple[Callable[[], Any], Callable[[Any], None]] | None] = (
            queue.Queue()
        )
        self._error: BaseException | None = None
        self._write_failed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[], Any], then: Callable[[Any], None]) -> None:
        """Queue one round: `write()`, then `then(<what write returned>)`.

        Raises:
            BaseException: what an earlier round's `write` or `then` raised.
        """
        self.check()
        self._queue.put((write, then))

    def flush(self) -> None:
        """Wait until every queued round is written and recorded.

        Raises:
            BaseException: what a round's `write` or `then` raised.
        """
        self._queue.join()
        self.check()

    def close(self) -> None:
        """Write and record what is queued, then stop the thread (raises like `flush`)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.check()

    def check(self) -> None:
        """Raise the first failure of a queued round, once."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._write_failed:
                    continue
                write, then = job
                try:
                    written = write()
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                    self._write_failed = True
                    self._error = self._error or exc
                    continue
                try:
                    then(written)
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                    self._error = self._error or exc
            finally:
                self._queue.task_done()


def find_run_dir(ref: str, runs_root: Path) -> Path:
    """A run folder from a path, a folder name under `runs_root`, or an MLflow run id.

    Only folders inside `runs_root` are found: `resume` is a flow parameter anyone reaching the
    Prefect API can set, and a resumed training takes its whole config (workers, interpreters,
    ssh settings) from the folder's state.json, so a folder elsewhere would be a config nobody
    on the coordinator wrote.

    Raises:
        ConfigError: no such run under `runs_root`, or `ref` points outside it.
    """
    root = runs_root.expanduser().resolve()
    for candidate in (Path(ref).expanduser(), runs_root / ref):
        if not (candidate / STATE_FILE).is_file():
            continue
        if not candidate.resolve().is_relative_to(root):
            raise ConfigError(
                f"run folder {ref!r} is outside {runs_root}: only trainings recorded under "
                f"{runs_root} can be resumed (move the folder there, or set FEDMNIST_HOME)"
            )
        return candidate
    if runs_root.is_dir():
        for state in sorted(runs_root.glob(f"*/{STATE_FILE}")):
            try:
                if json.loads(state.read_text()).get("mlflow_run_id") == ref:
                    return state.parent
            except (OSError, ValueError):
                continue
    raise ConfigError(
        f"no interrupted training {ref!r}: give a run folder (it holds {STATE_FILE}), its name "
        f"under {runs_root}, or its MLflow run id"
    )


def load_version(run_dir: Path, version: int, seed: int) -> dict[str, torch.Tensor]:
    """The global model of round (version) `version` as written in `run_dir`; version 0 is the
    initial model of `seed`.

    Raises:
        ConfigError: the folder does not hold that version's model.
    """
    if version == 0:
        return initial_weights(seed)
    path = run_dir / f"global-r{version:03d}.safetensors"
    try:
        weights, _ = load_weights(path)
    except (OSError, ValueError, FedError) as exc:
        raise ConfigError(f"{run_dir} does not hold version {version}'s model: {exc}") from None
    return weights


def load_resume_point(run_dir: Path) -> ResumePoint:
    """Read what `write_round` wrote last.

    Raises:
        ConfigError: the folder has no complete round.
    """
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
        weights, _ = load_weights(run_dir / state["model_file"])
        tensors, _ = tensorcodec.loads((run_dir / state["strategy"]["file"]).read_bytes())
        schedule_tensors = None
        if state.get("schedule_file"):
            raw = (run_dir / str(state["schedule_file"])).read_bytes()
            schedule_tensors, _ = tensorcodec.loads(raw)
    except (OSError, ValueError, KeyError, FedError) as exc:
        raise ConfigError(f"{run_dir} holds no complete round to resume from: {exc}") from None
    return ResumePoint(
        run_dir=run_dir,
        config=state["config"],
        round=int(state["round"]),
        weights=weights,
        strategy=StrategyState(state["strategy"]["name"], tensors, state["strategy"]["values"]),
        metrics={k: float(v) for k, v in state.get("metrics", {}).items()},
        mlflow_run_id=state.get("mlflow_run_id"),
        config_path=state.get("config_path", ""),
        schedule=state.get("schedule"),
        schedule_tensors=schedule_tensors,
        privacy=state.get("privacy"),
    )
