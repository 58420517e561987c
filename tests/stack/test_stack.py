"""Past one machine, for real: PostgreSQL, the Prefect server and the MLflow server of `fedmnist
stack up` (tests/stack/conftest.py), the deployments of prefect.yaml put on a process work pool
with `prefect deploy --all`, a `prefect worker start` running the seed deployment for 2 rounds,
the record read back through MLflow's client and from PostgreSQL, an experiment run on another
inventory, and `fedmnist stack down` leaving no process. The tests run in file order over one
stack (starting it costs a minute); the last one stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from stackkit import BIN, Stack, running_stack
from waiting import wait_until

from fedlab.procs import cmdline, descendants, proc_alive, wait_gone

pytestmark = pytest.mark.slow

POOL = "fedmnist"
MODEL = "federated-mnist-cnn"


@pytest.fixture(scope="session")
def stack(mnist_dir: Path) -> Iterator[Stack]:
    with running_stack(mnist_dir) as up:
        yield up


def _pids(stack: Stack) -> dict[str, int]:
    parts = stack.status()["parts"]
    return {name: part["pid"] for name, part in parts.items()}


def test_up_started_every_part_and_a_second_up_starts_nothing(stack: Stack) -> None:
    for part in ("postgres", "prefect", "mlflow"):
        assert f"{part}: started" in stack.first_up, stack.first_up
    before = _pids(stack)
    again = stack.run("fedmnist", "stack", "up")
    assert again.returncode == 0, again.stderr
    assert "started" not in again.stdout, again.stdout
    for part, pid in before.items():
        assert f"{part}: already running, pid {pid}" in again.stdout
    assert _pids(stack) == before


def test_status_says_what_runs_where_and_keeps_secrets_off_command_lines(stack: Stack) -> None:
    status = stack.status()
    ports = stack.ports
    assert status["root"] == str(stack.home / "stack")
    assert status["parts"]["postgres"]["url"] == f"127.0.0.1:{ports['postgres']}"
    assert status["parts"]["prefect"]["url"] == f"http://127.0.0.1:{ports['prefect']}/api"
    assert status["parts"]["mlflow"]["url"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert all(part["healthy"] for part in status["parts"].values()), status
    for name, pid in _pids(stack).items():
        assert (stack.home / "stack" / "pids" / f"{name}.pid").read_text().strip() == str(pid)
    password = (stack.home / "stack" / "db-password").read_text().strip()
    assert (stack.home / "stack" / "db-password").stat().st_mode & 0o077 == 0
    pg = _pids(stack)["postgres"]
    if os.geteuid() == 0:  # PostgreSQL refuses root: it runs as its own unprivileged user
        uid = Path(f"/proc/{pg}").stat().st_uid
        assert uid != 0
    for pid in _pids(stack).values():
        assert password not in cmdline(pid)
    assert f"listen_addresses=127.0.0.1 -p {ports['postgres']}" in cmdline(pg)
    text = stack.run("fedmnist", "stack", "status").stdout
    assert f"export PREFECT_API_URL={stack.prefect_api}" in text
    assert f"export MLFLOW_TRACKING_URI={stack.mlflow_uri}" in text


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[subprocess.Popen[bytes]]:
    """The pool and its deployments (`prefect deploy --all` from the checkout), and a process
    worker of the lab's queue started outside the checkout (the pull step enters it)."""
    created = stack.run("prefect", "work-pool", "create", POOL, "--type", "process")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = stack.run("prefect", "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    log = stack.home / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--work-queue", "lab"],
            cwd=stack.home,
            env=stack.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        group = [proc.pid]
        os.killpg(proc.pid, signal.SIGTERM)
        if wait_gone(group, 30):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def seed_run(stack: Stack, worker: subprocess.Popen[bytes]) -> dict[str, Any]:
    """`prefect deployment run federated-mnist/seed --param rounds=2 --watch` (workers' own
    models not scored: the run stays short); the flow run as the API returns it."""
    done = stack.run(
        "prefect",
        "deployment",
        "run",
        "federated-mnist/seed",
        "--watch",
        "--param",
        "rounds=2",
        "--param",
        'overrides={"evaluation.workers": false}',
    )
    log = (stack.home / "worker.log").read_text()[-4000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:] + log
    assert "Flow run finished successfully in 'Completed'" in done.stdout
    run_id = done.stdout.split("UUID: ", 1)[1].split()[0]
    with httpx.Client(base_url=stack.prefect_api) as http:
        flow_run = http.get(f"/flow_runs/{run_id}").json()
    return dict(flow_run)


def test_deploy_puts_each_deployment_on_its_sites_queue(stack: Stack, worker) -> None:
    with httpx.Client(base_url=stack.prefect_api) as http:
        got = {
            name: http.get(f"/deployments/name/federated-mnist/{name}").json()
            for name in ("seed", "lab", "jetsons")
        }
    assert {n: d["work_queue_name"] for n, d in got.items()} == {
        "seed": "lab",
        "lab": "lab",
        "jetsons": "fleet",
    }
    assert {d["work_pool_name"] for d in got.values()} == {POOL}
    assert got["seed"]["parameters"] == {"config_path": "configs/seed.yaml"}
    assert got["seed"]["pull_steps"] == [{"flows.deployments.enter_checkout": {}}]
    assert got["seed"]["enforce_parameter_schema"] is True
    [schedule] = got["seed"]["schedules"]
    assert (schedule["schedule"]["cron"], schedule["active"]) == ("0 2 * * *", False)
    assert schedule["slug"] == "seed-cron"  # as `fedmnist serve` names it: one schedule either way
    assert got["seed"]["global_concurrency_limit"]["limit"] == 1
    assert got["seed"]["concurrency_options"]["collision_strategy"] == "ENQUEUE"


def test_the_worker_ran_the_seed_deployment(seed_run: dict[str, Any]) -> None:
    assert seed_run["state"]["type"] == "COMPLETED"
    assert (seed_run["work_pool_name"], seed_run["work_queue_name"]) == (POOL, "lab")
    assert seed_run["parameters"]["rounds"] == 2


@pytest.fixture(scope="module")
def mlflow_run(stack: Stack, seed_run: dict[str, Any]) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    experiment = client.get_experiment_by_name("federated-mnist")
    assert experiment is not None
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{seed_run['id']}'",
    )
    assert len(found) == 1
    return client, found[0]


def test_the_record_is_on_the_server_with_metrics_and_a_version(mlflow_run) -> None:
    client, run = mlflow_run
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy/federated"))
    assert steps == [1, 2]
    assert run.data.params["rounds"] == "2"
    version = client.get_model_version_by_alias(MODEL, "current")
    assert version.run_id == run.info.run_id
    assert version.source.startswith("models:/")


def test_artifacts_went_through_the_servers_proxy(stack: Stack, mlflow_run) -> None:
    client, run = mlflow_run
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    version = client.get_model_version_by_alias(MODEL, "current")
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert model.artifact_location.startswith("mlflow-artifacts:/")
    store = stack.home / "stack" / "mlflow-artifacts"
    exp = run.info.experiment_id
    files = store / exp / run.info.run_id / "artifacts"
    assert (files / "models" / "global-r002.safetensors").is_file()
    assert (files / "config.json").is_file()
    assert list((store / exp / "models" / model.model_id / "artifacts").rglob("*.safetensors"))
    # no client wrote a store of its own
    assert not (stack.home / "mlflow.db").exists() and not (stack.home / "mlartifacts").exists()


def test_runs_and_versions_are_rows_in_postgresql(stack: Stack, mlflow_run) -> None:
    psycopg = pytest.importorskip("psycopg", reason="the stack extra installs psycopg")
    _, run = mlflow_run
    password = (stack.home / "stack" / "db-password").read_text().strip()
    user = json.loads((stack.home / "stack" / "stack.json").read_text())["db_user"]
    with psycopg.connect(
        host="127.0.0.1",
        port=stack.ports["postgres"],
        user=user,
        password=password,
        dbname="mlflow",
    ) as conn:
        runs = conn.execute("SELECT run_uuid, status FROM runs").fetchall()
        versions = conn.execute(
            "SELECT run_id FROM model_versions WHERE name = %s", (MODEL,)
        ).fetchall()
        metrics = conn.execute(
            "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'accuracy/federated'",
            (run.info.run_id,),
        ).fetchall()
    assert (run.info.run_id, "FINISHED") in runs
    assert (run.info.run_id,) in versions
    assert sorted(s for (s,) in metrics) == [1, 2]


def test_a_recipe_runs_on_another_inventory(stack: Stack, seed_run) -> None:
    summary = stack.home / "inventory-summary.json"
    done = stack.run(
        "fedmnist",
        "run",
        "configs/best.yaml",
        "--inventory",
        "configs/local-iid.yaml",
        "--rounds",
        "2",
        "--set",
        "train.steps=2",
        "--set",
        "evaluation.workers=false",
        "--summary-json",
        str(summary),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    run = client.get_run(json.loads(summary.read_text())["mlflow_run_id"])
    config = json.loads(
        Path(client.download_artifacts(run.info.run_id, "config.json", str(stack.home))).read_text()
    )
    assert config["name"] == "best" and config["strategy"]["name"] == "scaffold"
    assert [w["name"] for w in config["workers"]] == ["iid-0", "iid-1", "iid-2", "testing"]
    assert config["workers"][0]["iid"] == {"index": 0, "count": 3, "seed": 1}


def test_down_stops_everything_it_started(stack: Stack) -> None:
    pids = _pids(stack)
    every = {pid for top in pids.values() for pid in (top, *descendants(top))}
    done = stack.run("fedmnist", "stack", "down", timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == ["mlflow: stopped", "prefect: stopped", "postgres: stopped"]
    # postgres' own children end with it, a moment after pg_ctl returns
    wait_until(lambda: not [p for p in every if proc_alive(p)], 60, "every stack process gone")
    home = str(stack.home)
    mentions = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    assert not [p.name for p in mentions if home in cmdline(int(p.name))]
    assert all(part["pid"] is None for part in stack.status()["parts"].values())
    again = stack.run("fedmnist", "stack", "down")
    assert again.stdout.splitlines() == [
        "mlflow: not running",
        "prefect: not running",
        "postgres: not running",
    ]
