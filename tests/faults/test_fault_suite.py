"""The fault suite: a training survives workers that die, stall or lie, and a coordinator that
is killed, and loses nothing. Real worker processes, the real flow, a real MLflow store.

Faults are injected by `lying_worker.py` (a real worker whose train step misbehaves on cue). Every
scenario runs `fedmnist run` in its own FEDMNIST_HOME; a fault-free run with the same seed is the
reference. The table of what each scenario did and what survived is printed at the end
(`pytest -s`) and written to $FEDMNIST_HOME/../fault-table.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from fedcore.checkpoint import load_weights

pytestmark = pytest.mark.slow
ROUNDS = 6
FEDMNIST = str(ROOT / ".venv" / "bin" / "fedmnist")
TABLE: list[tuple[str, str, str]] = []


def _config(tmp: Path, mnist_dir: Path) -> Path:
    wrapper = tmp / "lying-python"
    wrapper.write_text(
        f'#!/bin/sh\nexec {sys.executable} {ROOT / "tests" / "faults" / "lying_worker.py"} "$@"\n'
    )
    wrapper.chmod(0o755)
    trainer = {"python": str(wrapper), "threads": 1}
    cfg = {
        "name": "faults",
        "seed": 1,
        "rounds": ROUNDS,
        "train": {"steps": 10, "batch_size": 32, "lr": 0.1, "lr_decay": 0.98, "lr_min": 0.001},
        "strategy": {"name": "mean"},
        "evaluation": {"rounds": [ROUNDS], "workers": False},
        "quorum": 2,
        "timeouts": {"train": 20, "evaluate": 300},
        "data_dir": str(mnist_dir),
        "workers": [
            {"name": "alice", "labels": [0, 1, 2, 3], **trainer},
            {"name": "bob", "labels": [4, 5, 6], **trainer},
            {"name": "charlie", "labels": [7, 8, 9], **trainer},
            {"name": "testing", "role": "evaluator", "threads": 2},
        ],
    }
    path = tmp / "faults.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(home: Path, faults: dict[str, str], always: bool = False) -> dict[str, str]:
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_HOME=str(home.parent / "prefect"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env = {k: v for k, v in env.items() if not k.startswith("FEDMNIST_FAULT_")}
    (home / "faults").mkdir(parents=True, exist_ok=True)
    env["FEDMNIST_FAULT_DIR"] = str(home / "faults")
    env["FEDMNIST_FAULT_ALWAYS"] = "1" if always else "0"
    for name, spec in faults.items():
        env[f"FEDMNIST_FAULT_{name.upper()}"] = spec
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDMNIST, "run", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )


def _run_and_kill(args: list[str], env: dict[str, str], marker: str, delay: float) -> None:
    """Start a training, wait for `marker` in its output, then kill the coordinator's whole
    process group (workers and Prefect's temporary server included) with SIGKILL."""
    proc = subprocess.Popen(
        [FEDMNIST, "run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if marker in line:
                time.sleep(delay)
                break
        else:
            pytest.fail(f"training ended before {marker!r}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _history(home: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _summary(home: Path) -> dict:
    return json.loads((home / "summary.json").read_text())


@pytest.fixture(scope="module")
def lab(tmp_path_factory, mnist_dir: Path):
    base = tmp_path_factory.mktemp("faults")
    config = _config(base, mnist_dir)
    ref = base / "reference"
    out = _run([str(config), "--summary-json", str(ref / "summary.json")], _env(ref, {}))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    yield base, config, ref
    if TABLE:
        lines = ["| scenario | what happened | what survived |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in TABLE]
        (base / "fault-table.md").write_text("\n".join(lines) + "\n")
        print("\n" + "\n".join(lines))


def _final_weights(summary: dict) -> dict[str, torch.Tensor]:
    return load_weights(Path(summary["checkpoint_dir"]) / f"global-r{ROUNDS:03d}.safetensors")[0]


def test_workers_that_die_stall_and_lie(lab) -> None:
    base, config, ref = lab
    home = base / "lying"
    faults = {"alice": "exit@2", "charlie": "nan@2,stall@4", "bob": "shape@3"}
    out = _run([str(config), "--summary-json", str(home / "summary.json")], _env(home, faults))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    s, r = _summary(home), _summary(ref)
    run_id = s["mlflow_run_id"]
    # every round recorded exactly once
    assert [step for step, _ in _history(home, run_id, "round_seconds")] == list(range(1, 7))
    failed = dict(_history(home, run_id, "workers_failed"))
    assert failed == {1: 0, 2: 1, 3: 1, 4: 1, 5: 0, 6: 0}
    assert dict(_history(home, run_id, "failed/charlie"))[2] == 1.0
    assert dict(_history(home, run_id, "failed/alice"))[2] == 0.0  # died, restarted, delivered
    assert "charlie dropped (rejected)" in log and "non-finite values" in log
    assert "bob dropped (rejected)" in log and "'fc1.weight' has shape [3, 3]" in log
    assert "charlie dropped (timeout)" in log
    diff = abs(s["final_accuracy"] - r["final_accuracy"])
    TABLE.append(
        (
            "1 process killed mid-round (alice, r2)",
            "restarted by the task's retry",
            "round 2 with all 3 workers",
        )
    )
    TABLE.append(
        (
            "3 stalled past the deadline (charlie, r4)",
            "WorkerTimeout after 20 s, dropped",
            "round 4 with 2 of 3; charlie back in round 5",
        )
    )
    TABLE.append(("4 NaN weights (charlie, r2)", "rejected: non-finite values", "round 2 with 2"))
    TABLE.append(("5 wrong-shape update (bob, r3)", "rejected: shape", "round 3 with 2"))
    TABLE.append(
        (
            "(1,3,4,5 together)",
            f"final accuracy {100 * s['final_accuracy']:.2f}% vs "
            f"{100 * r['final_accuracy']:.2f}% fault-free",
            f"{100 * diff:.2f} points apart",
        )
    )
    assert diff <= 0.01  # within one point of the fault-free run (0.82 measured)


@pytest.mark.parametrize(
    ("marker", "delay", "label"),
    [
        (f"Round 3/{ROUNDS} done", 0.0, "6 coordinator killed between rounds"),
        (f"Training round 4/{ROUNDS}", 0.3, "7 coordinator killed mid-round"),
    ],
)
def test_coordinator_killed_then_resumed(lab, marker: str, delay: float, label: str) -> None:
    base, config, ref = lab
    home = base / label.split()[0]
    env = _env(home, {})
    _run_and_kill([str(config)], env, marker, delay)
    runs = list((home / "runs").iterdir())
    assert len(runs) == 1
    state = json.loads((runs[0] / "state.json").read_text())
    assert state["round"] == 3
    out = _run(["--resume", runs[0].name, "--summary-json", str(home / "summary.json")], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming" in out.stdout and "after round 3" in out.stdout
    s = _summary(home)
    assert s["mlflow_run_id"] == state["mlflow_run_id"]  # the same MLflow run goes on
    steps = [step for step, _ in _history(home, s["mlflow_run_id"], "round_seconds")]
    assert steps == list(range(1, 7))  # no round lost or counted twice
    mine, theirs = _final_weights(s), _final_weights(_summary(ref))
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # same seed, same model
    TABLE.append((label, "resumed from round 3 with --resume", "identical final weights"))


def test_all_workers_gone_fails_clearly(lab) -> None:
    base, config, _ = lab
    home = base / "gone"
    env = _env(home, {n: "exit@2" for n in ("alice", "bob", "charlie")}, always=True)
    out = _run([str(config)], env)
    assert out.returncode == 1
    assert "round 2: 0 of 3 workers returned an update, 2 needed" in out.stderr
    TABLE.append(("9 all workers gone (r2)", "QuorumNotReached, flow Failed", "rounds 1 kept"))
