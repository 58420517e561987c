"""Tasks that talk to worker programs: start, train one round, evaluate.

Each task wraps one `fedcore.session.WorkerSession` call. Sessions and tensors are passed by
reference, never hashed or persisted (`NO_CACHE`, `persist_result=False`): hashing a state dict
for a cache key costs as much as the call it would save. A task is retried exactly when its error
says it is transient (`FedError.transient`): a worker that dropped is restarted and asked again;
a worker that ran past its deadline, a rejected update or a worker's own error is not retried.

A worker program's own log lines (its stderr, or its SSH channel's) arrive on a transport's reader
thread as records of `fedcore.worker.<name>`. That thread has no Prefect run context, so Prefect's
API handler would drop them; `start_worker` stamps them with the flow run, so they show in the
flow run's logs next to the coordinator's, and every task that talks to the worker
(`start-<w>`, `train-<w>-rNN`, `evaluate-rNN`) makes itself the task run the worker's next lines
belong to (Prefect's handler files a record carrying `task_run_id` under that task run), so
`train-alice-r07`'s page shows what alice said while training round 7. The stamp moves at the
next task, not when a task ends: a worker's last line of a round (written just before its reply)
may reach the reader thread after the reply has ended the task, and belongs to it all the same.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar, cast

import torch
from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import flow_run, task_run

from fedcore.errors import FedError
from fedcore.evaluation import EvalResult
from fedcore.protocol import Hello, TrainRequest, Update
from fedcore.session import WorkerSession
from tasks.worker_logs import release_worker_logs, worker_logger


def is_transient(task: Task[..., Any], task_run: TaskRun | None, state: State) -> bool:
    """Prefect's retry condition: retry when the task's error is a transient `FedError`.

    Args:
        task, task_run: the task and its run (unused; Prefect passes them).
        state: the failed state; its result is the raised exception.

    Returns:
        True for `WorkerUnreachable` (the session restarts the program); False for everything
        else, `WorkerTimeout` included (the round's deadline has passed).
    """
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, FedError) and exc.transient


class FlowRunStamp(logging.Filter):
    """Attach a flow run id, and the worker's current task run id when it has one, to records
    that carry none (Prefect's API handler files a record under them)."""

    def __init__(self, flow_run_id: str) -> None:
        super().__init__()
        self.flow_run_id = flow_run_id
        # The task run now talking to the worker (`stamp_task_run`); replaced, never cleared.
        self.task_run_id: uuid.UUID | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "flow_run_id", None):
            record.flow_run_id = self.flow_run_id
            if self.task_run_id is not None and not getattr(record, "task_run_id", None):
                record.task_run_id = self.task_run_id
        return True


def stamp_task_run(worker: str) -> None:
    """Make the current task run the one `worker`'s log lines belong to from now on (until the
    next task talking to it); outside a task run, or before `forward_worker_logs`, nothing."""
    stamp_worker_logs(worker, task_run.get_id())


def stamp_worker_logs(worker: str, run_id: Any) -> None:
    """`stamp_task_run` for task run `run_id`, from any thread (None: nothing)."""
    if not run_id:
        return
    logger = worker_logger(worker)
    for stamp in [f for f in logger.filters if isinstance(f, FlowRunStamp)]:
        stamp.task_run_id = uuid.UUID(str(run_id))


def forward_worker_logs(worker: str) -> None:
    """Send `fedcore.worker.<worker>` records (INFO and up) to the current flow run's logs,
    the lines held while the worker started before the flow run (tasks/worker_logs.py) first."""
    logger = worker_logger(worker)
    for old in [f for f in logger.filters if isinstance(f, FlowRunStamp)]:
        logger.removeFilter(old)  # a previous flow run in this process
    run_id = flow_run.get_id()
    if run_id:
        logger.addFilter(FlowRunStamp(str(run_id)))
    parent = logging.getLogger("fedcore.worker")
    if parent.getEffectiveLevel() > logging.INFO:
        parent.setLevel(logging.INFO)  # Prefect leaves extra loggers at the root's WARNING
    stamp_task_run(worker)  # inside `start-<worker>`: the held lines are its lines
    for record in release_worker_logs(worker):
        logger.handle(record)  # through the stamp above: filed under this run


@task(
    name="start-worker",
    task_run_name="start-{session.name}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=is_transient,
)
def start_worker(session: WorkerSession, timeout: float) -> Hello:
    """Start a worker program (unless `fedmnist run` started it already: flows/launch.py) and
    wait for its hello (what it holds, what it runs on)."""
    forward_worker_logs(session.name)  # makes this task the one its lines belong to
    session.start()
    return session.hello(timeout)


P = ParamSpec("P")
R = TypeVar("R")


def train_task(fn: Callable[P, R]) -> Task[P, R]:
    """A worker's `train-<worker>-rNN` task: its name in the UI, no cache, no persisted result,
    retried twice (after 2 s and 5 s) when its error is transient."""
    return task(
        name="train",
        task_run_name="train-{worker}-r{round:02d}",
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=2,
        retry_delay_seconds=[2, 5],
        retry_condition_fn=is_transient,
    )(fn)


@train_task
def train_answering(
    session: WorkerSession,
    worker: str,
    round: int,
    request: TrainRequest,
    timeout: float,
    answer: Future[Update],
) -> None:
    """One round of local training on `worker`; its validated update put in `answer`, not
    returned.

    A returned update stays in Prefect's state of the task run, and Prefect's future and its
    thread's future refer to each other (a done callback): after the flow has let go of the
    future, a worker's whole model waits for Python's cycle collector, and between full
    collections the coordinator's memory grows by about a model per worker-round. Answered
    into a plain future, it is freed as soon as the flow has taken it and let the future go.
    An error is raised (the task's retries, then the task run failed); the caller puts the
    final one in the answer (flows/rounds.py)."""
    stamp_task_run(worker)
    answer.set_result(session.train(request, timeout))


@task(
    name="train-fleet",
    task_run_name="train-r{round:02d}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def train_fleet(
    round: int,
    calls: Mapping[str, tuple[WorkerSession, TrainRequest]],
    timeout: float,
    answers: Mapping[str, Callable[[], Future[Update] | None]],
) -> None:
    """One round of local training on every worker of a large fleet, as one task run.

    A task run per worker per round costs the coordinator and the Prefect server more than a
    small worker-round itself (its states, events and log lines), and tens of them a round are
    more than a person reads in the UI; so past `tracking.worker_tasks_up_to` trainers a round
    trains in this one task (flows/rounds.py). Each worker's validated update, or its error,
    goes to its future (`answers` holds weak references: the flow owns the futures and lets
    each go once it has folded its update) the moment it is in, so the flow folds updates as
    they arrive; its log lines are this task run's. A transient failure (`FedError.transient`) is
    tried again as `train_answering`'s retries do: twice, after 2 s and 5 s.
    """
    run_id = task_run.get_id()
    with ThreadPoolExecutor(len(calls), thread_name_prefix=f"train-r{round:02d}") as pool:
        for name, (session, request) in calls.items():
            pool.submit(_train_into, answers[name], session, request, timeout, run_id)


def _train_into(
    answer: Callable[[], Future[Update] | None],
    session: WorkerSession,
    request: TrainRequest,
    timeout: float,
    run_id: Any,
) -> None:
    """`session.train`, its update or its last error put in `answer()` (see `train_fleet`)."""
    stamp_worker_logs(session.name, run_id)
    delays = [2.0, 5.0]
    while True:
        try:
            _settle(answer, session.train(request, timeout))
            return
        except FedError as exc:
            if exc.transient and delays:
                worker_logger(session.name).warning(  # stamped: this task run's line
                    "%s; asking it again in %g s", exc, delays[0]
                )
                time.sleep(delays.pop(0))
                continue
            _settle(answer, error=exc)
            return
        except BaseException as exc:  # noqa: BLE001 - the flow reports it as this worker's failure
            _settle(answer, error=exc)
            return


def _settle(
    answer: Callable[[], Future[Update] | None],
    update: Update | None = None,
    error: BaseException | None = None,
) -> None:
    """Put `update` (or `error`) in the future `answer` refers to, if the flow still holds it."""
    future = answer()
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(cast(Update, update))


@task(
    name="evaluate",
    task_run_name="evaluate-r{round:02d}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=is_transient,
)
def evaluate_models(
    session: WorkerSession,
    round: int,
    models: Mapping[str, Mapping[str, torch.Tensor]],
    groups: Sequence[Sequence[int]],
    timeout: float,
) -> dict[str, EvalResult]:
    """Score every named model on the evaluator's test set."""
    stamp_task_run(session.name)
    results = session.evaluate(round, models, groups, timeout)
    get_run_logger().debug("round %d: evaluated %s", round, ", ".join(results))
    return results


@task(name="stop-workers", cache_policy=NO_CACHE, persist_result=False)
def stop_workers(sessions: Sequence[WorkerSession]) -> None:
    """Say bye to every worker program, all at once (each bye is a round trip, seconds over
    SSH). A program that answered bye exits by itself: its exit (a torch process takes a second
    or more to end) is waited for on a thread of its own, never by the training."""
    if len(sessions) <= 1:
        for s in sessions:
            s.close(wait=False)
        return
    with ThreadPoolExecutor(len(sessions), thread_name_prefix="stop-worker") as pool:
        list(pool.map(lambda s: s.close(wait=False), sessions))
