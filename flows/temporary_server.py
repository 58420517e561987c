"""Ending Prefect's temporary server as soon as the run is recorded, not seconds later.

A bare `fedmnist run` (no server answering) starts Prefect's temporary server, and Prefect stops
it when the process exits: SIGTERM, then it waits up to 5 s and kills it. Here the server never
finished its own shutdown in those 5 s (it ends its background services after their current
poll; one asked to stop was still running 30 s later), so every run ended with 5 s of waiting and
a kill. `release_temporary_server` does the same kill without the wait, once nothing of the run
is left to record: it sends the log lines and events this process still queues, waits until the
server shows every task run of the flow run in a final state (task-run states arrive as events
and are written by the server a moment later), then stops the server (SIGTERM, and SIGKILL
after `grace` seconds). The database is SQLite: a transaction is written whole or not at all.
Outside `fedmnist run` (a deployment, a test calling the flow) Prefect's own exit hook applies.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from typing import Any

from prefect.logging import get_logger

log = get_logger()  # the "prefect" logger, which says "Starting temporary server" too


def temporary_servers() -> list[Any]:
    """This process's running temporary Prefect servers (none on a Prefect without them)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        return []
    instances = getattr(SubprocessASGIServer, "_instances", {})
    return [
        s
        for s in list(instances.values())
        if getattr(s, "server_process", None) is not None and s.server_process.poll() is None
    ]


def send_pending_records(timeout: float = 5.0) -> None:
    """Send the log lines and events this process still queues to the server (what Prefect's
    exit hooks would send), so nothing is lost when the server stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def unrecorded_task_runs(flow_run_id: uuid.UUID) -> int:
    """How many task runs of the flow run the server does not show in a final state yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return sum(1 for r in runs if r.state is None or not r.state.is_final())


def release_temporary_server(
    flow_run_id: uuid.UUID | None, timeout: float = 5.0, grace: float = 0.2
) -> bool:
    """Stop this process's temporary Prefect server once flow run `flow_run_id` is recorded
    (at most `timeout` seconds of waiting; see the module's docstring); returns whether there
    was one to stop."""
    servers = temporary_servers()
    if not servers:
        return False
    send_pending_records(timeout)
    deadline = time.monotonic() + timeout
    if flow_run_id is not None:
        while time.monotonic() < deadline:
            try:
                if unrecorded_task_runs(flow_run_id) == 0:
                    break
            except Exception:  # noqa: BLE001 - the server cannot tell: stop it as Prefect would
                break
            time.sleep(0.1)
    for server in servers:
        proc = server.server_process
        log.info("Stopping temporary server on %s", server.address)
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server.server_process = None  # Prefect's exit hook has nothing left to wait for
    return True
