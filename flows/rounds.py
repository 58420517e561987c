"""The rounds of a training, as named steps over one run context.

One round is: train (every trainer in parallel, one `train-<worker>-rNN` task each, the round tried
again below quorum when the config says so), aggregate (the `aggregate-rNN` task), evaluate when
due (the `evaluate-rNN` task), record (flows/round_record.py). Under secure aggregation the train
and aggregate steps are flows/secure_round.py's; for a fleet whose updates need not be held,
flows/streamed_round.py folds each as it arrives. Recording writes the round's state to the run
folder first (fsynced, in the flow's thread: a round said to be done is one a resume starts after)
and only then logs it to MLflow, the Prefect artifacts and the run folder's pictures, on the run's
`RoundWriter` thread (fedcore.resume) while the next round trains; so a training resumed after a
crash never records a round twice and never misses one. Each timeline line carries the round's
phases (seconds in training, of which the slowest worker's own compute, aggregation, evaluation and
writing), which benchmarks/seed_phases.py reads.

A round is a group of tasks in the flow run, never a subflow: a subflow adds about 1.2 s of
Prefect API calls to every round, more than a short round's local training takes.

Past 400 lines because the sync loop's steps are shared by the non-sync schedules
(flows/schedules.py): splitting them would scatter one round's story over two modules.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from prefect import get_run_logger
from prefect.futures import PrefectConcurrentFuture, PrefectFuture
from prefect.utilities.annotations import quote

from fedcore import report
from fedcore.config import ExperimentConfig
from fedcore.errors import QuorumNotReached, UpdateRejected, WorkerFailed, cause_of
from fedcore.evaluation import EvalResult
from fedcore.model import initial_weights, num_parameters
from fedcore.privacy.budget import PrivacyBudget
from fedcore.privacy.errors import PrivacyBudgetSpent
from fedcore.protocol import TrainRequest, Update
from fedcore.resume import ResumePoint, RoundWriter
from fedcore.screening import ScreeningHistory
from fedcore.seeding import derive_seed
from fedcore.session import WorkerSession
from fedcore.strategies import ExpectedCounts, Failure, Strategy
from fedcore.training import TrainPlan
from flows.round_record import record_round
from tasks.aggregation import aggregate, finish_aggregate
from tasks.artifacts import RunArtifacts
from tasks.tracking import Tracker
from tasks.workers import evaluate_models, train_answering, train_fleet

Weights = dict[str, torch.Tensor]
T = TypeVar("T")
# A worker's training: its own task's future, or its answer within a fleet's round task
TrainingFuture = PrefectFuture[Update] | Future[Update]
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
    from flows.streamed_round import streams, train_streamed  # noqa: PLC0415 - builds on this

    extra_phases: dict[str, float] = {}
    extra: dict[str, float] = {}
    if ctx.cfg.secure_aggregation.enabled:  # the coordinator sees only the sum of the updates
        from flows.secure_round import secure_round  # noqa: PLC0415 - only when it is on

        updates, failures, aggregated, summed = secure_round(ctx, rnd, plan, weights)
        extra.update(summed)
        trained = time.perf_counter()
    elif streams(ctx):  # each update folded as it arrives (flows/streamed_round.py)
        updates, failures, folded = retry_below_quorum(
            ctx, rnd, lambda: train_streamed(ctx, rnd, plan, weights)
        )
        trained = time.perf_counter()
        aggregated = finish_aggregate(unwalked(folded), rnd, failures, ctx.trainers)
        extra_phases = {"fold": folded.seconds}  # within "train": checking and folding updates
    else:
        updates, failures = train_round(ctx, rnd, plan, weights)
        trained = time.perf_counter()
        # unwalked: Prefect would otherwise walk every update's tensors for futures
        aggregated = aggregate(ctx.strategy, rnd, unwalked(weights), unwalked(updates), failures)
    aggregated_at = time.perf_counter()
    evaluation = evaluate_if_due(ctx, rnd, updates, aggregated)
    done = time.perf_counter()
    phases = {
        "train": trained - started,
        "compute": max((u.metrics.seconds for u in updates), default=0.0),
        "aggregate": aggregated_at - trained,
        "evaluate": done - aggregated_at,
        **extra_phases,
    }
    result = RoundResult(
        rnd, plan, updates, failures, aggregated, evaluation, done - started, phases
    )
    if ctx.privacy is not None:  # epsilon after this round's charge
        extra.update(ctx.privacy.metrics())
    record_round(ctx, result, extra=extra)
    return result


def train_round(
    ctx: RunContext, rnd: int, plan: TrainPlan, weights: Weights
) -> tuple[list[Update], list[Failure]]:
    """Round `rnd`'s valid updates and failures. A round below its quorum is tried again up to
    `round_retries` times when the config says `below_quorum: retry`.

    Raises:
        QuorumNotReached: still below the quorum after the last try.
    """
    return retry_below_quorum(ctx, rnd, lambda: train_once(ctx, rnd, plan, weights))


def retry_below_quorum(ctx: RunContext, rnd: int, attempt: Callable[[], T]) -> T:
    """`attempt()`, tried again when it raises QuorumNotReached, up to `round_retries` times
    when the config says `below_quorum: retry`.

    Raises:
        QuorumNotReached: still below the quorum after the last try.
    """
    retries = ctx.cfg.round_retries if ctx.cfg.below_quorum == "retry" else 0
    tries = 0
    while True:
        try:
            return attempt()
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
    futures = submit_training(ctx, rnd, plan, weights)
    updates: list[Update] = []
    failures: list[Failure] = []
    for name in list(futures):  # popped: no future outlives the round holding an update
        future = futures.pop(name)
        got = collect_update(ctx, rnd, name, future, weights, ctx.expected_counts(name, plan))
        if isinstance(got, Failure):
            failures.append(got)
        else:
            updates.append(got)
    screened = ctx.screening.screen(updates, weights)
    for name, reason in screened.dropped:
        failures.append(rejection(rnd, name, reason, shown=reason))
    check_quorum(ctx, rnd, len(screened.kept), failures)
    ctx.screening.accept(screened)
    return screened.kept, failures


def submit_training(
    ctx: RunContext, rnd: int, plan: TrainPlan, weights: Weights
) -> dict[str, TrainingFuture]:
    """Round `rnd`'s training of every trainer (of every device still within its privacy
    budget, which is charged), by worker: a `train-<worker>-rNN` task each, or, past
    `tracking.worker_tasks_up_to` trainers, one `train-rNN` task for them all
    (tasks/workers.py `train_fleet`), each worker's answer its own future either way."""
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
    requests = {
        name: TrainRequest(
            rnd, plan, derive_seed(cfg.seed, name, rnd), weights, ctx.strategy.extras_for(name, rnd)
        )
        for name in names
    }
    futures: dict[str, TrainingFuture]
    if len(requests) > cfg.tracking.worker_tasks_up_to:
        futures = submit_fleet_training(ctx, rnd, requests)
    else:
        futures = submit_worker_training(ctx.sessions, rnd, requests, cfg.timeouts.train)
    if ctx.privacy is not None:  # asked to train: its budget is spent, answer or not
        ctx.privacy.charge(plan, list(futures), ctx.example_counts())
    return futures


def submit_worker_training(
    sessions: Mapping[str, WorkerSession],
    rnd: int,
    requests: Mapping[str, TrainRequest],
    timeout: float,
) -> dict[str, TrainingFuture]:
    """A `train-<worker>-rNN` task for every request; a future per worker (`submit_answering`)."""
    return {
        name: submit_answering(sessions[name], name, rnd, request, timeout)
        for name, request in requests.items()
    }


def submit_answering(
    session: WorkerSession,
    name: str,
    rnd: int,
    request: TrainRequest,
    timeout: float,
    task_run_name: str | None = None,
) -> Future[Update]:
    """Worker `name`'s training as a task run (named `task_run_name`, else `train-<worker>-rNN`);
    a future answered by the task (tasks/workers.py `train_answering`: Prefect's state of it
    never holds the update), or, should the task run end without answering, failed with its
    error."""
    answer: Future[Update] = Future()
    task = train_answering
    if task_run_name is not None:
        task = task.with_options(task_run_name=task_run_name)
    run = task.submit(
        session,
        name,
        rnd,
        unwalked(request),  # else Prefect walks the request's tensors for futures
        timeout,
        unwalked(answer),
    )
    # weakly: Prefect's future and its thread's keep this callback until the cycle collector
    # frees them; the answer (its update) must go when the flow lets it go
    settle = partial(fail_unanswered, weakref.ref(answer), name, rnd)
    if isinstance(run, PrefectConcurrentFuture):
        run.wrapped_future.add_done_callback(settle)
    else:
        run.add_done_callback(settle)
    return answer


def fail_unanswered(
    answer_ref: Callable[[], Future[Update] | None], name: str, rnd: int, run: Any
) -> None:
    """Done callback of worker `name`'s training task run: fail its answer, unless answered or
    let go, with the run's error (its final state's, as `task_outcome` reports it)."""
    answer = answer_ref()
    if answer is None or answer.done():
        return
    error: BaseException | None = None
    try:
        state = run.result() if isinstance(run, Future) else run.state
        if not state.is_completed():
            got = state.result(raise_on_failure=False)
            error = got if isinstance(got, BaseException) else None
    except Exception as exc:  # noqa: BLE001 - the run's own error is this worker's failure
        error = exc
    if error is None:
        error = WorkerFailed(name, f"round {rnd}'s training task ended without its answer")
    try:
        answer.set_exception(error)
    except InvalidStateError:
        pass  # answered meanwhile


def submit_fleet_training(
    ctx: RunContext, rnd: int, requests: Mapping[str, TrainRequest]
) -> dict[str, TrainingFuture]:
    """One `train-rNN` task for every request; a future per worker, answered as its update
    arrives. The task and its done-callback refer to the futures weakly: the flow owns them and
    pops each as it takes it, so no update outlives its fold. Should the task end without
    answering one (it failed before starting them), that worker's future fails, so no one
    waits on it forever."""
    answers: dict[str, Future[Update]] = {name: Future() for name in requests}
    refs = {name: weakref.ref(answer) for name, answer in answers.items()}
    calls = {name: (ctx.sessions[name], request) for name, request in requests.items()}
    group = train_fleet.submit(rnd, unwalked(calls), ctx.cfg.timeouts.train, unwalked(refs))

    def unanswered(_: object) -> None:
        for name, ref in refs.items():
            answer = ref()
            if answer is None:
                continue  # taken by the flow
            try:
                answer.set_exception(
                    WorkerFailed(name, f"round {rnd}'s training task ended without its answer")
                )
            except InvalidStateError:
                pass  # answered

    if isinstance(group, PrefectConcurrentFuture):
        group.wrapped_future.add_done_callback(unanswered)
    else:
        group.add_done_callback(unanswered)
    return cast(dict[str, TrainingFuture], answers)


def check_quorum(ctx: RunContext, rnd: int, valid: int, failures: Sequence[Failure]) -> None:
    """Raise QuorumNotReached when `valid` updates are fewer than the config's quorum."""
    if valid < ctx.cfg.required_updates():
        raise QuorumNotReached(
            f"round {rnd}: {valid} of {len(ctx.trainers)} workers returned an "
            f"update, {ctx.cfg.required_updates()} needed; failed: "
            + "; ".join(f"{f.worker} ({f.cause}: {f.message})" for f in failures)
        )


def collect_update(
    ctx: RunContext,
    rnd: int,
    name: str,
    future: TrainingFuture,
    weights: Weights,
    expected: ExpectedCounts | None = None,
) -> Update | Failure:
    """Wait for worker `name`'s training task: its update if the strategy accepts it (its counts
    checked against `expected`: fedcore.strategies.base.check_counts), else the failure, with
    the cause its error carries (`FedError.cause`)."""
    got = task_outcome(rnd, name, future)
    if isinstance(got, Failure):
        return got
    try:
        ctx.strategy.check_update(got, weights, expected)
    except UpdateRejected as exc:
        return rejection(rnd, name, exc.reason, shown=exc)
    return got


def unwalked(value: T) -> T:
    """`value` as a task parameter Prefect does not walk looking for futures (its `quote`,
    unwrapped before the task runs): walking a request's or a round's tensors cost a train
    task more than encoding its frame."""
    return cast(T, quote(value))


def task_outcome(rnd: int, name: str, future: TrainingFuture) -> Update | Failure:
    """Wait for worker `name`'s training: its update, or the failure (logged)."""
    if isinstance(future, Future):  # one worker's answer in a fleet's `train-rNN` task
        try:
            return future.result()
        except Exception as exc:  # noqa: BLE001 - every error is this worker's failure
            error: object = exc
    else:
        future.wait()
        if future.state.is_completed():
            return future.result()
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
