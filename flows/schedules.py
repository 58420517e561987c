"""Semi-synchronous and asynchronous training: the flow as a loop over completed jobs.

Under `schedule.mode: async` (FedBuff) every trainer is kept busy: each device's job is a task
(`train-alice-v017`: alice training from global version 17), and the loop waits for whichever
job completes first. Its update is checked against the model it was trained from, weighed by its
staleness and buffered (`fedcore.schedules.fleet`); every `buffer_size` arrivals one server step
(`aggregate-v018`) makes the next version, and the device that just returned is given it at once.
Under `semi-sync` a round closes once `min_updates` arrived plus at most `grace` seconds (or at
`timeouts.train`); a device still training then keeps its connection and its job, and when it
returns its stale update joins the round in progress and it is given the newest model.

A version is recorded exactly like a synchronous round (state first, with the fleet's state, then
MLflow and the Prefect artifacts), so `--resume` gives every job that was in flight again. When
the last version is made, the jobs still in flight are abandoned (their workers stopped), not
waited for.
"""

from __future__ import annotations

import math
import queue
import time
from concurrent.futures import Future, wait
from typing import Any

from prefect import get_run_logger

from fedcore.errors import QuorumNotReached
from fedcore.model import initial_weights, num_parameters
from fedcore.protocol import TrainRequest, Update
from fedcore.resume import ResumePoint, load_version
from fedcore.schedules.fleet import Arrival, Fleet, Job
from fedcore.seeding import derive_seed
from fedcore.strategies import Failure
from flows.round_record import record_round
from flows.rounds import (
    RoundResult,
    RunContext,
    Weights,
    collect_update,
    evaluate_if_due,
    rejection,
    submit_answering,
    training_summary,
)
from tasks.aggregation import aggregate

Done = tuple[Job, Future[Update]]


class JobQueue:
    """The jobs in flight as futures of their updates (flows/rounds.py `submit_answering`: a
    task run each, whose Prefect state never holds the update), and the order in which they are
    taken: as they complete (`clock: wall`), or in the order they are due on the paced clock
    (`clock: paced`, waiting for the one due first however the others fare)."""

    def __init__(self, paced: bool) -> None:
        self.paced = paced
        self._done: queue.Queue[Done] = queue.Queue()
        self._futures: dict[str, Future[Update]] = {}

    def now(self, fleet: Fleet) -> float:
        """The clock the schedule's grace and deadline are measured on."""
        return fleet.now if self.paced else time.monotonic()

    def submit(self, ctx: RunContext, fleet: Fleet, job: Job, weights: Weights) -> None:
        """Start `job` (device, number, base version) as a `train-<device>-v<base>` task."""
        cfg = ctx.cfg
        plan = cfg.train.plan(fleet.plan_round())
        request = TrainRequest(
            job.number,
            plan,
            derive_seed(cfg.seed, job.worker, job.number),
            weights,
            ctx.strategy.extras_for(job.worker, job.number),
        )
        future = submit_answering(
            ctx.sessions[job.worker],
            job.worker,
            job.number,
            request,
            cfg.timeouts.train,
            task_run_name=f"train-{job.worker}-v{job.base:03d}",
        )
        self._futures[job.worker] = future
        if not self.paced:
            future.add_done_callback(lambda f: self._done.put((job, f)))

    def next(self, fleet: Fleet, until: float = math.inf) -> Done | None:
        """The next job to take, or None when none is taken before `until` (on `now`'s clock)."""
        if self.paced:
            job = fleet.next_due()
            if job is None or job.due > until:
                return None
            future = self._futures[job.worker]
            wait([future])
            return job, future
        try:
            timeout = None if until == math.inf else max(0.0, until - time.monotonic())
            return self._done.get(timeout=timeout)
        except queue.Empty:
            return None


def paced_seconds(ctx: RunContext, fleet: Fleet, name: str) -> float:
    """How long a job of device `name` takes on the paced clock: steps x step_seconds x
    slowdown (0 without a pace)."""
    worker = next(w for w in ctx.cfg.trainers if w.name == name)
    if worker.step_seconds is None:
        return 0.0
    return ctx.cfg.train.plan(fleet.plan_round()).steps * worker.step_seconds * worker.slowdown


def train_scheduled(ctx: RunContext, resume: ResumePoint | None = None) -> dict[str, Any]:
    """Versions 1..R under the config's semi-sync or async schedule (continuing `resume`).

    Returns:
        The summary, as `flows.rounds.train_rounds` gives it (rounds are versions here).

    Raises:
        QuorumNotReached: no device could train (every one failed since the last version), or a
            semi-sync round ended below `min_updates`.
    """
    cfg = ctx.cfg
    schedule = cfg.schedule
    logger = get_run_logger()
    fleet = Fleet(schedule, ctx.trainers)
    jobs = JobQueue(paced=schedule.clock == "paced")
    weights = resume.weights if resume is not None else initial_weights(cfg.seed)
    if resume is not None and resume.schedule is not None:

        def version(v: int) -> Weights:
            return load_version(ctx.run_dir, v, cfg.seed)

        state, tensors = resume.schedule, resume.schedule_tensors
        for job in fleet.load_state_dict(state, tensors, models=version):
            base = load_version(ctx.run_dir, job.base, cfg.seed)
            jobs.submit(ctx, fleet, fleet.redispatch(job, base), base)
    fleet.version = resume.round if resume is not None else 0
    fleet.models[fleet.version] = weights
    what = (
        f"buffered asynchronous (FedBuff), a server step every {schedule.buffer_size} update(s)"
        if schedule.mode == "async"
        else f"semi-synchronous, a round closes {schedule.grace:g} s after {schedule.min_updates} "
        "update(s)"
    )
    logger.info(
        "Training %s: %d versions over %s, %s, staleness %s (at most %d versions), strategy %s "
        "(%d parameters); evaluator: %s",
        cfg.name,
        cfg.rounds,
        ", ".join(ctx.trainers),
        what,
        schedule.staleness.root.name,
        schedule.max_staleness,
        ctx.strategy.name,
        num_parameters(weights),
        ctx.evaluator or "none",
    )
    evaluations: dict[int, dict[str, float]] = {}
    failed_at: dict[str, int] = {}  # device -> the version at which its last job failed
    try:
        while fleet.version < cfg.rounds:
            if schedule.mode == "async":
                result = async_step(ctx, fleet, jobs, weights, failed_at)
            else:
                result = semi_sync_round(ctx, fleet, jobs, weights, failed_at)
            if result is None:
                continue  # the buffer was screened out entirely: no version made
            if result.evaluation is not None:
                evaluations[result.round] = {m: r.accuracy for m, r in result.evaluation.items()}
            weights = result.weights
    finally:
        for name in list(fleet.jobs):  # the last version is made: their work is not needed
            ctx.sessions[name].abandon()
        ctx.artifacts.fleet(fleet_rows(fleet))
    return {**training_summary(ctx, evaluations, "versions"), "devices": fleet_rows(fleet)}


def give_jobs(
    ctx: RunContext,
    fleet: Fleet,
    jobs: JobQueue,
    weights: Weights,
    failed_at: dict[str, int],
    only: str | None = None,
) -> None:
    """A job from the current version for every idle device (or only device `only`); one whose
    last job failed waits for the next version."""
    for name in fleet.idle() if only is None else [only]:
        if failed_at.get(name, -1) < fleet.version:
            job = fleet.dispatch(name, weights, paced_seconds(ctx, fleet, name))
            jobs.submit(ctx, fleet, job, weights)


def receive(
    ctx: RunContext, fleet: Fleet, done: Done, failures: list[Failure], failed_at: dict[str, int]
) -> Arrival | None:
    """A completed job: its update checked against its base model and buffered; None when it
    failed, was rejected or is too stale (each logged and, but the staleness, a `Failure`)."""
    job, future = done
    base = fleet.base_model(job)
    plan = ctx.cfg.train.plan(1)  # the counts checked do not depend on the round's rate
    got = collect_update(
        ctx, job.base + 1, job.worker, future, base, ctx.expected_counts(job.worker, plan)
    )
    if isinstance(got, Failure):
        fleet.returned(job.worker, failed=True)
        failed_at[job.worker] = fleet.version
        failures.append(got)
        return None
    arrival = fleet.admit(job, got)
    fleet.returned(job.worker)
    logger = get_run_logger()
    if arrival is None:
        logger.warning(
            "Update from %s dropped: trained from version %d, %d versions ago (max_staleness %d)",
            job.worker,
            job.base,
            fleet.staleness(job),
            ctx.cfg.schedule.max_staleness,
        )
    elif arrival.staleness:
        logger.debug(
            "Update from %s trained from version %d joins version %d, %d stale (weight %.3g)",
            job.worker,
            job.base,
            fleet.version + 1,
            arrival.staleness,
            arrival.weight,
        )
    return arrival


def async_step(
    ctx: RunContext, fleet: Fleet, jobs: JobQueue, weights: Weights, failed_at: dict[str, int]
) -> RoundResult | None:
    """Wait for arrivals until the buffer is full, then make the next version."""
    started = time.perf_counter()
    failures: list[Failure] = []
    while not fleet.ready():
        give_jobs(ctx, fleet, jobs, weights, failed_at)
        if not fleet.jobs:
            raise QuorumNotReached(
                f"version {fleet.version + 1}: no device is training; failed: "
                + "; ".join(f"{f.worker} ({f.cause}: {f.message})" for f in failures)
            )
        done = jobs.next(fleet)  # every job has its own deadline, timeouts.train
        assert done is not None
        receive(ctx, fleet, done, failures, failed_at)
    result = server_step(ctx, fleet, weights, failures, started)
    if result is not None:
        give_jobs(ctx, fleet, jobs, result.weights, failed_at)  # the newest version, at once
    return result


def semi_sync_round(
    ctx: RunContext, fleet: Fleet, jobs: JobQueue, weights: Weights, failed_at: dict[str, int]
) -> RoundResult | None:
    """One round: every idle device trains from the current version; the round closes
    `grace` seconds after `min_updates` arrived, at `timeouts.train`, or when no job is left.

    Raises:
        QuorumNotReached: the round closed below `min_updates`.
    """
    cfg = ctx.cfg
    schedule = cfg.schedule
    started = time.perf_counter()
    rnd = fleet.version + 1
    get_run_logger().info("Training round %d/%d", rnd, cfg.rounds)
    failures: list[Failure] = []
    give_jobs(ctx, fleet, jobs, weights, failed_at)
    deadline = jobs.now(fleet) + cfg.timeouts.train
    closes = math.inf
    while fleet.jobs:
        if fleet.ready() and closes == math.inf:
            closes = jobs.now(fleet) + schedule.grace
        done = jobs.next(fleet, min(deadline, closes))
        if done is None:
            break
        arrival = receive(ctx, fleet, done, failures, failed_at)
        if arrival is not None and arrival.staleness > 0:
            # late: the newest model at once
            give_jobs(ctx, fleet, jobs, weights, failed_at, only=arrival.job.worker)
    if not fleet.ready():
        late = ", ".join(sorted(fleet.jobs)) or "none"
        raise QuorumNotReached(
            f"round {rnd}: {len(fleet.buffer)} update(s) by the deadline, "
            f"{schedule.min_updates} needed (still training: {late}); failed: "
            + "; ".join(f"{f.worker} ({f.cause}: {f.message})" for f in failures)
        )
    if fleet.jobs:
        get_run_logger().info(
            "Round %d closes without %s: still training, their updates join a later round",
            rnd,
            ", ".join(sorted(fleet.jobs)),
        )
    return server_step(ctx, fleet, weights, failures, started)


def server_step(
    ctx: RunContext, fleet: Fleet, weights: Weights, failures: list[Failure], started: float
) -> RoundResult | None:
    """The buffer, weighed by staleness and screened, becomes the next version (the
    `aggregate-v<k>` task), evaluated when due and recorded; None when screening dropped all."""
    version = fleet.version + 1
    arrivals = fleet.step_arrivals()
    updates = fleet.weighted_updates(weights, arrivals)
    screened = ctx.screening.screen(updates, weights)
    for name, reason in screened.dropped:
        failures.append(rejection(version, name, reason, shown=reason))
    kept_ids = {id(u) for u in screened.kept}
    pairs = list(zip(arrivals, updates, strict=True))
    fleet.discard([a for a, u in pairs if id(u) not in kept_ids])
    used = [a for a, u in pairs if id(u) in kept_ids]
    if not screened.kept:
        get_run_logger().warning("Version %d: every buffered update was screened out", version)
        return None
    ctx.screening.accept(screened)
    step = aggregate.with_options(task_run_name=f"aggregate-v{version:03d}")
    new = step(ctx.strategy, version, weights, screened.kept, failures)
    fleet.step(new)
    evaluation = evaluate_if_due(ctx, version, screened.kept, new, label="version")
    if evaluation is not None:
        ctx.artifacts.fleet(fleet_rows(fleet))  # the devices table, as often as the scores
    plan = ctx.cfg.train.plan(fleet.plan_round())
    result = RoundResult(
        version,
        plan,
        screened.kept,
        failures,
        new,
        evaluation,
        time.perf_counter() - started,
    )
    record_round(
        ctx,
        result,
        schedule=fleet.state_dict(),
        schedule_tensors=fleet.memory_tensors(),
        extra=version_metrics(fleet, used),
    )
    return result


def version_metrics(fleet: Fleet, used: list[Arrival]) -> dict[str, float]:
    """Per device: updates so far, staleness mean and max, dropped stale, idle seconds; per
    version: how many updates each device contributed and the step's largest staleness."""
    out: dict[str, float] = {}
    for name, s in fleet.stats.items():
        out[f"updates/{name}"] = s.updates
        out[f"staleness_mean/{name}"] = s.staleness_mean
        out[f"staleness_max/{name}"] = s.staleness_max
        out[f"dropped_stale/{name}"] = s.dropped_stale
        out[f"idle_seconds/{name}"] = s.idle_seconds
        out[f"contributed/{name}"] = sum(1 for a in used if a.job.worker == name)
    out["step_staleness_max"] = max((a.staleness for a in used), default=0)
    out["updates_applied"] = fleet.applied
    return out


def fleet_rows(fleet: Fleet) -> list[dict[str, Any]]:
    """One row per device for the Prefect table artifact and the summary."""
    return [
        {
            "device": name,
            "jobs": s.jobs,
            "updates": s.updates,
            "staleness mean": round(s.staleness_mean, 2),
            "staleness max": s.staleness_max,
            "dropped (stale)": s.dropped_stale,
            "failed": s.failed,
            "idle s": round(s.idle_seconds, 1),
        }
        for name, s in fleet.stats.items()
    ]
