"""DP-SGD through the real flow (issue 17): every device's epsilon is accounted round by round
and a device past its budget trains no more.

The smoke training through the real CLI with `privacy.enabled`, local workers, tracking off. The
epsilon the run records for each device equals what the coordinator's accountant gives for the
rounds it was asked to train (steps, its sampling rate batch / examples, the noise multiplier);
a training resumed after round 2 goes on from the ledger its round state kept (round 3's
epsilon is three rounds' worth, not one); with a budget of one round the training stops before
round 2 with round 1's model kept.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from fedcore.config import load_config
from fedcore.mnist import load_shard
from fedcore.privacy.accountant import DeviceLedger
from fedcore.resume import load_resume_point

pytestmark = pytest.mark.slow

SIGMA = 1.0


def _fedmnist(base: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, FEDMNIST_HOME=str(base / "home"), PREFECT_HOME=str(base / "prefect"))
    env.pop("PREFECT_API_URL", None)
    argv = [str(ROOT / ".venv" / "bin" / "fedmnist"), *argv]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _run(base: Path, mnist_dir: Path, *sets: str) -> tuple[subprocess.CompletedProcess, Path]:
    summary = base / "summary.json"
    argv = ["run", "configs/smoke.yaml", "--summary-json", str(summary)]
    argv += ["--set", f"data_dir={mnist_dir}"]
    argv += ["--set", "tracking.enabled=false", "--set", "privacy.enabled=true"]
    argv += ["--set", f"privacy.noise_multiplier={SIGMA}"]
    for item in sets:
        argv += ["--set", item]
    return _fedmnist(base, argv), summary


def _expected(rounds: int, mnist_dir: Path) -> dict[str, float]:
    """Each trainer's epsilon after `rounds` smoke rounds, from its shard's size."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml", {"data_dir": str(mnist_dir)})
    plan = cfg.train.plan(1)
    ledger = DeviceLedger(cfg.privacy.delta, cfg.privacy.target_epsilon)
    out = {}
    for w in cfg.trainers:
        _, y = load_shard(str(cfg.data_dir_for(w)), w.shard())
        for _ in range(rounds):
            ledger.record(w.name, plan.steps, plan.batch_size / y.numel(), SIGMA)
        out[w.name] = ledger.epsilon(w.name)
    return out


def test_each_device_epsilon_is_recorded_every_round_and_survives_a_resume(
    tmp_path: Path, mnist_dir: Path
) -> None:
    proc, summary_file = _run(tmp_path, mnist_dir)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = Path(json.loads(summary_file.read_text())["checkpoint_dir"])
    point = load_resume_point(run_dir)
    assert point.round == 2
    expected = _expected(2, mnist_dir)
    for name, eps in expected.items():
        assert point.metrics[f"epsilon/{name}"] == pytest.approx(eps, rel=1e-9), name
        assert 0 < eps < 2.0
    # alice holds four digits: more examples, a lower sampling rate, a smaller epsilon
    assert expected["alice"] < min(expected["bob"], expected["charlie"])
    assert point.privacy is not None and sorted(point.privacy["ledger"]["history"]) == sorted(
        expected
    )

    resumed = _fedmnist(tmp_path, ["run", "--resume", str(run_dir), "--rounds", "3"])
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    point = load_resume_point(run_dir)
    assert point.round == 3
    for name, eps in _expected(3, mnist_dir).items():  # three rounds' worth, not one
        assert point.metrics[f"epsilon/{name}"] == pytest.approx(eps, rel=1e-9), name


def test_a_spent_budget_stops_the_training_with_the_last_model(
    tmp_path: Path, mnist_dir: Path
) -> None:
    budget = max(_expected(1, mnist_dir).values()) * 1.001  # one round fits, a second does not
    proc, summary_file = _run(
        tmp_path,
        mnist_dir,
        f"privacy.target_epsilon={budget}",
        "privacy.on_budget_spent=stop-training",
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Training stopped before round 2" in log and "privacy budget" in log, log[-4000:]
    run_dir = Path(json.loads(summary_file.read_text())["checkpoint_dir"])
    assert (run_dir / "global-r001.safetensors").is_file()
    assert not (run_dir / "global-r002.safetensors").exists()
    point = load_resume_point(run_dir)
    assert point.round == 1
    assert all(point.metrics[f"epsilon/{n}"] <= budget for n in ("alice", "bob", "charlie"))


def test_the_run_description_states_the_guarantee(mnist_dir: Path) -> None:
    from flows.federated import guarantees

    sets = {"data_dir": str(mnist_dir), "privacy.enabled": True, "privacy.noise_multiplier": 1.1}
    text = guarantees(load_config(ROOT / "configs" / "smoke.yaml", sets))
    assert text is not None and text.startswith("**Privacy.** Example-level")
    assert "per device" in text and "dp-accounting" in text and "1.1" in text
    assert guarantees(load_config(ROOT / "configs" / "smoke.yaml", {})) is None
