"""The `federated-mnist` flow: pre-flight, then rounds of parallel training, aggregation,
evaluation at the configured cadence, and an MLflow record of everything.

Reads as the plain sequence it is. Each worker's round is its own task (`train-alice-r07`) so the
Prefect UI shows who was slow or failed; a round is a group of tasks in this flow, never a subflow
(a subflow costs ~1.2 s; FIELD-NOTES).
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

import fedcore
from fedcore import report
from fedcore.config import ExperimentConfig, WorkerConfig, fedmnist_home, load_config, parse_config
from fedcore.errors import DataError, FedError, QuorumNotReached, UpdateRejected
from fedcore.model import initial_weights, num_parameters
from fedcore.protocol import TrainRequest, Update
from fedcore.resume import ResumePoint, find_run_dir, load_resume_point, write_round
from fedcore.screening import screen_updates
from fedcore.seeding import derive_seed
from fedcore.session import WorkerSession
from fedcore.strategies import Failure, build_strategy
from fedcore.transport.base import Transport, WorkerLaunch
from fedcore.transport.local import LocalTransport
from fedcore.transport.ssh import SSHTransport
from flows.parameters import (
    ConfigPath,
    DataDir,
    LearningRate,
    Overrides,
    Rounds,
    Seed,
    StrategyName,
    config_overrides,
    resolve_config_path,
)
from tasks.artifacts import RunArtifacts, summary_markdown
from tasks.tracking import Tracker, eval_metrics, flatten, make_tracker, round_metrics, run_name
from tasks.workers import evaluate_models, start_worker, stop_workers, train_on_worker

FAILURE_CAUSES = {
    "WorkerTimeout": "timeout",
    "WorkerUnreachable": "unreachable",
    "UpdateRejected": "rejected",
}


def make_transport(worker: WorkerConfig) -> Transport:
    """The transport a worker's config names."""
    if worker.transport == "ssh":
        assert worker.ssh is not None  # the config validator guarantees it
        return SSHTransport(worker.ssh, worker.name)
    return LocalTransport(worker.python)


def make_session(cfg: ExperimentConfig, worker: WorkerConfig) -> WorkerSession:
    if worker.transport == "ssh":  # a path on the device; the ssh section's data_dir otherwise
        launch = WorkerLaunch(
            worker.name, worker.data_dir or "", worker.shard(), worker.threads, worker.device
        )
        return WorkerSession(launch, make_transport(worker))
    data_dir = cfg.data_dir_for(worker)
    if not data_dir.is_dir():
        raise DataError(
            f"worker {worker.name}: data directory {data_dir} does not exist; prepare MNIST with "
            f"`fedmnist data --dir {data_dir}` or set data_dir in the config"
        )
    launch = WorkerLaunch(worker.name, str(data_dir), worker.shard(), worker.threads, worker.device)
    return WorkerSession(launch, make_transport(worker))


def run_dir_for(cfg: ExperimentConfig, run_key: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return fedmnist_home() / "runs" / f"{stamp}-{cfg.name}-{run_key[:8]}"


@flow(name="federated-mnist", log_prints=False)
def federated_mnist(
    config_path: ConfigPath = "configs/seed.yaml",
    overrides: Overrides = None,
    rounds: Rounds = None,
    strategy: StrategyName = None,
    lr: LearningRate = None,
    seed: Seed = None,
    data_dir: DataDir = None,
    resume: Annotated[str | None, Field(min_length=1)] = None,
) -> dict[str, Any]:
    """Train the MNIST CNN across the configured workers.

    The typed parameters carry their constraints into the flow's parameter schema, so the Prefect
    server refuses a bad value (`rounds=-1`, an unknown strategy) before a run is created, naming
    the field; the whole experiment config is validated again here (flows/parameters.py).

    Args:
        config_path: experiment YAML (see configs/); a relative path is looked up in the working
            directory, then in the project checkout.
        overrides: dotted config overrides, e.g. {"train.steps": 2, "timeouts.train": 60}.
        rounds: rounds to train, > 0 (default: the config's).
        strategy: aggregation strategy by name (default: the config's). A different name replaces
            the config's strategy section with that strategy's defaults; set its options through
            overrides, e.g. {"strategy.weighting": "samples"}.
        lr: the workers' initial learning rate train.lr, > 0 (default: the config's).
        seed: seed of model init and every worker's sampling (default: the config's).
        data_dir: MNIST directory of the local workers (default: the config's data_dir, else
            $FEDMNIST_HOME/data/mnist).
        resume: an interrupted training to continue from its last completed round: its run
            folder, that folder's name under $FEDMNIST_HOME/runs, or its MLflow run id. The
            training keeps its own config (`rounds` may extend it) and its MLflow run.

    Returns:
        The run summary: final accuracy, accuracy per evaluated round, checkpoint dir, MLflow run.

    Raises:
        ConfigError: the config or an override is invalid (the field is named).
        QuorumNotReached: fewer workers than the quorum returned an update in a round.
    """
    if resume is not None:
        point = load_resume_point(find_run_dir(resume, fedmnist_home() / "runs"))
        raw = dict(point.config)
        if rounds is not None:
            raw["rounds"] = rounds
        return run_training(parse_config(raw, f"resumed {point.run_dir}"), point.config_path, point)
    path = resolve_config_path(config_path)
    cfg = load_config(
        path,
        config_overrides(
            path, overrides, rounds=rounds, strategy=strategy, lr=lr, seed=seed, data_dir=data_dir
        ),
    )
    return run_training(cfg, str(path))


def run_training(
    cfg: ExperimentConfig, config_path: str = "", resume: ResumePoint | None = None
) -> dict[str, Any]:
    """The training itself, inside a flow run (continuing `resume` when given)."""
    logger = get_run_logger()
    run_key = str(flow_run.get_id() or "local")
    strategy = build_strategy(cfg.strategy)
    groups = cfg.digit_groups()

    # Start every worker first: their Python and torch imports overlap MLflow opening its store.
    sessions = {w.name: make_session(cfg, w) for w in cfg.workers}
    starts = {name: start_worker.submit(s, cfg.timeouts.start) for name, s in sessions.items()}
    tracker = make_tracker(cfg.tracking)
    params = flatten("", cfg.model_dump(mode="json"), {})
    params.update({f"strategy.{k}": str(v) for k, v in strategy.params().items()})
    params["config_hash"] = cfg.config_hash()
    if resume is not None and resume.mlflow_run_id:
        tracker.resume_run(resume.mlflow_run_id, resume.round, resume.metrics)
    else:
        tracker.start_run(
            run_name=run_name(cfg.name, strategy.name),
            tags={
                "prefect.flow_run_id": run_key,
                "prefect.flow_run_name": str(flow_run.get_name() or ""),
                "config_path": config_path,
                "config_hash": cfg.config_hash(),
                "fedcore_version": fedcore.__version__,
                "strategy": strategy.name,
            },
            params=params,
            config=cfg.model_dump(mode="json"),
        )
    status = "FAILED"
    try:
        for worker in cfg.workers:
            hello = starts[worker.name].result()
            split = worker.shard().split
            logger.info(report.available_numbers(worker.name, split, hello.label_counts))
            if hello.device != "cpu":
                logger.info("%s runs on %s (torch %s)", worker.name, hello.device, hello.torch)
        tracker.ensure_ready()  # an unreachable MLflow store stops the training before round 1
        run_dir = resume.run_dir if resume is not None else run_dir_for(cfg, run_key)
        run_dir.mkdir(parents=True, exist_ok=True)
        tracker.set_tag("checkpoint_dir", str(run_dir))
        artifacts = RunArtifacts(cfg.name, cfg.rounds)
        if resume is not None:
            strategy.load_state_dict(resume.strategy)
            logger.info(
                "Resuming %s after round %d of %d from %s",
                cfg.name,
                resume.round,
                cfg.rounds,
                run_dir,
            )
        summary = train_rounds(
            cfg, sessions, strategy, groups, tracker, run_dir, artifacts, config_path, resume
        )
        status = "FINISHED"
        try:
            summary["mlflow_run_id"] = tracker.wait_run_id(timeout=60)
        except Exception as exc:  # noqa: BLE001 - reported below with the other tracking errors
            summary["mlflow_run_id"] = None
            logger.warning("MLflow run could not be created: %s", exc)
        url = tracker.run_url(cfg.tracking.ui_url)
        if url:
            artifacts.mlflow_link(url)
            logger.info("MLflow run: %s", url)
        summary["mlflow_url"] = url
        artifacts.summary(summary_markdown(summary, strategy.name, url))
        return summary
    finally:
        stop_workers(list(sessions.values()))
        errors = tracker.close(status)
        if errors:
            logger.warning("MLflow logging reported %d error(s); first: %s", len(errors), errors[0])


def train_rounds(
    cfg: ExperimentConfig,
    sessions: dict[str, WorkerSession],
    strategy: Any,
    groups: list[list[int]],
    tracker: Tracker,
    run_dir: Path,
    artifacts: RunArtifacts,
    config_path: str = "",
    resume: ResumePoint | None = None,
) -> dict[str, Any]:
    """Rounds 1..R: train in parallel, aggregate, evaluate when due, write the round's state,
    then record it (so a resumed training never logs a round twice)."""
    logger = get_run_logger()
    trainers = [w.name for w in cfg.trainers]
    evaluator = cfg.evaluators[0].name if cfg.evaluators else None
    weights = resume.weights if resume is not None else initial_weights(cfg.seed)
    first = resume.round + 1 if resume is not None else 1
    config_json = cfg.model_dump(mode="json")
    logger.info(
        "Training %s: %d rounds over %s with strategy %s (%d parameters); evaluator: %s",
        cfg.name,
        cfg.rounds,
        ", ".join(trainers),
        strategy.name,
        num_parameters(weights),
        evaluator or "none",
    )
    evaluations: dict[int, dict[str, float]] = {}
    meta_base = {
        "model": "fedcore.model.Net",
        "strategy": strategy.name,
        "config_hash": cfg.config_hash(),
        "seed": cfg.seed,
    }
    for rnd in range(first, cfg.rounds + 1):
        started = time.perf_counter()
        logger.info("Training round %d/%d", rnd, cfg.rounds)
        plan = dataclasses.replace(cfg.train.plan(rnd), **strategy.plan_overrides())
        for attempt in range(1 + (cfg.round_retries if cfg.below_quorum == "retry" else 0)):
            try:
                updates, failures = train_round(cfg, sessions, strategy, rnd, plan, weights)
                break
            except QuorumNotReached as exc:
                if cfg.below_quorum == "fail" or attempt == cfg.round_retries:
                    raise
                logger.warning(
                    "%s; trying round %d again (%d of %d)", exc, rnd, attempt + 1, cfg.round_retries
                )
        weights = strategy.aggregate(rnd, weights, updates, failures)
        metrics = round_metrics(updates, failures)
        metrics["lr"] = plan.lr
        losses = ", ".join(f"{u.worker} {u.metrics.loss:.3f}" for u in updates)
        results = None
        if evaluator and cfg.evaluation.due(rnd, cfg.rounds):
            models = {u.worker: u.weights for u in updates} if cfg.evaluation.workers else {}
            models["federated"] = weights
            results = evaluate_models.submit(
                sessions[evaluator], rnd, models, groups, cfg.timeouts.evaluate
            ).result()
            logger.info("Evaluating models (round %d)", rnd)
            for model, res in results.items():
                for line in report.evaluation_lines(model, res, groups):
                    logger.info(line)
            evaluations[rnd] = {m: r.accuracy for m, r in results.items()}
        metrics["round_seconds"] = time.perf_counter() - started
        # The round is complete once its state is on disk; only then is it recorded.
        path = write_round(
            run_dir,
            config=config_json,
            config_path=config_path,
            round=rnd,
            weights=weights,
            strategy=strategy.state_dict(),
            metrics={**metrics, **(eval_metrics(results, groups) if results else {})},
            mlflow_run_id=tracker.run_id_or_none(),
            meta=meta_base,
        )
        tracker.log_artifact(path, "models")
        if results is not None:
            tracker.log_evaluation(rnd, results, groups, path)
            artifacts.evaluation(rnd, results, groups)
        tracker.log_metrics(metrics, step=rnd)
        artifacts.round_done(rnd)
        logger.info(
            "Round %d/%d done in %.1fs (training loss: %s)",
            rnd,
            cfg.rounds,
            metrics["round_seconds"],
            losses,
        )
    final = evaluations.get(cfg.rounds, {}).get("federated")
    if final is not None:
        logger.info(
            "Final federated model: %.2f%% test accuracy after %d rounds", 100 * final, cfg.rounds
        )
    return {
        "name": cfg.name,
        "rounds": cfg.rounds,
        "final_accuracy": final,
        "evaluations": evaluations,
        "checkpoint_dir": str(run_dir),
    }


def train_round(
    cfg: ExperimentConfig,
    sessions: dict[str, WorkerSession],
    strategy: Any,
    rnd: int,
    plan: Any,
    weights: dict[str, Any],
) -> tuple[list[Update], list[Failure]]:
    """One attempt at round `rnd`: every trainer in parallel, each until its deadline
    (`timeouts.train`); returns the valid updates and the failures, or raises QuorumNotReached."""
    logger = get_run_logger()
    trainers = [w.name for w in cfg.trainers]
    futures = {
        name: train_on_worker.submit(
            sessions[name],
            name,
            rnd,
            TrainRequest(
                rnd,
                plan,
                derive_seed(cfg.seed, name, rnd),
                weights,
                strategy.extras_for(name, rnd),
            ),
            cfg.timeouts.train,
        )
        for name in trainers
    }
    updates: list[Update] = []
    failures: list[Failure] = []
    for name, fut in futures.items():
        fut.wait()
        if fut.state.is_completed():
            update = fut.result()
            try:
                strategy.check_update(update, weights)
            except UpdateRejected as rejected:
                failures.append(Failure(name, rnd, "rejected", rejected.reason))
                logger.warning("Round %d: update from %s rejected: %s", rnd, name, rejected)
                continue
            updates.append(update)
            continue
        exc = fut.state.result(raise_on_failure=False)
        cause = FAILURE_CAUSES.get(type(exc).__name__, "failed")
        failures.append(Failure(name, rnd, cause, str(exc)))
        logger.warning("Round %d: %s dropped (%s): %s", rnd, name, cause, exc)
    screened = screen_updates(updates, weights, cfg.screening.norm_factor)
    for name, reason in screened.dropped:
        failures.append(Failure(name, rnd, "rejected", reason))
        logger.warning("Round %d: update from %s rejected: %s", rnd, name, reason)
    updates = screened.kept
    if len(updates) < cfg.required_updates():
        raise QuorumNotReached(
            f"round {rnd}: {len(updates)} of {len(trainers)} workers returned an update, "
            f"{cfg.required_updates()} needed; failed: "
            + "; ".join(f"{f.worker} ({f.cause}: {f.message})" for f in failures)
        )
    return updates, failures


__all__ = ["federated_mnist", "run_training", "FedError"]
