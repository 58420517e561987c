"""Where the stack lives under `$FEDMNIST_HOME/stack/`, which ports it uses, and its one secret.

    stack/
      stack.json            ports and database user, written by the first `up`
      db-password           the database password (mode 600, read by `up` only)
      postgres/             owned by the database's user: data/, socket/, postgres.log
      prefect/              the Prefect server's PREFECT_HOME
      mlflow-artifacts/     the MLflow server's artifact store (only the server writes it)
      logs/                 prefect.log, mlflow.log
      pids/                 postgres.pid, prefect.pid, mlflow.pid

Ports are chosen once (flags or defaults) and recorded, so `status`, `down` and a second `up`
find the same servers; a later `up` with other ports is refused while the stack runs. Every
listener binds 127.0.0.1 only: the stack is one host's, like `fedmnist server`.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from fedcore.config import fedmnist_home
from fedcore.errors import FedError

HOST = "127.0.0.1"
DEFAULT_PORTS = {"postgres": 55432, "prefect": 4300, "mlflow": 5300}  # also in stack/cli.py


class StackError(FedError):
    """The stack could not be started, stopped or read (the message names the part and the fix)."""


@dataclass(frozen=True)
class Ports:
    postgres: int = DEFAULT_PORTS["postgres"]
    prefect: int = DEFAULT_PORTS["prefect"]
    mlflow: int = DEFAULT_PORTS["mlflow"]

    def __post_init__(self) -> None:
        for name, port in asdict(self).items():
            if not 1024 <= port <= 65535:
                raise StackError(f"{name} port {port} is outside 1024-65535; pick another")
        if len(set(asdict(self).values())) != 3:
            raise StackError(f"the three ports must differ, got {asdict(self)}")


@dataclass(frozen=True)
class StackLayout:
    """The paths of one stack (all under `root`)."""

    root: Path

    @classmethod
    def default(cls) -> StackLayout:
        return cls(fedmnist_home() / "stack")

    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def password_file(self) -> Path:
        return self.root / "db-password"

    @property
    def pg_dir(self) -> Path:
        return self.root / "postgres"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_socket(self) -> Path:
        return self.pg_dir / "socket"

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "postgres.log"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlflow-artifacts"

    def log(self, service: str) -> Path:
        return self.root / "logs" / f"{service}.log"

    def pid_file(self, service: str) -> Path:
        return self.root / "pids" / f"{service}.pid"

    def create(self) -> None:
        """The folders the current user writes (postgres/ is made by `postgres.init_cluster`)."""
        for folder in (self.root, self.root / "logs", self.root / "pids", self.prefect_home):
            folder.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.artifacts.mkdir(parents=True, exist_ok=True, mode=0o700)


@dataclass(frozen=True)
class StackState:
    """What the first `up` chose: the ports and the database user."""

    ports: Ports
    db_user: str


def load_state(layout: StackLayout) -> StackState | None:
    """The recorded state, or None before the first `up`.

    Raises:
        StackError: stack.json is unreadable or malformed (named, with the fix).
    """
    if not layout.state_file.is_file():
        return None
    try:
        raw = json.loads(layout.state_file.read_text())
        return StackState(Ports(**raw["ports"]), str(raw["db_user"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StackError(
            f"{layout.state_file} is unreadable ({exc}); stop what runs with `fedmnist stack "
            "down` if you can, then remove the file (the next `up` writes it again)"
        ) from None


def save_state(layout: StackLayout, state: StackState) -> None:
    data = {"ports": asdict(state.ports), "db_user": state.db_user}
    layout.state_file.write_text(json.dumps(data, indent=2) + "\n")


def db_password(layout: StackLayout) -> str:
    """The database password, made on first use (URL-safe, so it needs no quoting in a URL)."""
    path = layout.password_file
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()
