"""The stack's two HTTP servers, the Prefect API and the MLflow tracking server, as detached
processes: started in a process group of their own with a log and a pid file, health-checked
over HTTP, and stopped by the recorded pid only when /proc still shows that server there.

The Prefect server is `fedmnist server`'s command (flows/server.py) with the stack's
PREFECT_HOME and `PREFECT_SERVER_DATABASE_CONNECTION_URL` naming PostgreSQL (asyncpg). The MLflow
server keeps runs, metrics and the model registry in PostgreSQL (psycopg) and serves artifacts
itself (`--serve-artifacts --artifacts-destination`): clients log to `mlflow-artifacts:/` URIs
over HTTP and never write the artifact folder. Database URLs travel in the environment, never on
a command line that `ps` shows to every user.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedlab.procs import cmdline, descendants, kill, proc_alive, wait_gone
from flows.server import is_healthy, server_command

from .layout import HOST, StackError, StackLayout

SERVICES = ("prefect", "mlflow")
STOP_GRACE = 20.0  # seconds between SIGTERM and SIGKILL


@dataclass(frozen=True)
class Service:
    """How to start one server and how to recognise it."""

    name: str
    port: int
    argv: list[str]
    env: dict[str, str]
    url: str  # its base URL; <url>/health answers 200 when it is ready (flows/server.py)


def prefect_service(layout: StackLayout, port: int, db_url: str) -> Service:
    argv, env = server_command(HOST, port, layout.prefect_home)
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = db_url
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # an older alias would win over ours
    return Service("prefect", port, argv, env, f"http://{HOST}:{port}/api")


def mlflow_service(layout: StackLayout, port: int, db_url: str) -> Service:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MLFLOW_BACKEND_STORE_URI"] = db_url  # --backend-store-uri's variable: kept off `ps`
    # MLflow's GenAI job runner (eight huey consumer processes) serves nothing this project logs
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--serve-artifacts",
        "--artifacts-destination",
        str(layout.artifacts),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return Service("mlflow", port, argv, env, f"http://{HOST}:{port}")


def recorded_pid(layout: StackLayout, name: str) -> int | None:
    try:
        return int(layout.pid_file(name).read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(layout: StackLayout, service: Service) -> int | None:
    """The recorded pid when it still runs this service (command line checked: pids are reused)."""
    pid = recorded_pid(layout, service.name)
    if pid is None or not proc_alive(pid):
        return None
    return pid if cmdline(pid).strip() == " ".join(service.argv) else None


def start(layout: StackLayout, service: Service) -> int:
    """Start `service` detached (its own session and process group), record its pid."""
    log = layout.log(service.name)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            service.argv,
            cwd=layout.root,
            env=service.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    layout.pid_file(service.name).write_text(f"{proc.pid}\n")
    return proc.pid


def wait_healthy(layout: StackLayout, service: Service, pid: int, timeout: float) -> None:
    """Wait until the health endpoint answers.

    Raises:
        StackError: the server exited or did not answer within `timeout` (log tail included).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(service.url):
            return
        if not proc_alive(pid):
            raise StackError(
                f"the {service.name} server exited:\n{_tail(layout.log(service.name))}"
            )
        time.sleep(0.5)
    raise StackError(
        f"the {service.name} server did not answer {service.url}/health within {timeout:.0f} s "
        f"(still starting on a busy machine? run `fedmnist stack up` again):\n"
        f"{_tail(layout.log(service.name))}"
    )


def stop(layout: StackLayout, service: Service) -> bool:
    """Stop the recorded server and every process of its group; True when it was running."""
    pid = running_pid(layout, service)
    layout_pid = layout.pid_file(service.name)
    if pid is None:
        layout_pid.unlink(missing_ok=True)
        return False
    group = [pid, *descendants(pid)]
    try:
        os.killpg(pid, signal.SIGTERM)  # its own group (start_new_session): pgid == pid
    except ProcessLookupError:
        pass
    left = wait_gone(group, STOP_GRACE)
    if left:
        kill(left, signal.SIGKILL)
        left = wait_gone(left, 5.0)
    if left:
        raise StackError(f"the {service.name} server's processes {left} did not stop")
    layout_pid.unlink(missing_ok=True)
    return True


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"
