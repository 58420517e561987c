"""One Prefect home: every `fedmnist run` ends up in the history of the project's Prefect server.

With no server running, `fedmnist run` starts Prefect's temporary server on the PREFECT_HOME (the
SQLite database) of `fedmnist server`, so a `fedmnist server` started afterwards shows that run;
with that server running, the next `fedmnist run` talks to it and says so. Both read back through
Prefect's own client, in a fresh interpreter pointed at the started server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from waiting import wait_until

from flows.server import is_healthy

pytestmark = pytest.mark.slow

BIN = ROOT / ".venv" / "bin"

READ_RUNS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs()
        flows = {f.id: f.name for f in await client.read_flows()}
        print(json.dumps([
            {"id": str(r.id), "flow": flows.get(r.flow_id), "state": r.state_type.value}
            for r in runs
        ]))

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"  # a loaded machine
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


def _run(home: Path, mnist_dir: Path, out: Path) -> tuple[str, str]:
    """A one-round smoke training; returns its output and its flow run id."""
    summary = out.with_suffix(".json")
    proc = subprocess.run(
        [str(BIN / "fedmnist"), "run", "configs/smoke.yaml", "--rounds", "1"]
        + ["--set", "tracking.enabled=false", "--set", f"data_dir={mnist_dir}"]
        + ["--summary-json", str(summary)],
        cwd=ROOT,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(json.loads(summary.read_text())["checkpoint_dir"])
    return proc.stdout, run_dir.name


def _flow_runs(api: str) -> list[dict[str, str]]:
    env = dict(os.environ, PREFECT_API_URL=api)
    env.pop("PREFECT_HOME", None)
    proc = subprocess.run(
        [str(BIN / "python"), "-c", READ_RUNS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_runs_land_in_the_servers_history(tmp_path: Path, mnist_dir: Path) -> None:
    home = tmp_path / "home"
    stdout, first_dir = _run(home, mnist_dir, tmp_path / "first.txt")
    assert "Prefect: no server running; a temporary one on" in stdout
    assert str(home / "prefect-server") in stdout
    assert (home / "prefect-server" / "prefect.db").is_file()

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "fedmnist"), "server", "--port", str(port)],
        cwd=ROOT,
        env=_env(home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: is_healthy(api),
            180,
            "fedmnist server healthy",
            lambda: (tmp_path / "server.log").read_text()[-3000:],
        )
        runs = _flow_runs(api)
        done = [r for r in runs if r["flow"] == "federated-mnist" and r["state"] == "COMPLETED"]
        assert len(done) == 1, runs
        assert done[0]["id"][:8] in first_dir  # the run folder is named by the flow run

        stdout, second_dir = _run(home, mnist_dir, tmp_path / "second.txt")
        assert f"Prefect: the running fedmnist server at {api}; this run shows in its UI" in stdout
        assert "Starting temporary server" not in stdout
        runs = _flow_runs(api)
        ids = {r["id"] for r in runs if r["state"] == "COMPLETED"}
        assert len(ids) == 2 and any(i[:8] in second_dir for i in ids), runs
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)
        log.close()
