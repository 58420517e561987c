"""`up`, `down` and `status` of the whole stack: PostgreSQL, then the Prefect and MLflow servers.

`up` does only what is missing (a second `up` starts nothing and says so), waits on each
server's health endpoint, and records every pid; `down` stops, in reverse order, only processes
whose recorded pid still runs the command `up` started there; `status` reads the same records.
"""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass, replace
from typing import Any

from . import postgres, services
from .layout import (
    HOST,
    Ports,
    StackError,
    StackLayout,
    StackState,
    db_password,
    load_state,
    save_state,
)

HEALTH_TIMEOUT = 240.0  # seconds: the first start migrates both databases on a shared machine


@dataclass(frozen=True)
class Part:
    """One running (or not) part of the stack, as `status` shows it."""

    name: str
    pid: int | None
    url: str
    healthy: bool


def client_env(state: StackState) -> dict[str, str]:
    """What clients (`prefect deploy`, a worker, `fedmnist run`) export to use the stack."""
    return {
        "PREFECT_API_URL": f"http://{HOST}:{state.ports.prefect}/api",
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{state.ports.mlflow}",
    }


def _services(layout: StackLayout, state: StackState) -> list[services.Service]:
    password = db_password(layout)
    port = state.ports.postgres
    return [
        services.prefect_service(
            layout,
            state.ports.prefect,
            postgres.database_url("asyncpg", state.db_user, password, port, "prefect"),
        ),
        services.mlflow_service(
            layout,
            state.ports.mlflow,
            postgres.database_url("psycopg", state.db_user, password, port, "mlflow"),
        ),
    ]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # as the servers bind: a closed connection's TIME_WAIT does not make the port taken
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _require_free(name: str, port: int) -> None:
    if not _port_free(port):
        raise StackError(
            f"{HOST}:{port} (the {name} port) is taken by another program; pick another with "
            f"`fedmnist stack up --{name}-port N`"
        )


def _state_for(layout: StackLayout, ports: Ports | None, db_user: str) -> StackState:
    state = load_state(layout)
    if state is None:
        return StackState(ports or Ports(), db_user)
    if ports is not None and ports != state.ports:
        if any(p.pid for p in status(layout)):
            raise StackError(
                f"the stack in {layout.root} runs on {state.ports}; `fedmnist stack down` "
                "before changing its ports"
            )
        return replace(state, ports=ports)
    return state


def up(layout: StackLayout, ports: Ports | None = None) -> list[str]:
    """Start what is not running; returns one line per part (started, or already running).

    Raises:
        StackError: PostgreSQL is missing, a port is taken, or a server did not become healthy.
    """
    bin_dir = postgres.require_bin_dir()
    missing = [m for m in ("asyncpg", "psycopg") if importlib.util.find_spec(m) is None]
    if missing:
        raise StackError(
            f"the servers' PostgreSQL drivers {missing} are not installed: "
            "pip install -e '.[stack]' (or `make setup`)"
        )
    who = postgres.owner()
    layout.create()
    state = _state_for(layout, ports, who.name)
    save_state(layout, state)
    lines = []
    if postgres.init_cluster(layout, who, bin_dir, db_password(layout)):
        lines.append(f"postgres: cluster created in {layout.pg_data} (owner {who.name})")
    pg_pid = postgres.running_pid(layout)
    if pg_pid is None:
        _require_free("postgres", state.ports.postgres)
        pg_pid = postgres.start(layout, who, bin_dir, state.ports.postgres)
        lines.append(f"postgres: started, pid {pg_pid}, {HOST}:{state.ports.postgres}")
    else:
        lines.append(f"postgres: already running, pid {pg_pid}")
    postgres.ensure_databases(layout, who, bin_dir, state.ports.postgres)
    started: list[tuple[services.Service, int]] = []
    for service in _services(layout, state):
        pid = services.running_pid(layout, service)
        if pid is None:
            _require_free(service.name, service.port)
            started.append((service, services.start(layout, service)))
        else:
            services.wait_healthy(layout, service, pid, HEALTH_TIMEOUT)
            lines.append(f"{service.name}: already running, pid {pid}, {service.url}")
    for service, pid in started:  # both start at once; wait for each in turn
        services.wait_healthy(layout, service, pid, HEALTH_TIMEOUT)
        lines.append(f"{service.name}: started, pid {pid}, {service.url}")
    return lines


def down(layout: StackLayout) -> list[str]:
    """Stop what `up` started (servers first, then PostgreSQL); one line per part."""
    state = load_state(layout)
    if state is None:
        return [f"no stack in {layout.root}"]
    lines = []
    for service in reversed(_services(layout, state)):
        stopped = services.stop(layout, service)
        lines.append(f"{service.name}: {'stopped' if stopped else 'not running'}")
    bin_dir = postgres.find_bin_dir()
    stopped = bin_dir is not None and postgres.stop(layout, postgres.owner(), bin_dir)
    lines.append(f"postgres: {'stopped' if stopped else 'not running'}")
    return lines


def status(layout: StackLayout) -> list[Part]:
    """Each part with its pid (None: not running), its address and whether it answers."""
    state = load_state(layout)
    if state is None:
        return []
    pg_pid = postgres.running_pid(layout)
    parts = [Part("postgres", pg_pid, f"{HOST}:{state.ports.postgres}", pg_pid is not None)]
    for service in _services(layout, state):
        pid = services.running_pid(layout, service)
        healthy = pid is not None and services.is_healthy(service.url)
        parts.append(Part(service.name, pid, service.url, healthy))
    return parts


def status_dict(layout: StackLayout) -> dict[str, Any]:
    """`status` as JSON-ready data, with the client environment."""
    state = load_state(layout)
    return {
        "root": str(layout.root),
        "parts": {
            p.name: {"pid": p.pid, "url": p.url, "healthy": p.healthy} for p in status(layout)
        },
        "env": client_env(state) if state else {},
    }
