"""A large fleet's round as one `train-rNN` task run (tasks/workers.py `train_fleet`): each
worker's answer in its own future, a dropped worker asked again as its own task would be, and
the same training as with a task run per worker. Real worker programs, a real Prefect run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import weakref
from concurrent.futures import Future
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from fedcore.config import load_config
from fedcore.errors import WorkerTimeout
from fedcore.model import initial_weights
from fedcore.protocol import TrainRequest, Update
from flows.launch import make_session
from tasks.workers import train_fleet


def test_the_fleet_task_answers_each_worker_and_asks_a_dropped_one_again(
    mnist_dir: Path,
) -> None:
    cfg = load_config(ROOT / "configs" / "smoke.yaml", {"data_dir": str(mnist_dir)})
    sessions = {w.name: make_session(cfg, w) for w in cfg.trainers}
    try:
        for s in sessions.values():
            s.start()
            s.hello(120)
        alice = sessions["alice"]
        os.kill(alice.hello(120).pid, signal.SIGKILL)  # gone before the round: a transient drop
        weights = initial_weights(1)
        calls = {
            name: (s, TrainRequest(1, cfg.plan(1), 7, weights)) for name, s in sessions.items()
        }
        answers: dict[str, Future[Update]] = {name: Future() for name in sessions}
        train_fleet.fn(1, calls, 120.0, {n: weakref.ref(f) for n, f in answers.items()})
        got = {name: f.result(0) for name, f in answers.items()}
        assert [u.worker for u in got.values()] == ["alice", "bob", "charlie"]
        assert got["alice"].num_examples == 24754  # its program restarted, then it trained
        assert got["alice"].metrics.steps == 2

        # an error that is not transient is the worker's answer, not retried
        late: dict[str, Future[Update]] = {"bob": Future()}
        train_fleet.fn(2, {"bob": calls["bob"]}, 1e-6, {"bob": weakref.ref(late["bob"])})
        with pytest.raises(WorkerTimeout, match="bob"):
            late["bob"].result(0)
    finally:
        for s in sessions.values():
            s.close()


def run(config: Path, home: Path, summary: Path) -> str:
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_HOME=str(home / "prefect"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "fedmnist"), "run", str(config), "-v"]
        + ["--summary-json", str(summary)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_one_task_a_round_trains_as_a_task_per_worker_does(mnist_dir: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    raw["data_dir"] = str(mnist_dir)
    per_worker = tmp_path / "per-worker.yaml"
    per_worker.write_text(yaml.safe_dump(raw))
    raw["tracking"]["worker_tasks_up_to"] = 2  # three trainers: past it
    grouped = tmp_path / "grouped.yaml"
    grouped.write_text(yaml.safe_dump(raw))

    out_grouped = run(grouped, tmp_path / "home", tmp_path / "grouped.json")
    out_each = run(per_worker, tmp_path / "home", tmp_path / "each.json")

    assert "Task run 'train-r01' - Finished in state Completed()" in out_grouped
    assert "train-alice-r01" not in out_grouped
    assert "Task run 'train-alice-r01' - Finished in state Completed()" in out_each
    assert "Task run 'train-r01'" not in out_each
    for rnd in (1, 2):
        for worker in ("alice", "bob", "charlie"):
            assert f"[{worker}] round {rnd}: 2 steps" in out_grouped
    grouped_summary = json.loads((tmp_path / "grouped.json").read_text())
    each_summary = json.loads((tmp_path / "each.json").read_text())
    assert grouped_summary["evaluations"] == each_summary["evaluations"]
    assert grouped_summary["final_accuracy"] == each_summary["final_accuracy"]
