"""The `federated-mnist` flow: start the workers and the MLflow run, train the rounds, stop.

Reads as the plain sequence it is: the flow entry point checks its parameters and loads the
config (or the run to resume), `run_training` starts every worker and the tracker, makes the run
context and hands it to the round loop (`flows.rounds`), then finishes the record and stops the
workers, whatever happened.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import torch
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

import fedcore
from fedcore import report
from fedcore.config import ExperimentConfig, WorkerConfig, fedmnist_home, load_config, parse_config
from fedcore.errors import ConfigError, FedError
from fedcore.privacy.budget import PrivacyBudget
from fedcore.protocol import Hello
from fedcore.resume import ResumePoint, find_run_dir, load_resume_point
from fedcore.strategies import Strategy, build_strategy
from flows.allocator import limit_arenas
from flows.launch import make_session
from flows.parameters import (
    ConfigPath,
    DataDir,
    InventoryPath,
    LearningRate,
    Overrides,
    Rounds,
    Seed,
    StrategyName,
    check_config_path,
    config_overrides,
    resolve_config_path,
)
from flows.rounds import RunContext, train_rounds
from tasks.artifacts import RunArtifacts, summary_markdown
from tasks.tracking import Tracker, flatten, make_tracker, run_name
from tasks.workers import start_worker, stop_workers

# The coordinator's own tensor work (decoding and checking updates, screening, aggregating) is
# small element-wise arithmetic on 431,080 parameters. Split over torch's default threads it
# waits on every core at every operation: with the local workers on the same cores, decoding a
# seed update took 4x longer with two threads than with one (benchmarks/fleet_overhead.py,
# docs/ARCHITECTURE.md, Decisions 9). The aggregates are the same bit for bit.
COORDINATOR_THREADS = 1


def run_dir_for(cfg: ExperimentConfig, run_key: str) -> Path:
    """A new run folder under $FEDMNIST_HOME/runs, named by time, config name and flow run."""
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
    inventory: InventoryPath = None,
    resume: Annotated[str | None, Field(min_length=1)] = None,
) -> dict[str, Any]:
    """Train the MNIST CNN across the configured workers.

    The typed parameters carry their constraints into the flow's parameter schema, so the Prefect
    server refuses a bad value (`rounds=-1`, an unknown strategy) before a run is created, naming
    the field; the whole experiment config is validated again here (flows/parameters.py).

    Args:
        config_path: experiment YAML in the checkout's configs/ or $FEDMNIST_HOME/configs; a
            relative path is looked up in the working directory, then in the project checkout.
        overrides: dotted overrides of training fields only (rounds, seed, train, strategy,
            evaluation, quorum, below_quorum, round_retries, timeouts), e.g.
            {"train.steps": 2, "timeouts.train": 60}; anything else comes from the config file.
        rounds: rounds to train, > 0 (default: the config's).
        strategy: aggregation strategy by name (default: the config's). A different name replaces
            the config's strategy section with that strategy's defaults; set its options through
            overrides, e.g. {"strategy.weighting": "samples"}.
        lr: the workers' initial learning rate train.lr, > 0 (default: the config's).
        seed: seed of model init and every worker's sampling (default: the config's).
        data_dir: MNIST directory of the local workers (default: the config's data_dir, else
            $FEDMNIST_HOME/data/mnist).
        inventory: the fleet to train on: a file in the checkout's configs/, $FEDMNIST_HOME/configs
            or $FEDMNIST_HOME/lab (a list of workers, or a config's `workers:`, e.g.
            configs/jetsons.yaml) whose workers replace the config's, so any recipe runs on any
            fleet (default: the config's own workers).
        resume: an interrupted training to continue from its last completed round: its run
            folder under $FEDMNIST_HOME/runs, that folder's name, or its MLflow run id. The
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
        cfg = parse_config(raw, f"resumed {point.run_dir}")
        if cfg.privacy.enabled and point.privacy is None:  # epsilon would restart from 0
            raise ConfigError(
                f"{point.run_dir.name}: this training has privacy.enabled but its round state "
                "holds no privacy ledger (written by an older version), so the budget its "
                "devices spent is unknown: start a new training instead"
            )
        return run_training(cfg, point.config_path, point)
    path = check_config_path(resolve_config_path(config_path))
    cfg = load_config(
        path,
        config_overrides(
            path,
            overrides,
            rounds=rounds,
            strategy=strategy,
            lr=lr,
            seed=seed,
            data_dir=data_dir,
            inventory=inventory,
        ),
    )
    return run_training(cfg, str(path))


def run_training(
    cfg: ExperimentConfig, config_path: str = "", resume: ResumePoint | None = None
) -> dict[str, Any]:
    """The training itself, inside a flow run (continuing `resume` when given).

    Returns:
        The run summary (see `federated_mnist`).

    Raises:
        FedError: a worker could not start, the MLflow store is unreachable, or a round failed.
    """
    logger = get_run_logger()
    limit_arenas()  # under a deployment too; `fedmnist run` set it before its threads started
    run_key = str(flow_run.get_id() or "local")
    strategy = build_strategy(cfg.strategy)

    # Start every worker first: their Python and torch imports overlap MLflow opening its store.
    sessions = {w.name: make_session(cfg, w) for w in cfg.workers}
    starts = {name: start_worker.submit(s, cfg.timeouts.start) for name, s in sessions.items()}
    tracker = make_tracker(cfg.tracking)
    open_record(tracker, cfg, strategy, config_path, run_key, resume)
    status = "FAILED"
    ctx: RunContext | None = None
    threads = torch.get_num_threads()
    torch.set_num_threads(COORDINATOR_THREADS)
    try:
        for worker in cfg.workers:
            log_hello(worker, starts[worker.name].result())
        tracker.ensure_ready()  # an unreachable MLflow store stops the training before round 1
        run_dir = resume.run_dir if resume is not None else run_dir_for(cfg, run_key)
        run_dir.mkdir(parents=True, exist_ok=True)
        tracker.set_tag("checkpoint_dir", str(run_dir))
        ctx = RunContext(
            cfg=cfg,
            sessions=sessions,
            strategy=strategy,
            tracker=tracker,
            run_dir=run_dir,
            artifacts=RunArtifacts(cfg.name, cfg.rounds),
            groups=cfg.digit_groups(),
            config_path=config_path,
        )
        if resume is not None:
            strategy.load_state_dict(resume.strategy)
            if ctx.privacy is not None:  # the budget the devices spent before the stop
                ctx.privacy.load_state_dict(resume.privacy or {})
            logger.info(
                "Resuming %s after round %d of %d from %s",
                cfg.name,
                resume.round,
                cfg.rounds,
                run_dir,
            )
        summary = train_rounds(ctx, resume)
        status = "FINISHED"
        return finish_record(ctx, summary)
    finally:
        # The workers exit while the record is finished: neither waits for the other.
        stopping = stop_workers.submit(list(sessions.values()))
        if ctx is not None:
            drain_writer(ctx)
        errors = tracker.close(status)
        stopping.wait()
        torch.set_num_threads(threads)
        if errors:
            logger.warning("MLflow logging reported %d error(s); first: %s", len(errors), errors[0])


def drain_writer(ctx: RunContext) -> None:
    """Write and record the rounds still queued (a training that failed keeps its finished
    rounds); a failure here is logged, the training's own error is the one raised."""
    try:
        ctx.writer.close()
    except Exception as exc:  # noqa: BLE001 - the training's own outcome is reported instead
        get_run_logger().warning("A finished round could not be written or recorded: %s", exc)


def open_record(
    tracker: Tracker,
    cfg: ExperimentConfig,
    strategy: Strategy,
    config_path: str,
    run_key: str,
    resume: ResumePoint | None,
) -> None:
    """Start the training's MLflow run (params, tags, config), or reopen the resumed one.

    The recorded config shows `tracking.uri` without credentials (`redact_uri`)."""
    if resume is not None and resume.mlflow_run_id:
        tracker.resume_run(resume.mlflow_run_id, resume.round, resume.metrics)
        return
    config = cfg.recorded()
    params = flatten("", config, {})
    params.update({f"strategy.{k}": str(v) for k, v in strategy.params().items()})
    params["config_hash"] = cfg.config_hash()
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
        config=config,
        description=guarantees(cfg),
    )


def guarantees(cfg: ExperimentConfig) -> str | None:
    """What the training promises about its devices' data, in words, for the run's description
    (None when it promises nothing beyond keeping the examples on the devices)."""
    if not cfg.privacy.enabled:
        return None
    trainers = [w.name for w in cfg.trainers]
    return "**Privacy.** " + PrivacyBudget(cfg.privacy, trainers).statement()


def log_hello(worker: WorkerConfig, hello: Hello) -> None:
    """Log what a started worker holds (the seed's line), and its device unless it is the CPU."""
    logger = get_run_logger()
    logger.info(report.available_numbers(worker.name, worker.shard().split, hello.label_counts))
    if hello.device != "cpu":
        logger.info("%s runs on %s (torch %s)", worker.name, hello.device, hello.torch)


def finish_record(ctx: RunContext, summary: dict[str, Any]) -> dict[str, Any]:
    """Add the MLflow run id and link to a finished training's summary and publish it."""
    logger = get_run_logger()
    try:
        summary["mlflow_run_id"] = ctx.tracker.wait_run_id(timeout=60)
    except Exception as exc:  # noqa: BLE001 - reported below with the other tracking errors
        summary["mlflow_run_id"] = None
        logger.warning("MLflow run could not be created: %s", exc)
    url = ctx.tracker.run_url(ctx.cfg.tracking.ui_url)
    if url:
        ctx.artifacts.mlflow_link(url)
        logger.info("MLflow run: %s", url)
    summary["mlflow_url"] = url
    ctx.artifacts.summary(summary_markdown(summary, ctx.strategy.name, url))
    return summary


__all__ = ["federated_mnist", "make_session", "run_training", "FedError"]
