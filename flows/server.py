"""The Prefect server of this project: where it keeps its state, how it starts, how clients find it.

`fedmnist server` runs `prefect server start` on 127.0.0.1:4200 with its own PREFECT_HOME
(`$FEDMNIST_HOME/prefect-server`: a SQLite database, unless PREFECT_SERVER_DATABASE_CONNECTION_URL
names PostgreSQL) and telemetry off (offline it only logs errors, on every start). One long-lived
server is what deployments, schedules and the UI need; the temporary server a bare `fedmnist run`
starts lives only as long as that run. Clients (`fedmnist serve`, `prefect deployment run`) find
it through PREFECT_API_URL, which `fedmnist server` prints.

One Prefect home (`prefect_home_for_run`): `fedmnist run` talks to the project's server when one
answers (the stack's, at the port recorded in stack/stack.json, else the one `fedmnist server`
recorded in its home's server.json), and otherwise starts Prefect's temporary server on the same
PREFECT_HOME, hence the same SQLite database, as `fedmnist server`: every run is in that server's
UI history afterwards. A PREFECT_API_URL or PREFECT_HOME the operator set is used as given.
"""

from __future__ import annotations

import json
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


RECORD = "server.json"  # in server_home(): where the running `fedmnist server` listens


def local_url(host: str, port: int) -> str:
    """The API URL a client on this host uses for a server listening on host:port."""
    return api_url("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port)


def record_server(host: str, port: int, home: Path) -> None:
    """Note in server_home() where `fedmnist server` listens and which home it keeps (read by
    `fedmnist run`; a record left by a server that stopped is harmless: it no longer answers)."""
    folder = server_home()
    folder.mkdir(parents=True, exist_ok=True)
    data = {"api_url": local_url(host, port), "home": str(home)}
    (folder / RECORD).write_text(json.dumps(data) + "\n")


def recorded_servers() -> list[tuple[str, str]]:
    """(what, API URL) of the project's servers that may be running: the stack's Prefect server
    (its recorded port), then the one `fedmnist server` recorded. Unreadable records are skipped:
    they only mean no server is known there."""
    from flows.stack.layout import HOST, StackError, StackLayout, load_state

    found = []
    try:
        state = load_state(StackLayout.default())
    except StackError:
        state = None
    if state is not None:
        found.append(("fedmnist stack", api_url(HOST, state.ports.prefect)))
    try:
        raw = json.loads((server_home() / RECORD).read_text()[:4096])
        url = raw["api_url"]
        if isinstance(url, str) and url.startswith("http://"):
            found.append(("fedmnist server", url))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return found


def prefect_home_for_run(environ: dict[str, str] | None = None) -> str:
    """Point this process's Prefect client at the project's Prefect home (see the module's
    docstring), before Prefect is imported; returns the one line that says where runs go."""
    env = os.environ if environ is None else environ
    if env.get("PREFECT_API_URL"):
        return f"Prefect: the server at {env['PREFECT_API_URL']} (PREFECT_API_URL)"
    for what, url in recorded_servers():
        if is_healthy(url, timeout=1.0):
            env["PREFECT_API_URL"] = url
            return f"Prefect: the running {what} at {url}; this run shows in its UI"
    if env.get("PREFECT_HOME"):
        return (
            f"Prefect: a temporary server on PREFECT_HOME={env['PREFECT_HOME']} (as set); "
            "no project server is running"
        )
    home = server_home()
    home.mkdir(parents=True, exist_ok=True)
    env["PREFECT_HOME"] = str(home)
    return (
        f"Prefect: no server running; a temporary one on {home} (the database `fedmnist server` "
        "shows), so this run is in its UI history"
    )


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
