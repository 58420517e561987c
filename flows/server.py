"""The Prefect server of this project: where it keeps its state, how it starts, how clients find it.

`fedmnist server` runs `prefect server start` on 127.0.0.1:4200 with its own PREFECT_HOME
(`$FEDMNIST_HOME/prefect-server`: a SQLite database, unless PREFECT_SERVER_DATABASE_CONNECTION_URL
names PostgreSQL) and telemetry off (offline it only logs errors, on every start). One long-lived
server is what deployments, schedules and the UI need; the temporary server a bare `fedmnist run`
starts lives only as long as that run. Clients (`fedmnist serve`, `prefect deployment run`) find
it through PREFECT_API_URL, which `fedmnist server` prints.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from fedcore.config import fedmnist_home

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200


def api_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """The PREFECT_API_URL of a server listening on host:port."""
    return f"http://{host}:{port}/api"


def server_home() -> Path:
    """The server's PREFECT_HOME (its SQLite database and settings)."""
    return fedmnist_home() / "prefect-server"


def server_command(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, home: Path | None = None
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start the project's Prefect server in the foreground."""
    home = home or server_home()
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(home)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.pop("PREFECT_API_URL", None)  # the server is the API; a client setting only confuses it
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    return argv, env


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether the Prefect API at `url` (…/api) answers its health check."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(url: str, timeout: float = 120.0, interval: float = 0.5) -> bool:
    """Poll the health check until it answers or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(url):
            return True
        time.sleep(interval)
    return False
