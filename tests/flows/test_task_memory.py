"""A worker's update is freed once the flow has taken it, round after round, when every worker
has its own `train-<worker>-rNN` task run (flows/rounds.py `submit_worker_training`).

Returned by the task, an update stays in Prefect's state of the run, which its future and its
thread's future keep in a reference cycle: only the cycle collector frees it, and between two
full collections the coordinator kept about a model per worker-round. Answered into a future
the flow pops, it is freed when the flow lets go of it. Real worker programs, a real Prefect
flow; the cycle collector is off while the rounds run, so what is freed is freed by reference
counts alone."""

from __future__ import annotations

import gc
from pathlib import Path

from conftest import ROOT
from prefect import flow
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from fedcore.config import load_config
from fedcore.model import initial_weights
from fedcore.protocol import TrainRequest, Update
from fedcore.session import WorkerSession
from flows.launch import make_session
from flows.rounds import submit_worker_training, task_outcome
from tasks.workers import train_task

ROUNDS = 8


@train_task
def train_returning(
    session: WorkerSession, worker: str, round: int, request: TrainRequest, timeout: float
) -> Update:
    """The former way: the train task returns the worker's update."""
    return session.train(request, timeout)


def live_updates() -> int:
    """Update objects still holding a model (the cycle collector's garbage included)."""
    return sum(1 for o in gc.get_objects() if type(o) is Update and o.weights)


@flow(name="task-memory")
def train_rounds(sessions: dict[str, WorkerSession], returned: bool) -> list[int]:
    """ROUNDS rounds of every worker, each update taken and let go; the live updates after
    each round. `returned`: the tasks return their updates (the former way)."""
    weights = initial_weights(1)
    plan = load_config(ROOT / "configs" / "smoke.yaml").plan(1)
    alive: list[int] = []
    for rnd in range(1, ROUNDS + 1):
        requests = {name: TrainRequest(rnd, plan, 7, weights) for name in sessions}
        if returned:
            futures = {
                name: train_returning.submit(sessions[name], name, rnd, request, 120.0)
                for name, request in requests.items()
            }
        else:
            futures = submit_worker_training(sessions, rnd, requests, 120.0)
        for name in list(futures):
            got = task_outcome(rnd, name, futures.pop(name))
            assert isinstance(got, Update) and got.metrics.steps == 2, got
            del got
        del futures, requests
        alive.append(live_updates())
    return alive


def test_taken_updates_are_freed_every_round(mnist_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "smoke.yaml", {"data_dir": str(mnist_dir)})
    sessions = {w.name: make_session(cfg, w) for w in cfg.trainers}
    gc.collect()
    gc.disable()
    try:
        for s in sessions.values():
            s.start()
            s.hello(120)
        with temporary_settings(
            # a temporary Prefect server of this test's own; 300 s: a loaded machine
            updates={PREFECT_HOME: tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 300},
            restore_defaults={PREFECT_API_URL},
        ):
            answered = train_rounds(sessions, returned=False)
            returned = train_rounds(sessions, returned=True)
    finally:
        gc.enable()
        for s in sessions.values():
            s.close()
    # answered: rounds leave no updates behind; at most a round's own (3), whose task runs
    # may still be ending on Prefect's threads when the flow has taken them, in round 8 as
    # in round 3
    assert max(answered[2:]) <= 3, (answered, returned)
    # returned (the cause): each of the three workers' updates of every round stays
    assert returned[7] - returned[2] == 3 * 5, (answered, returned)
