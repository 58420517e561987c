"""The rounds of a training, as named steps over one run context.

One round is: train (every trainer in parallel, one `train-<worker>-rNN` task each, the round
tried again below quorum when the config says so), aggregate (the `aggregate-rNN` task),
evaluate when due (the `evaluate-rNN` task), record. Recording writes the round's state to the
run folder first (fsynced, in the flow's thread: a round said to be done is one a resume starts
after) and only then logs it to MLflow, the Prefect artifacts and the run folder's pictures, on
the run's `RoundWriter` thread (fedcore.resume) while the next round trains; so a training resumed
after a crash never records a round twice and never misses one. Each timeline line carries the
round's phases (seconds in training, of which the slowest worker's own compute, aggregation,
evaluation and writing), which benchmarks/seed_phases.py reads.

A round is a group of tasks in the flow run, never a subflow: a subflow adds about 1.2 s of
Prefect API calls to every round, more than a short round's local training takes.

Past 400 lines because the sync loop's steps are shared by the non-sync schedules
(flows/schedules.py): splitting them would scatter one round's story over two modules.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger
from prefect.futures import PrefectFuture

from fedcore import report, timeline
from fedcore.config import ExperimentConfig
from fedcore.errors import QuorumNotReached, UpdateRejected, cause_of
from fedcore.evaluation import EvalResult
from fedcore.model import initial_weights, num_parameters
from fedcore.privacy.budget import PrivacyBudget
from fedcore.privacy.errors import PrivacyBudgetSpent
from fedcore.protocol import TrainRequest, Update
from fedcore.resume import ResumePoint, RoundWriter, write_round
from fedcore.screening import ScreeningHistory
from fedcore.seeding import derive_seed
from fedcore.session import WorkerSession
from fedcore.strategies import ExpectedCounts, Failure, Strategy
from fedcore.strategies.base import StrategyState
from fedcore.training import TrainPlan
from tasks.aggregation import aggregate
from tasks.artifacts import RunArtifacts
from tasks.tracking import Tracker, eval_metrics, round_metrics
from tasks.workers import evaluate_models, train_on_worker

Weights = dict[str, torch.Tensor]
MNIST_SPLIT_SIZES = {"train": 60000, "test": 10000}  # no shard holds more than its split


@dataclass(frozen=True)
class RunContext:
    """What every round of one training uses; made by the flow once the workers are up."""

    cfg: ExperimentConfig
    sessions: Mapping[str, WorkerSession]  # every worker's, by name
    strategy: Strategy
    tracker: Tracker
    run_dir: Path  # where each round's state is written (fedcore.resume)
    artifacts: RunArtifacts
    groups: list[list[int]]  # digit groups whose prediction shares are reported
    config_path: str = ""
    started: float = dataclasses.field(default_factory=time.monotonic)  # the training's start

    @cached_property
    def writer(self) -> RoundWriter:
        """The thread writing and then recording each round, off the critical path."""
        return RoundWriter()

    @cached_property
    def trainers(self) -> list[str]:
        return [w.name for w in self.cfg.trainers]

    @cached_property
    def evaluator(self) -> str | None:
        """The worker that scores the models, or None: no evaluation."""
        return self.cfg.evaluators[0].name if self.cfg.evaluators else None

    @cached_property
    def privacy(self) -> PrivacyBudget | None:
        """Each device's epsilon and who may still train, when DP-SGD is on (`privacy:`)."""
        return PrivacyBudget(self.cfg.privacy, self.trainers) if self.cfg.privacy.enabled else None

    def example_counts(self) -> dict[str, int | None]:
        """Each trainer's example count as its hello gave it (bounded by its split's size)."""
        plan = self.cfg.train.plan(1)
        return {n: self.expected_counts(n, plan).shard_size for n in self.trainers}

    @cached_property
    def screening(self) -> ScreeningHistory:
        """The accepted distances of recent rounds, for screening's absolute bound."""
        return ScreeningHistory(self.cfg.screening.norm_factor)

    def expected_counts(self, name: str, plan: TrainPlan) -> ExpectedCounts:
        """What worker `name`'s update must agree with: its shard size (from its hello; at most
        the split's size, so a hello that lies about its labels cannot raise it) and `plan`."""
        hello = self.sessions[name].hello_info
        shard = None
        if hello is not None:
            split = next(w for w in self.cfg.workers if w.name == name).shard().split
            shard = min(hello.num_examples, MNIST_SPLIT_SIZES.get(split, hello.num_examples))
        # DP-SGD's Poisson batches vary in size: only the shard bounds what a step may see.
        batch = shard if plan.dp_noise_multiplier > 0 and shard else plan.batch_size
        return ExpectedCounts(shard, plan.steps, batch)

    @cached_property
    def config_json(self) -> dict[str, Any]:
        return self.cfg.model_dump(mode="json")

    @cached_property
    def model_meta(self) -> dict[str, object]:
        """The record every model file carries (its round is added per file)."""
        return {
            "model": "fedcore.model.Net",
            "strategy": self.strategy.name,
            "config_hash": self.cfg.config_hash(),
            "seed": self.cfg.seed,
        }


@dataclass(frozen=True)
class RoundResult:
    """One finished round: what was trained, the new global model, its evaluation."""

    round: int
    plan: TrainPlan
    updates: list[Update]
    failures: list[Failure]
    weights: Weights  # the aggregate: the next round's global model
    evaluation: dict[str, EvalResult] | None  # by model; None when the round was not evaluated
    seconds: float
    # seconds per step ("train", "compute": the slowest worker's own, "aggregate", "evaluate")
    phases: Mapping[str, float] = dataclasses.field(default_factory=dict)


def train_rounds(ctx: RunContext, resume: ResumePoint | None = None) -> dict[str, Any]:
    """Rounds 1..R (or from the round after `resume`'s), each trained, aggregated, evaluated
    when due and recorded.

    Returns:
        The summary: name, rounds, final federated accuracy (None if the last round was not
        evaluated), accuracy per evaluated round and model, the run folder.

    Raises:
        QuorumNotReached: a round stayed below its quorum (after the configured retries).
        UpdateRejected: the strategy refused an update while aggregating.
    """
    cfg = ctx.cfg
    if not cfg.schedule.is_sync:
        from flows.schedules import train_scheduled  # noqa: PLC0415 - it builds on this module

        return train_scheduled(ctx, resume)
    logger = get_run_logger()
    weights = resume.weights if resume is not None else initial_weights(cfg.seed)
    first = resume.round + 1 if resume is not None else 1
    logger.info(
        "Training %s: %d rounds over %s with strategy %s (%d parameters); evaluator: %s",
        cfg.name,
        cfg.rounds,
        ", ".join(ctx.trainers),
        ctx.strategy.name,
        num_parameters(weights),
        ctx.evaluator or "none",
    )
    evaluations: dict[int, dict[str, float]] = {}
    for rnd in range(first, cfg.rounds + 1):
        try:
            result = run_round(ctx, rnd, weights)
        except PrivacyBudgetSpent as exc:
            logger.warning("Training stopped before round %d: %s", rnd, exc)
            break
        if result.evaluation is not None:
            evaluations[rnd] = {m: r.accuracy for m, r in result.evaluation.items()}
        weights = result.weights
    return training_summary(ctx, evaluations, "rounds")


def training_summary(
    ctx: RunContext, evaluations: dict[int, dict[str, float]], unit: str
) -> dict[str, Any]:
    """Log the final federated accuracy (if the last round or version was scored) and return
    the summary: name, rounds, final accuracy, accuracy per evaluated round, the run folder.
    Waits until every round is written and recorded first.

    Raises:
        BaseException: what writing or recording a round raised.
    """
    cfg = ctx.cfg
    ctx.writer.flush()
    final = evaluations.get(cfg.rounds, {}).get("federated")
    if final is not None:
        get_run_logger().info(
            "Final federated model: %.2f%% test accuracy after %d %s",
            100 * final,
            cfg.rounds,
            unit,
        )
    return {
        "name": cfg.name,
        "rounds": cfg.rounds,
        "final_accuracy": final,
        "evaluations": evaluations,
        "checkpoint_dir": str(ctx.run_dir),
    }


def run_round(ctx: RunContext, rnd: int, weights: Weights) -> RoundResult:
    """Round `rnd` from the global model `weights`: train, aggregate, evaluate when due, record."""
    ctx.writer.check()  # a round that could not be written stops the training
    started = time.perf_counter()
    get_run_logger().info("Training round %d/%d", rnd, ctx.cfg.rounds)
    plan = dataclasses.replace(ctx.cfg.plan(rnd), **ctx.strategy.plan_overrides())
    updates, failures = train_round(ctx, rnd, plan, weights)
    trained = time.perf_counter()
    aggregated = aggregate(ctx.strategy, rnd, weights, updates, failures)
    aggregated_at = time.perf_counter()
    evaluation = evaluate_if_due(ctx, rnd, updates, aggregated)
    done = time.perf_counter()
    phases = {
        "train": trained - started,
        "compute": max((u.metrics.seconds for u in updates), default=0.0),
        "aggregate": aggregated_at - trained,
        "evaluate": done - aggregated_at,
    }
    result = RoundResult(
        rnd, plan, updates, failures, aggregated, evaluation, done - started, phases
    )
    record_round(ctx, result, extra=ctx.privacy.metrics() if ctx.privacy else None)
    return result


def train_round(
    ctx: RunContext, rnd: int, plan: TrainPlan, weights: Weights
) -> tuple[list[Update], list[Failure]]:
    """Round `rnd`'s valid updates and failures. A round below its quorum is tried again up to
    `round_retries` times when the config says `below_quorum: retry`.

    Raises:
        QuorumNotReached: still below the quorum after the last try.
    """
    retries = ctx.cfg.round_retries if ctx.cfg.below_quorum == "retry" else 0
    tries = 0
    while True:
        try:
            return train_once(ctx, rnd, plan, weights)
        except QuorumNotReached as exc:
            tries += 1
            if tries > retries:
                raise
            get_run_logger().warning(
                "%s; trying round %d again (%d of %d)", exc, rnd, tries, ctx.cfg.round_retries
            )


def train_once(
    ctx: RunContext, rnd: int, plan: TrainPlan, weights: Weights
) -> tuple[list[Update], list[Failure]]:
    """One try at round `rnd`: every trainer in parallel, each until its deadline
    (`timeouts.train`), then the updates screened against the global model.

    Returns:
        The valid updates and the failures (a worker that dropped, timed out, failed, or whose
        update was rejected).

    Raises:
        QuorumNotReached: fewer valid updates than the config's quorum.
    """
    cfg = ctx.cfg
    names = ctx.trainers
    if ctx.privacy is not None:  # only devices whose next round stays within their budget
        names = ctx.privacy.admit(rnd, plan, ctx.example_counts(), cfg.required_updates())
        for name in ctx.privacy.newly_stopped(rnd):
            get_run_logger().warning(
                "Round %d: %s's privacy budget is spent (epsilon %.3f of %g): it trains no more",
                rnd,
                name,
                ctx.privacy.epsilon(name),
                cfg.privacy.target_epsilon,
            )
    futures = {
        name: train_on_worker.submit(
            ctx.sessions[name],
            name,
            rnd,
            TrainRequest(
                rnd,
                plan,
                derive_seed(cfg.seed, name, rnd),
                weights,
                ctx.strategy.extras_for(name, rnd),
            ),
            cfg.timeouts.train,
        )
        for name in names
    }
    if ctx.privacy is not None:  # asked to train: its budget is spent, answer or not
        ctx.privacy.charge(plan, list(futures), ctx.example_counts())
    updates: list[Update] = []
    failures: list[Failure] = []
    for name, future in futures.items():
        got = collect_update(ctx, rnd, name, future, weights, ctx.expected_counts(name, plan))
        if isinstance(got, Failure):
            failures.append(got)
        else:
            updates.append(got)
    screened = ctx.screening.screen(updates, weights)
    for name, reason in screened.dropped:
        failures.append(rejection(rnd, name, reason, shown=reason))
    if len(screened.kept) < cfg.required_updates():
        raise QuorumNotReached(
            f"round {rnd}: {len(screened.kept)} of {len(ctx.trainers)} workers returned an "
            f"update, {cfg.required_updates()} needed; failed: "
            + "; ".join(f"{f.worker} ({f.cause}: {f.message})" for f in failures)
        )
    ctx.screening.accept(screened)
    return screened.kept, failures


def collect_update(
    ctx: RunContext,
    rnd: int,
    name: str,
    future: PrefectFuture[Update],
    weights: Weights,
    expected: ExpectedCounts | None = None,
) -> Update | Failure:
    """Wait for worker `name`'s training task: its update if the strategy accepts it (its counts
    checked against `expected`: fedcore.strategies.base.check_counts), else the failure, with
    the cause its error carries (`FedError.cause`)."""
    future.wait()
    if future.state.is_completed():
        update = future.result()
        try:
            ctx.strategy.check_update(update, weights, expected)
        except UpdateRejected as exc:
            return rejection(rnd, name, exc.reason, shown=exc)
        return update
    error = future.state.result(raise_on_failure=False)
    cause = cause_of(error)
    get_run_logger().warning("Round %d: %s dropped (%s): %s", rnd, name, cause, error)
    return Failure(name, rnd, cause, str(error))


def rejection(rnd: int, name: str, reason: str, shown: object) -> Failure:
    """Log (showing `shown`) and return the failure of worker `name`'s rejected update."""
    get_run_logger().warning("Round %d: update from %s rejected: %s", rnd, name, shown)
    return Failure(name, rnd, UpdateRejected.cause, reason)


def evaluate_if_due(
    ctx: RunContext,
    rnd: int,
    updates: list[Update],
    aggregated: Weights,
    label: str = "round",
) -> dict[str, EvalResult] | None:
    """Score the federated model (and each update, if configured) when round `rnd` is due;
    None when it is not or there is no evaluator. `label`: "round", or "version" under a
    non-sync schedule (the task is then `evaluate-v<k>`)."""
    cfg = ctx.cfg
    if not ctx.evaluator or not cfg.evaluation.due(rnd, cfg.rounds):
        return None
    models = {u.worker: u.weights for u in updates} if cfg.evaluation.workers else {}
    models["federated"] = aggregated
    task = evaluate_models
    if label != "round":
        task = evaluate_models.with_options(task_run_name=f"evaluate-v{rnd:03d}")
    future = task.submit(
        ctx.sessions[ctx.evaluator], rnd, models, ctx.groups, cfg.timeouts.evaluate
    )
    future.wait()
    logger = get_run_logger()
    if not future.state.is_completed():
        # An evaluator that is gone, or answers with a bad evaluation, costs this round's scores,
        # never the training: the round's model is still written and the next evaluation tried.
        exc = future.state.result(raise_on_failure=False)
        logger.warning(
            "%s %d: evaluation skipped: evaluator %s %s: %s",
            label.capitalize(),
            rnd,
            ctx.evaluator,
            cause_of(exc),
            exc,
        )
        return None
    results = future.result()
    logger.info("Evaluating models (%s %d)", label, rnd)
    for model, res in results.items():
        for line in report.evaluation_lines(model, res, ctx.groups):
            logger.info(line)
    return results


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
    losses = ", ".join(f"{u.worker} {u.metrics.loss:.3f}" for u in result.updates)
    what = "Round" if ctx.cfg.schedule.is_sync else "Version"
    get_run_logger().info(
        "%s %d/%d done in %.1fs (training loss: %s)",
        what,
        rnd,
        ctx.cfg.rounds,
        result.seconds,
        losses,
    )


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
