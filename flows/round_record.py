"""A finished round made durable, then recorded: the run folder first, MLflow and Prefect after.

`record_round` writes the round's state (model, strategy state, privacy ledger, a non-sync
schedule's state) and its timeline line, fsynced, in the flow's thread, and logs the round's
line; only then is the round queued for the run's writer thread (`RoundJob.record`: MLflow, the
Prefect artifacts, the run folder's pictures) while the next round trains. That order is the
resume guarantee: a round said to be done is one a resume starts after, and only a complete
round is ever recorded. Shared by the sync loop (flows/rounds.py) and the non-sync schedules
(flows/schedules.py).
"""

from __future__ import annotations

import contextvars
import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from prefect import get_run_logger

from fedcore import timeline
from fedcore.evaluation import EvalResult
from fedcore.resume import write_round
from fedcore.strategies.base import StrategyState
from flows.allocator import release_free_memory
from tasks.tracking import eval_metrics, round_metrics

if TYPE_CHECKING:
    from flows.rounds import RoundResult, RunContext

Weights = dict[str, torch.Tensor]


def record_round(
    ctx: RunContext,
    result: RoundResult,
    schedule: Mapping[str, Any] | None = None,
    extra: Mapping[str, float] | None = None,
    schedule_tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the round's state (with a non-sync `schedule`'s state) to the run folder and a
    timeline line, durably, then queue its record for the run's writer thread: MLflow (with the
    `extra` metrics), the Prefect artifacts and the pictures. Returns after logging the round's
    line, which therefore only ever names a round a resume would start after.

    The order is the resume guarantee: a round is complete once its state is on disk, and only
    a complete round is recorded. What the writer needs is copied here, in the flow's thread,
    because the strategy, the fleet and the weights change as the next round goes on.
    """
    rnd, evaluation = result.round, result.evaluation
    metrics = round_metrics(result.updates, result.failures)
    metrics["lr"] = result.plan.lr
    metrics["round_seconds"] = result.seconds
    metrics["elapsed_seconds"] = time.monotonic() - ctx.started
    metrics.update(extra or {})
    hellos = {n: s.hello_info for n, s in ctx.sessions.items() if s.hello_info is not None}
    new = timeline.record_devices(ctx.run_dir, hellos)  # each worker process's hello, once
    if new:  # as device tags, and its shard as a dataset input
        ctx.tracker.log_devices(new, ctx.trainers)
    state = ctx.strategy.state_dict()
    job = RoundJob(
        ctx=ctx,
        round=rnd,
        weights={k: t.detach().clone() for k, t in result.weights.items()},
        strategy=StrategyState(state.strategy, state.tensors, copy.deepcopy(state.values)),
        metrics=metrics,
        evaluation=evaluation,
        updates=[u.worker for u in result.updates],
        phases=dict(result.phases),
        schedule=copy.deepcopy(dict(schedule)) if schedule is not None else None,
        schedule_tensors=(
            {k: t.detach().clone() for k, t in schedule_tensors.items()}
            if schedule_tensors
            else None
        ),
        contributed={
            k[12:]: v for k, v in (extra or {}).items() if k.startswith("contributed/") and v
        },
        privacy=copy.deepcopy(ctx.privacy.state_dict()) if ctx.privacy is not None else None,
    )
    ctx.writer.check()  # a round that could not be recorded stops the training
    path = job.write()
    # Prefect's run context (the flow run the artifacts and log lines belong to) goes along.
    context = contextvars.copy_context()
    ctx.writer.submit(lambda: path, lambda written: context.run(job.record, written))
    losses = ", ".join(f"{u.worker} {u.metrics.loss:.3f}" for u in result.updates) or (
        "not seen: secure aggregation" if ctx.cfg.secure_aggregation.enabled else "none"
    )
    what = "Round" if ctx.cfg.schedule.is_sync else "Version"
    get_run_logger().info(
        "%s %d/%d done in %.1fs (training loss: %s)",
        what,
        rnd,
        ctx.cfg.rounds,
        result.seconds,
        losses,
    )
    release_free_memory()  # what the round freed, back to the system (flows/allocator.py)


@dataclass(frozen=True)
class RoundJob:
    """One round as the writer thread handles it: write it, then record it."""

    ctx: RunContext
    round: int
    weights: Weights
    strategy: StrategyState
    metrics: dict[str, float]
    evaluation: dict[str, EvalResult] | None
    updates: list[str]
    phases: dict[str, float]
    schedule: dict[str, Any] | None
    schedule_tensors: dict[str, torch.Tensor] | None
    contributed: dict[str, float]
    privacy: dict[str, Any] | None = None  # the privacy ledger after this round

    def write(self) -> Path:
        """The round's state, then its timeline line; returns the model file."""
        ctx, started = self.ctx, time.perf_counter()
        evaluation = self.evaluation
        path = write_round(
            ctx.run_dir,
            config=ctx.config_json,
            config_path=ctx.config_path,
            round=self.round,
            weights=self.weights,
            strategy=self.strategy,
            metrics={
                **self.metrics,
                **(eval_metrics(evaluation, ctx.groups) if evaluation else {}),
            },
            mlflow_run_id=ctx.tracker.run_id_or_none(),
            meta=ctx.model_meta,
            schedule=self.schedule,
            schedule_tensors=self.schedule_tensors,
            privacy=self.privacy,
        )
        phases = {**self.phases, "write": time.perf_counter() - started}
        timeline.append(
            ctx.run_dir,
            {
                "round": self.round,
                "seconds": round(self.metrics["elapsed_seconds"], 3),
                "wall": time.time(),
                "model_file": path.name,
                "updates": self.updates,
                **({"contributed": self.contributed} if self.schedule else {}),
                "phases": {k: round(v, 4) for k, v in phases.items()},
            },
        )
        return path

    def record(self, path: Path) -> None:
        """MLflow (the model file, the evaluation, the metrics) and the Prefect artifacts."""
        ctx, rnd = self.ctx, self.round
        ctx.tracker.log_artifact(path, "models")
        if self.evaluation is not None:
            ctx.tracker.log_evaluation(rnd, self.evaluation, ctx.groups, path)
            ctx.artifacts.evaluation(rnd, self.evaluation, ctx.groups)
            draw_run_figures(ctx.run_dir, rnd, self.evaluation, ctx.groups)
        ctx.tracker.log_metrics(self.metrics, step=rnd)
        ctx.artifacts.round_done(rnd)


def draw_run_figures(
    run_dir: Path, rnd: int, evaluation: dict[str, EvalResult], groups: list[list[int]]
) -> None:
    """Redraw the run folder's pictures with round `rnd`'s evaluation (tracking on or off).

    Pictures are for people: a folder that cannot take them costs a warning, never the training.
    """
    from tasks.figures import RunFolderError, update_figures

    try:
        update_figures(run_dir, rnd, evaluation, groups)
    except (RunFolderError, OSError) as exc:
        get_run_logger().warning("Round %d: the run folder's pictures not redrawn: %s", rnd, exc)
