"""The Prefect way end to end: a real server, the served deployments, runs through Prefect's CLI.

Past 400 lines: every test shares one module-wide server stack, which is most of its cost.

One module-wide stack: `fedmnist server` (a real `prefect server start` on a free port, its own
PREFECT_HOME) and `fedmnist serve` (the deployments of configs/deployments.yaml), both in their own
process groups and stopped at the end even when a test fails. Runs are created with the real
`prefect deployment run ... --watch`; what they left behind is read back through the Prefect REST
API (task runs, artifacts, logs) and with MlflowClient from the run's SQLite store.

Over 400 lines on purpose: every test shares that one module-wide stack (starting it costs most of
a minute), so splitting the module would start the servers twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT
from waiting import wait_until

pytestmark = pytest.mark.slow

BIN = ROOT / ".venv" / "bin"


@dataclass
class Stack:
    api: str
    home: Path  # FEDMNIST_HOME of the served runs
    env: dict[str, str]  # for CLI clients of this server
    http: httpx.Client
    serve_log: Path

    def get(self, path: str) -> Any:
        resp = self.http.get(path)
        resp.raise_for_status()
        return resp.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        resp = self.http.post(path, json=body)
        resp.raise_for_status()
        return resp.json()

    def deployment(self, name: str) -> dict[str, Any]:
        return self.get(f"/deployments/name/federated-mnist/{name}")

    def prefect(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_deployment(self, name: str, *params: str) -> tuple[subprocess.CompletedProcess, str]:
        """`prefect deployment run federated-mnist/NAME --param ... --watch`; returns the result
        and the id of the flow run it created."""
        args = ["deployment", "run", f"federated-mnist/{name}", "--watch"]
        for p in params:
            args += ["--param", p]
        proc = self.prefect(*args)
        found = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
        assert found, proc.stdout[-3000:] + proc.stderr[-3000:] + self.serve_log.read_text()[-3000:]
        return proc, found.group(1)

    def task_runs(self, flow_run_id: str) -> dict[str, dict[str, Any]]:
        runs = self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        return {t["name"]: t for t in runs}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen | None, grace: float = 20.0) -> None:
    """SIGTERM the process group we started, then SIGKILL what is left of it."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers or flow-run children still in the group
    except ProcessLookupError:
        pass
    proc.wait(5)


def _wait_for(what: str, check, timeout: float, log: Path) -> None:
    wait_until(check, timeout, f"{what} ready", lambda: f"log:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("prefect-way")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update(
        FEDMNIST_HOME=str(base / "home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(base / "client"),
        COLUMNS="250",  # keep rich from wrapping the CLI's messages
    )
    server = serve = None
    http = httpx.Client(base_url=api, timeout=30)
    try:
        server = _start(
            [str(BIN / "fedmnist"), "server", "--port", str(port), "--home", str(base / "server")],
            env,
            base / "server.log",
        )
        from flows.server import is_healthy

        _wait_for("prefect server", lambda: is_healthy(api), 180, base / "server.log")
        client_env = dict(env, PREFECT_API_URL=api)
        serve = _start(
            [str(BIN / "fedmnist"), "serve"],
            dict(client_env, PREFECT_RUNNER_POLL_FREQUENCY="2"),  # default 10 s between polls
            base / "serve.log",
        )
        stack = Stack(api, base / "home", client_env, http, base / "serve.log")

        def served() -> bool:
            if serve.poll() is not None:
                pytest.fail(f"fedmnist serve exited:\n{stack.serve_log.read_text()[-4000:]}")
            return "polling for scheduled runs" in stack.serve_log.read_text()

        _wait_for("fedmnist serve", served, 120, base / "serve.log")
        yield stack
    finally:
        http.close()
        _stop(serve)  # first: on SIGTERM it pauses its deployments through the server
        _stop(server)


@pytest.fixture(scope="module")
def seed_run(stack: Stack, mnist_dir: Path) -> tuple[subprocess.CompletedProcess, str]:
    return stack.run_deployment("seed", "rounds=2", f"data_dir={mnist_dir}")


def test_deployments_carry_schedule_limit_and_parameters(stack: Stack) -> None:
    seed = stack.deployment("seed")
    assert seed["parameters"] == {"config_path": "configs/seed.yaml"}
    assert seed["enforce_parameter_schema"] is True
    assert seed["global_concurrency_limit"]["limit"] == 1
    assert seed["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    [schedule] = seed["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert schedule["active"] is False  # switched on by hand, never by surprise
    assert schedule["slug"] == "seed-cron"
    assert stack.deployment("lab")["parameters"] == {"config_path": "configs/lab.yaml"}
    jetsons = stack.deployment("jetsons")
    assert jetsons["parameters"] == {"config_path": "configs/jetsons.yaml"}
    assert jetsons["schedules"][0]["schedule"]["cron"] == "0 4 * * 0"
    props = set(seed["parameter_openapi_schema"]["properties"])
    typed = {
        "config_path",
        "overrides",
        "rounds",
        "strategy",
        "lr",
        "seed",
        "data_dir",
        "inventory",
        "resume",
    }
    assert props == typed


def test_cli_run_with_a_bad_parameter_is_refused_by_the_server(stack: Stack) -> None:
    seed_id = stack.deployment("seed")["id"]
    before = stack.post("/flow_runs/filter", {"deployments": {"id": {"any_": [seed_id]}}})
    proc = stack.prefect("deployment", "run", "federated-mnist/seed", "--param", "rounds=-1")
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1, out
    assert "Validation failed for field 'rounds'" in out
    assert "-1 is less than or equal to the minimum of 0" in out
    after = stack.post("/flow_runs/filter", {"deployments": {"id": {"any_": [seed_id]}}})
    assert len(after) == len(before)  # refused before a run existed


@pytest.mark.parametrize(
    ("params", "field", "reason"),
    [
        ({"rounds": 0}, "rounds", "0 is less than or equal to the minimum of 0"),
        ({"rounds": "two"}, "rounds", "'two' is not valid"),
        ({"lr": -0.1}, "lr", "-0.1 is less than or equal to the minimum of 0"),
        ({"strategy": "fedsgd"}, "strategy", "'fedsgd' is not one of ['mean', 'fedavg'"),
        ({"data_dir": ""}, "data_dir", "'' should be non-empty"),
    ],
)
def test_server_names_the_bad_field(stack: Stack, params: dict, field: str, reason: str) -> None:
    seed_id = stack.deployment("seed")["id"]
    resp = stack.http.post(f"/deployments/{seed_id}/create_flow_run", json={"parameters": params})
    assert resp.status_code == 409, resp.text
    detail = resp.json()["detail"]
    assert f"Validation failed for field '{field}'" in detail and reason in detail, detail


def _evil_script(tmp_path: Path) -> tuple[Path, Path]:
    """An executable that leaves a marker when anything runs it."""
    marker = tmp_path / "RAN"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    return script, marker


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("python", "overrides: 'workers.0.python' (= "),
        ("name", "overrides: 'name' (= '../../..') cannot be set by a flow parameter"),
        ("config_path", "is outside"),
        ("resume", "is outside"),
    ],
)
def test_a_run_cannot_choose_code_paths_or_names(
    stack: Stack, tmp_path: Path, case: str, needle: str
) -> None:
    """Through the Prefect API, anyone on the host: a worker's interpreter, a name that walks out
    of runs/, a config file or a run folder of their own. Each run fails before a worker starts,
    with the field named; the script never runs and nothing is written outside runs/."""
    script, marker = _evil_script(tmp_path)
    evil_cfg = tmp_path / "evil.yaml"
    text = (ROOT / "configs" / "smoke.yaml").read_text()
    evil_cfg.write_text(text.replace("{name: alice,", f"{{name: alice, python: {script},"))
    (tmp_path / "state.json").write_text(json.dumps({"round": 1, "config": {}}))
    params = {
        "python": [f'overrides={{"workers.0.python": "{script}"}}'],
        "name": ['overrides={"name": "../../.."}'],
        "config_path": [f"config_path={evil_cfg}"],
        "resume": [f"resume={tmp_path}"],
    }[case]
    proc, run_id = stack.run_deployment("seed", *params)
    assert proc.returncode == 1, proc.stdout[-3000:]
    run = stack.get(f"/flow_runs/{run_id}")
    assert run["state"]["type"] == "FAILED"
    message = " ".join(run["state"]["message"].split())
    assert "ConfigError" in message and needle in message, message
    assert not stack.task_runs(run_id)  # no worker started
    assert not marker.exists()
    assert not list(stack.home.parent.glob("*.safetensors"))


def test_seed_run_completes_with_the_expected_task_runs(stack: Stack, seed_run) -> None:
    proc, run_id = seed_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Flow run finished successfully in 'Completed'" in proc.stdout
    run = stack.get(f"/flow_runs/{run_id}")
    assert run["state"]["type"] == "COMPLETED"
    assert run["parameters"]["rounds"] == 2
    tasks = stack.task_runs(run_id)
    expected = {f"start-{w}" for w in ("alice", "bob", "charlie", "testing")}
    expected |= {f"train-{w}-r{r:02d}" for w in ("alice", "bob", "charlie") for r in (1, 2)}
    expected |= {"evaluate-r01", "evaluate-r02", "aggregate-r01", "aggregate-r02"}
    stops = [name for name in tasks if name.startswith("stop-workers")]
    assert set(tasks) - set(stops) == expected and len(stops) == 1
    assert all(t["state"]["type"] == "COMPLETED" for t in tasks.values())
    assert all(t["run_count"] == 1 for t in tasks.values())  # nothing needed a retry


def test_seed_run_leaves_its_artifacts(stack: Stack, seed_run) -> None:
    _, run_id = seed_run
    arts = stack.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    by_key = {a["key"]: a for a in arts}
    assert by_key["seed-progress"]["type"] == "progress"
    assert by_key["seed-progress"]["data"] == 100.0
    for rnd in ("r001", "r002"):
        table = by_key[f"seed-evaluation-{rnd}"]
        assert table["type"] == "table"
        models = [row["model"] for row in _rows(table["data"])]
        assert len(models) == 4 and any("ederated" in m for m in models), models
    link = by_key["seed-mlflow-run"]  # Prefect stores a link artifact as markdown "[text](url)"
    assert re.fullmatch(
        r"\[MLflow run\]\(http://127\.0\.0\.1:5000/#/experiments/\d+/runs/\w+\)", link["data"]
    )
    summary = by_key["seed-summary"]
    assert summary["type"] == "markdown" and "seed: 2 rounds, strategy `mean`" in summary["data"]


def _rows(data: Any) -> list[dict[str, Any]]:
    return json.loads(data) if isinstance(data, str) else data


def test_seed_run_logs_include_the_workers_own_lines(stack: Stack, seed_run) -> None:
    _, run_id = seed_run
    logs = stack.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    by_logger: dict[str, list[str]] = {}
    for entry in logs:
        by_logger.setdefault(entry["name"], []).append(entry["message"])
    flow_lines = "\n".join(by_logger.get("prefect.flow_runs", []))
    assert "Training round 2/2" in flow_lines
    assert "available numbers on alice: 0: 5923, 1: 6742, 2: 5958, 3: 6131" in flow_lines
    for worker, held in (("alice", 24754), ("testing", 10000)):
        lines = by_logger.get(f"fedcore.worker.{worker}", [])
        assert any(f"{worker} holds {held} images" in line for line in lines), sorted(by_logger)


def test_mlflow_run_carries_the_prefect_flow_run(stack: Stack, seed_run) -> None:
    from mlflow.tracking import MlflowClient

    _, run_id = seed_run
    client = MlflowClient(tracking_uri=f"sqlite:///{stack.home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("federated-mnist")
    assert exp is not None
    [run] = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{run_id}'")
    assert run.info.status == "FINISHED"
    assert run.data.params["rounds"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "accuracy/federated")]
    assert sorted(steps) == [1, 2]


def test_run_whose_workers_all_fail_ends_failed(stack: Stack, tmp_path: Path) -> None:
    empty = tmp_path / "no-mnist-here"  # exists, so every worker starts, then finds no shard
    empty.mkdir()
    proc, run_id = stack.run_deployment("seed", "rounds=1", f"data_dir={empty}")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Flow run finished in state 'Failed'" in " ".join(proc.stdout.split())
    run = stack.get(f"/flow_runs/{run_id}")
    assert run["state"]["type"] == "FAILED"
    assert "is missing in" in run["state"]["message"], run["state"]["message"]
    tasks = stack.task_runs(run_id)
    starts = {n: t for n, t in tasks.items() if n.startswith("start-")}
    assert set(starts) == {"start-alice", "start-bob", "start-charlie", "start-testing"}
    for t in starts.values():
        assert t["state"]["type"] == "FAILED"
        assert "WorkerFailed" in t["state"]["message"]
        assert t["run_count"] == 1  # a worker's own error is not transient: never retried
    assert not [n for n in tasks if n.startswith(("train-", "evaluate-"))]


def test_serve_without_a_server_says_how_to_start_one(stack: Stack) -> None:
    api = f"http://127.0.0.1:{_free_port()}/api"
    proc = subprocess.run(
        [str(BIN / "fedmnist"), "serve", "--api-url", api],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"no Prefect server answers at {api}" in proc.stderr
    assert "fedmnist server" in proc.stderr


# -- without the stack: the retry policy, the deployments file, the typed parameters ----------


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        ("WorkerUnreachable", True),
        ("WorkerTimeout", False),  # its round's deadline has passed: the round goes on
        ("UpdateRejected", False),
        ("WorkerFailed", False),
        ("HostKeyMismatch", False),
    ],
)
def test_only_transient_worker_errors_are_retried(exc: str, retried: bool) -> None:
    from prefect.states import Failed

    from fedcore import errors
    from tasks.workers import is_transient, train_answering

    error = getattr(errors, exc)("alice", "what went wrong")
    # Prefect's task engine hands retry_condition_fn the failure as Failed(data=exception).
    assert is_transient(train_answering, None, Failed(data=error)) is retried
    assert train_answering.retry_condition_fn is is_transient and train_answering.retries == 2


GOOD = "deployments:\n  seed: {config_path: configs/seed.yaml, %s}\n"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("schedule: {cron: '61 2 * * *'}", "seed.schedule.cron: Value error, Invalid cron string"),
        ("schedule: {cron: '0 2 * * *', timezone: Mars}", "Value error, unknown time zone"),
        ("shedule: {cron: '0 2 * * *'}", "deployments.seed.shedule: Extra inputs"),
        ("concurrency_limit: 0", "seed.concurrency_limit: Input should be greater than 0"),
        ("parameters: {round: 2}", "deployment seed: unknown parameter(s) ['round']"),
        ("parameters: {rounds: 0}", "Validation failed for field 'rounds'"),
    ],
)
def test_deployments_file_errors_name_the_field(tmp_path: Path, fields: str, message: str) -> None:
    from fedcore.errors import ConfigError
    from flows.deployments import load_deployments

    path = tmp_path / "deployments.yaml"
    path.write_text(GOOD % fields)
    with pytest.raises(ConfigError) as err:
        load_deployments(path)
    assert message in str(err.value)


def test_shipped_deployments_file_is_valid() -> None:
    from flows.deployments import load_deployments

    spec = load_deployments(ROOT / "configs" / "deployments.yaml")
    assert list(spec.deployments) == ["seed", "lab", "jetsons"]
    assert all(d.concurrency_limit == 1 for d in spec.deployments.values())
    assert not any(d.schedule and d.schedule.active for d in spec.deployments.values())


def test_typed_parameters_become_overrides(tmp_path: Path) -> None:
    from fedcore.config import load_config
    from flows.parameters import config_overrides

    seed = ROOT / "configs" / "seed.yaml"
    # Typed values win over the same keys in `overrides`; unset ones add nothing.
    merged = config_overrides(seed, {"rounds": 5, "train.steps": 2}, rounds=2, lr=0.05)
    assert merged == {"rounds": 2, "train.steps": 2, "train.lr": 0.05}
    # The file's own strategy keeps its section; another name replaces it, then overrides apply.
    assert "strategy" not in config_overrides(seed, None, strategy="mean")
    merged = config_overrides(seed, {"strategy.weighting": "samples"}, strategy="fedavgm")
    assert list(merged) == ["strategy", "strategy.weighting"]
    cfg = load_config(seed, merged)
    assert (cfg.strategy.name, cfg.rounds, cfg.train.lr) == ("fedavgm", 40, 0.1)


def test_relative_config_path_is_found_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    from flows.parameters import resolve_config_path

    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configs/seed.yaml") == ROOT / "configs" / "seed.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "seed.yaml").write_text("name: mine\n")
    assert resolve_config_path("configs/seed.yaml") == Path("configs/seed.yaml")  # cwd first
    assert resolve_config_path("configs/none.yaml") == Path("configs/none.yaml")  # load_config says
