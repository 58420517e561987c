"""Worker sessions from an experiment config, and local workers started before Prefect is up.

`make_session` turns one worker of the config into a (not yet started) `WorkerSession`.

`fedmnist run` knows its config before it imports Prefect and starts the temporary server
(about 10 s on a 2-core machine, imports included), and a local worker program needs seconds of
its own to import torch and load its shard. `prestarted` spawns the local workers' programs at
that moment, so the two overlap; the flow's `start-<worker>` task then gets the running session
from `make_session` (the same launch: same name, shard, data, threads, device, interpreter) and
only waits for its hello. A worker's own lines from before the flow run exists are held and
filed under its start task (tasks/worker_logs.py). A session the flow did not take (another
config, a flow that failed before its start tasks) is stopped when `prestarted` ends. SSH devices
are not started early: connecting, and its errors and retries, belong to the flow run's start
tasks. Imports no Prefect, so it runs before Prefect's import.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedcore.config import ExperimentConfig, WorkerConfig
from fedcore.errors import DataError, FedError
from fedcore.session import WorkerSession
from fedcore.transport.base import Transport, WorkerLaunch
from fedcore.transport.local import LocalTransport
from tasks.worker_logs import hold_worker_logs, release_worker_logs

_Key = tuple[WorkerLaunch, str]  # a local worker's launch and interpreter
_started: dict[_Key, WorkerSession] = {}  # prestarted, not yet taken by a flow
_lock = threading.Lock()


def make_transport(worker: WorkerConfig) -> Transport:
    """The transport a worker's config names."""
    if worker.transport == "ssh":
        from fedcore.transport.ssh import SSHTransport  # paramiko only when talking SSH

        assert worker.ssh is not None  # the config validator guarantees it
        return SSHTransport(worker.ssh, worker.name)
    return LocalTransport(worker.python)


def launch_of(cfg: ExperimentConfig, worker: WorkerConfig) -> WorkerLaunch:
    """How `worker` is started (for an SSH device, its data directory is a path on the device).

    Raises:
        DataError: a local worker's data directory does not exist.
    """
    if worker.transport == "ssh":  # the device's path; the ssh section's data_dir otherwise
        data_dir = worker.data_dir or ""
    else:
        local = cfg.data_dir_for(worker)
        if not local.is_dir():
            raise DataError(
                f"worker {worker.name}: data directory {local} does not exist; prepare MNIST "
                f"with `fedmnist data --dir {local}` or set data_dir in the config"
            )
        data_dir = str(local)
    return WorkerLaunch(
        worker.name,
        data_dir,
        worker.shard(),
        worker.threads,
        worker.device,
        worker.slowdown,
        worker.step_seconds,
    )


def make_session(cfg: ExperimentConfig, worker: WorkerConfig) -> WorkerSession:
    """A session with `worker`: the one `prestarted` started for the same launch, else a new,
    not yet started one.

    Raises:
        DataError: a local worker's data directory does not exist.
    """
    launch = launch_of(cfg, worker)
    transport = make_transport(worker)
    if isinstance(transport, LocalTransport):
        with _lock:
            session = _started.pop((launch, transport.python), None)
        if session is not None:
            return session
    return WorkerSession(launch, transport)


@contextmanager
def prestarted(cfg: ExperimentConfig | None) -> Iterator[list[str]]:
    """Start `cfg`'s local worker programs now (none without a config), for the flow run inside
    the block to take (`make_session`); yields their names. A worker that cannot start here is
    left to its start task, which reports why. Sessions not taken are stopped when the block
    ends."""
    mine = _start_local_workers(cfg) if cfg is not None else []
    try:
        yield [key[0].name for key in mine]
    finally:
        with _lock:
            left = [_started.pop(key) for key in mine if key in _started]
        for session in left:
            session.close(wait=False)
            release_worker_logs(session.name)


def _start_local_workers(cfg: ExperimentConfig) -> list[_Key]:
    """Spawn the local workers' programs, each registered for `make_session` to take."""
    keys: list[_Key] = []
    for worker in cfg.workers:
        if worker.transport != "local":
            continue
        try:
            session = make_session(cfg, worker)
            hold_worker_logs(worker.name)
            session.start()
        except FedError:
            release_worker_logs(worker.name)
            continue
        key = (session.launch, LocalTransport(worker.python).python)
        with _lock:
            _started[key] = session
        keys.append(key)
    return keys


__all__ = ["launch_of", "make_session", "make_transport", "prestarted"]
