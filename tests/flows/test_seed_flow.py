"""The flow end to end: real worker processes, Prefect's temporary server, a real MLflow store.

Runs `fedmnist run configs/smoke.yaml -v` (2 rounds) twice in fresh processes with their own
FEDMNIST_HOME and PREFECT_HOME, then reads the MLflow record back with MlflowClient and the task
runs back through the Prefect API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from conftest import ROOT

from fedcore.checkpoint import load_weights

pytestmark = pytest.mark.slow


def _run(home: Path, mnist_dir: Path, prefect_home: Path) -> tuple[dict, str]:
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_HOME=str(prefect_home))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    summary = home / "summary.json"
    proc = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "fedmnist"),
            "run",
            "configs/smoke.yaml",
            "-v",  # Prefect's task state lines too: the task names a person sees in the UI
            "--set",
            f"data_dir={mnist_dir}",
            "--summary-json",
            str(summary),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(summary.read_text()), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, mnist_dir: Path):
    base = tmp_path_factory.mktemp("flow")
    prefect_home = base / "prefect"
    first = _run(base / "a", mnist_dir, prefect_home)
    second = _run(base / "b", mnist_dir, prefect_home)
    return base, first, second


def _client(home: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def test_console_shows_the_seed_lines(two_runs) -> None:
    _, (_, out), _ = two_runs
    assert (
        "MNIST dataset (train set), available numbers on alice: 0: 5923, 1: 6742, 2: 5958, 3: 6131"
        in out
    )
    assert "available numbers on testing: 0: 980, 1: 1135" in out
    assert "Training round 1/2" in out and "Training round 2/2" in out
    for who in (
        "Model update alice",
        "Model update bob",
        "Model update charlie",
        "Federated model",
    ):
        assert f"{who}: Percentage numbers 0-3: " in out
        assert f"{who}: Average loss: " in out
    assert "Task run 'train-charlie-r02'" in out


def test_mlflow_run_has_params_and_stepped_metrics(two_runs) -> None:
    base, (summary, _), _ = two_runs
    client = _client(base / "a")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert (p["rounds"], p["seed"], p["train.lr"], p["train.steps"]) == ("2", "1", "0.1", "2")
    assert p["strategy.name"] == "mean" and p["strategy.weighting"] == "unweighted"
    assert p["workers.alice.labels"] == "[0, 1, 2, 3]" and len(p["config_hash"]) == 12
    assert run.data.tags["prefect.flow_run_id"] not in ("", "local")
    for key in (
        "accuracy/federated",
        "accuracy/alice",
        "accuracy/bob",
        "accuracy/charlie",
        "train_loss/alice",
        "train_samples/bob",
        "round_seconds",
        "lr",
    ):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1, 2], key
    acc = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "accuracy/federated")
    }
    assert acc[2] == summary["final_accuracy"]
    samples = client.get_metric_history(run.info.run_id, "train_samples/bob")
    assert {m.value for m in samples} == {64.0}  # 2 batches of 32
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert lrs == {1: 0.1, 2: pytest.approx(0.098)}
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "models")]
    assert arts == ["models/global-r001.safetensors", "models/global-r002.safetensors"]


def test_final_model_file_rebuilds_and_carries_its_record(two_runs) -> None:
    _, (summary, _), _ = two_runs
    weights, meta = load_weights(Path(summary["checkpoint_dir"]) / "global-r002.safetensors")
    assert meta["round"] == "2" and meta["strategy"] == "mean" and len(meta["config_hash"]) == 12
    assert sum(t.numel() for t in weights.values()) == 431080


def test_same_config_and_seed_give_identical_metrics(two_runs) -> None:
    base, (s1, _), (s2, _) = two_runs
    assert s1["evaluations"] == s2["evaluations"]
    c1, c2 = _client(base / "a"), _client(base / "b")
    for key in ("train_loss/alice", "train_loss/charlie", "loss/federated", "accuracy/bob"):
        h1 = [(m.step, m.value) for m in c1.get_metric_history(s1["mlflow_run_id"], key)]
        h2 = [(m.step, m.value) for m in c2.get_metric_history(s2["mlflow_run_id"], key)]
        assert sorted(h1) == sorted(h2), key
    for r in (1, 2):
        name = f"global-r{r:03d}.safetensors"
        w1, _ = load_weights(Path(s1["checkpoint_dir"]) / name)
        w2, _ = load_weights(Path(s2["checkpoint_dir"]) / name)
        assert all((w1[k] == w2[k]).all() for k in w1)


TASK_RUNS = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

with get_client(sync_client=True) as client:
    runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sys.argv[1]]))
    )
    out = {
        r.name: [r.state_type.value, r.run_count, r.start_time.isoformat(), r.end_time.isoformat()]
        for r in runs
    }
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
"""


def _task_runs(prefect_home: Path, flow_run_id: str, out: Path) -> dict[str, list]:
    """Task run name -> [state type, run count, start, end] of a finished flow run, read through
    the Prefect API (a temporary server over the runs' database in `prefect_home`)."""
    env = dict(os.environ, PREFECT_HOME=str(prefect_home))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-c", TASK_RUNS, flow_run_id, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_each_round_aggregates_in_its_own_task(two_runs) -> None:
    base, (summary, out), _ = two_runs
    run = _client(base / "a").get_run(summary["mlflow_run_id"])
    tasks = _task_runs(base / "prefect", run.data.tags["prefect.flow_run_id"], base / "tasks.json")

    def time(name: str, i: int) -> datetime:
        return datetime.fromisoformat(tasks[name][i])

    for r in (1, 2):
        name = f"aggregate-r{r:02d}"
        assert tasks[name][:2] == ["COMPLETED", 1]
        # after the round's training, before its evaluation
        trained = max(time(f"train-{w}-r{r:02d}", 3) for w in ("alice", "bob", "charlie"))
        assert trained <= time(name, 2) and time(name, 3) <= time(f"evaluate-r{r:02d}", 2)
    assert "Task run 'aggregate-r01'" in out
