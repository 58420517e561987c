"""The real stack for tests/stack: `fedmnist stack up` in a fresh FEDMNIST_HOME on free ports,
and `fedmnist stack down` at the end, pass or fail (then the folder goes).

The home lies in a folder other users may enter (as root, PostgreSQL runs as `fedmnist-pg`, which
must reach its data folder; pytest's own temporary folders are closed to others). Skipped, with
the reason, only where PostgreSQL's server binaries are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Stack:
    home: Path  # FEDMNIST_HOME of the stack and of every client the tests start
    env: dict[str, str]  # clients' environment: PREFECT_API_URL and MLFLOW_TRACKING_URI set
    ports: dict[str, int]
    first_up: str  # what the first `fedmnist stack up` printed

    @property
    def prefect_api(self) -> str:
        return self.env["PREFECT_API_URL"]

    @property
    def mlflow_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    def run(self, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """A command of the venv (`fedmnist`, `prefect`) in the checkout, as a client."""
        return subprocess.run(
            [str(BIN / argv[0]), *argv[1:]],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        done = self.run("fedmnist", "stack", "status", "--json")
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))


@contextmanager
def running_stack(mnist_dir: Path) -> Iterator[Stack]:
    """A stack up for the `with` block, its clients' data folder pointing at `mnist_dir`."""
    from flows.stack.postgres import BIN_GLOB, find_bin_dir

    if find_bin_dir() is None:
        pytest.skip(
            f"PostgreSQL's server (initdb, pg_ctl) is not installed in {BIN_GLOB} nor on "
            "PATH: `make system-deps` installs it"
        )
    home = Path(tempfile.mkdtemp(prefix="fedmnist-stack-"))
    home.chmod(0o711)
    (home / "data").mkdir()
    (home / "data" / "mnist").symlink_to(mnist_dir)
    ports = dict(zip(("postgres", "prefect", "mlflow"), free_ports(3), strict=True))
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_HOME=str(home / "client-prefect"))
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        env.pop(key, None)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    stack = Stack(home, env, ports, "")
    try:
        up = stack.run("fedmnist", "stack", "up", *(f"--{k}-port={v}" for k, v in ports.items()))
        assert up.returncode == 0, up.stdout + up.stderr
        stack.first_up = up.stdout
        env.update(stack.status()["env"])
        yield stack
    finally:
        down = stack.run("fedmnist", "stack", "down", timeout=300)
        print(down.stdout, down.stderr)
        shutil.rmtree(home, ignore_errors=True)
