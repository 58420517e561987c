"""A training under secure aggregation through `fedmnist run` (issue 17): the smoke recipe with 10
steps a round and `secure_aggregation.enabled`, local workers, tracking off. Every round ends with
the secure sum of the three devices, the federated model learns (above 40% after two rounds on
the seed's split, from 10% at chance), and the round's record names no single update."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from fedcore.resume import load_resume_point

pytestmark = pytest.mark.slow


def test_two_rounds_with_secure_aggregation(tmp_path: Path, mnist_dir: Path) -> None:
    env = dict(
        os.environ, FEDMNIST_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect")
    )
    env.pop("PREFECT_API_URL", None)
    summary = tmp_path / "summary.json"
    argv = [str(ROOT / ".venv" / "bin" / "fedmnist"), "run", "configs/smoke.yaml"]
    argv += ["--summary-json", str(summary), "--set", f"data_dir={mnist_dir}"]
    for item in ("tracking.enabled=false", "secure_aggregation.enabled=true", "train.steps=10"):
        argv += ["--set", item]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for rnd in (1, 2):
        assert f"Round {rnd}: secure sum of 3 updates (alice, bob, charlie)" in log, log[-4000:]
    assert "masked input sent" in log
    result = json.loads(summary.read_text())
    assert result["rounds"] == 2 and result["final_accuracy"] > 0.4, result
    point = load_resume_point(Path(result["checkpoint_dir"]))
    assert point.round == 2
    # only the federated model was scored, and no worker's update recorded: the coordinator
    # never had one
    assert [k for k in point.metrics if k.startswith("accuracy/")] == ["accuracy/federated"]
    assert not any(k.startswith(("train_loss/", "train_samples/")) for k in point.metrics)
    assert "Round 2/2 done" in log and "(training loss: not seen: secure aggregation)" in log
    # what the round did record: how many devices the sum holds, what each sent and received
    assert point.metrics["workers_ok"] == 3 and point.metrics["workers_failed"] == 0
    for name in ("alice", "bob", "charlie"):
        assert 1.7e6 < point.metrics[f"wire_bytes/{name}"] < 1.8e6  # the masked vector
        assert point.metrics[f"wire_bytes_down/{name}"] > 1.7e6  # the global model
