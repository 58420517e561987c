"""The schedules through the real flow: `fedmnist run` in fresh processes (Prefect's temporary
server, real worker processes), MLflow off (these tests are about who trains what, and when).

- sync: the seed config, 11 rounds, gives bit for bit the model a plain in-process replay of the
  seed's rounds gives (and round 1's recorded 39.69%): the schedule machinery adds nothing to it.
- semi-sync on the paced clock: a device 2.5x slower than the others misses rounds 1 and 2, is
  neither restarted nor lost, and its update joins round 3, 2 versions stale.
- async on the paced clock: resumed after version 4, the training ends with the same weights as
  the one that ran its 8 versions at once.
- async: a device whose worker process is killed mid-training rejoins (the task's retry starts
  it again) and the versions stay consecutive. On the paced clock, so that the others cannot
  finish the training while its program restarts (seconds on a loaded machine). Its Prefect
  `devices` table artifact, read back through Prefect's client from the run's own database, holds
  per device the updates contributed and their staleness, as the run's state records them.
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

from fedcore import timeline
from fedcore.checkpoint import load_weights
from fedcore.config import load_config
from fedcore.mnist import load_shard
from fedcore.model import build_model, initial_weights
from fedcore.protocol import Update
from fedcore.seeding import derive_seed
from fedcore.strategies import build_strategy
from fedcore.training import train_local

pytestmark = pytest.mark.slow

FEDMNIST = str(ROOT / ".venv" / "bin" / "fedmnist")


def _home(tmp_path: Path, mnist_dir: Path) -> Path:
    home = tmp_path / "home"
    (home / "configs").mkdir(parents=True)
    (home / "data").mkdir()
    (home / "data" / "mnist").symlink_to(mnist_dir)
    return home


def _config(home: Path, name: str, schedule: dict, paces: dict, rounds: int, **extra) -> Path:
    """A 3-device config (the seed's split, 2 batches a job), MLflow off."""
    workers = []
    for worker, labels in (("alice", [0, 1, 2, 3]), ("bob", [4, 5, 6]), ("charlie", [7, 8, 9])):
        workers.append({"name": worker, "labels": labels, **paces.get(worker, {})})
    workers.append({"name": "testing", "role": "evaluator", "threads": 2})
    raw = {
        "name": name,
        "seed": 1,
        "rounds": rounds,
        "train": {"steps": 2, "batch_size": 32, "lr": 0.1, "lr_decay": 0.98},
        "strategy": {"name": "mean"},
        "schedule": schedule,
        "evaluation": {"rounds": [rounds], "workers": False},
        "workers": workers,
        "tracking": {"enabled": False},
        **extra,
    }
    path = home / "configs" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(home: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_HOME=str(home / "prefect"))
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [FEDMNIST, "run", *args, "--summary-json", str(home / "summary.json")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run(home: Path, *args: str) -> tuple[dict, str]:
    proc = _start(home, *args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-6000:]
    return json.loads((home / "summary.json").read_text()), out


def _state(summary: dict) -> dict:
    return json.loads((Path(summary["checkpoint_dir"]) / "state.json").read_text())


def test_sync_seed_is_the_plain_replay_of_its_rounds(tmp_path, mnist_dir: Path) -> None:
    home = _home(tmp_path, mnist_dir)
    summary, out = _run(home, "configs/seed.yaml", "--rounds", "11")
    assert "Accuracy: 3969/10000 (39.69%)" in out  # round 1, as recorded before the schedules
    flow_model, _ = load_weights(Path(summary["checkpoint_dir"]) / "global-r011.safetensors")
    cfg = load_config(ROOT / "configs" / "seed.yaml", {"rounds": 11})
    strategy = build_strategy(cfg.strategy)
    shards = {w.name: load_shard(str(mnist_dir), w.shard()) for w in cfg.trainers}
    torch.set_num_threads(1)
    weights = initial_weights(cfg.seed)
    for rnd in range(1, cfg.rounds + 1):
        plan = cfg.train.plan(rnd)
        updates = []
        for name, (images, labels) in shards.items():
            model = build_model(weights)
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, name, rnd))
            metrics = train_local(model, images, labels, plan, gen)
            trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
            updates.append(Update(name, rnd, trained, labels.numel(), metrics))
        weights = strategy.aggregate(rnd, weights, updates, [])
    assert all(torch.equal(flow_model[k], weights[k]) for k in weights)
    rounds = [r["round"] for r in timeline.read(Path(summary["checkpoint_dir"]))]
    assert rounds == list(range(1, 12))


def test_semi_sync_late_device_is_neither_restarted_nor_lost(tmp_path, mnist_dir: Path) -> None:
    home = _home(tmp_path, mnist_dir)
    pace = {"step_seconds": 0.01}
    config = _config(
        home,
        "semi",
        {"mode": "semi-sync", "min_updates": 2, "grace": 0, "clock": "paced"},
        {"alice": pace, "bob": pace, "charlie": {**pace, "slowdown": 2.5}},
        rounds=4,
    )
    summary, out = _run(home, str(config))
    run_dir = Path(summary["checkpoint_dir"])
    # alice and bob take 0.02 s a job, charlie 0.05: rounds close at 0.02 and 0.04 without it;
    # its job from version 0 comes in during round 3 (2 versions stale) and it is given
    # version 2 at once, still training when round 4 closes
    contributed = [r["contributed"] for r in timeline.read(run_dir)]
    assert contributed == [
        {"alice": 1, "bob": 1},
        {"alice": 1, "bob": 1},
        {"charlie": 1, "alice": 1, "bob": 1},
        {"alice": 1, "bob": 1},
    ]
    charlie = _state(summary)["schedule"]["devices"]["charlie"]
    assert (charlie["jobs"], charlie["updates"], charlie["failed"]) == (2, 1, 0)
    assert (charlie["staleness_max"], charlie["dropped_stale"]) == (2, 0)
    assert "Round 1 closes without charlie: still training" in out
    assert "charlie dropped" not in out and "WorkerTimeout" not in out
    assert out.count("[charlie] charlie holds") == 1  # one worker process the whole training


def test_async_resume_gives_the_uninterrupted_weights(tmp_path, mnist_dir: Path) -> None:
    schedule = {"mode": "async", "buffer_size": 2, "clock": "paced"}
    paces = {
        "alice": {"step_seconds": 0.01},
        "bob": {"step_seconds": 0.01, "slowdown": 2},
        "charlie": {"step_seconds": 0.01, "slowdown": 5},
    }
    whole_home = _home(tmp_path / "whole", mnist_dir)
    whole, _ = _run(whole_home, str(_config(whole_home, "buffered", schedule, paces, rounds=8)))
    parts_home = _home(tmp_path / "parts", mnist_dir)
    first, _ = _run(parts_home, str(_config(parts_home, "buffered", schedule, paces, rounds=4)))
    in_flight = _state(first)["schedule"]["jobs"]
    assert any(j["base"] < 4 for j in in_flight), in_flight  # a job crosses the resume
    resumed, out = _run(parts_home, "--resume", first["checkpoint_dir"], "--rounds", "8")
    assert "Resuming buffered after round 4 of 8" in out
    a, _ = load_weights(Path(whole["checkpoint_dir"]) / "global-r008.safetensors")
    b, _ = load_weights(Path(resumed["checkpoint_dir"]) / "global-r008.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    counts = ("jobs", "updates", "staleness_sum", "staleness_max", "dropped_stale", "failed")
    devices = [_state(s)["schedule"]["devices"] for s in (whole, resumed)]
    assert [{w: [d[c] for c in counts] for w, d in x.items()} for x in devices] == [
        {w: [d[c] for c in counts] for w, d in devices[0].items()}
    ] * 2
    contributions = [r["contributed"] for r in timeline.read(Path(whole["checkpoint_dir"]))]
    resumed_ones = [r["contributed"] for r in timeline.read(Path(resumed["checkpoint_dir"]))]
    assert resumed_ones == contributions  # the same arrival order, version by version


def _worker_pid(coordinator: int, name: str) -> int | None:
    """The pid of the coordinator's worker program `name` (a child process)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == coordinator and b"fedcore.worker" in cmdline and name.encode() in cmdline:
            return int(entry.name)
    return None


def test_async_device_killed_rejoins(tmp_path, mnist_dir: Path) -> None:
    home = _home(tmp_path, mnist_dir)
    pace = {"step_seconds": 0.05}
    config = _config(
        home,
        "killed",
        {"mode": "async", "buffer_size": 2, "clock": "paced"},
        {"alice": pace, "bob": pace, "charlie": pace},
        rounds=16,
    )
    proc = _start(home, str(config))
    killed_at = None
    try:
        deadline = time.monotonic() + 300
        while killed_at is None and time.monotonic() < deadline and proc.poll() is None:
            runs = list((home / "runs").glob("*/timeline.jsonl"))
            done = timeline.read(runs[0].parent) if runs else []
            pid = _worker_pid(proc.pid, "charlie")
            if len(done) >= 3 and pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed_at = len(done)
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None, "the training ended before charlie could be killed"
    assert proc.returncode == 0, out[-6000:]
    summary = json.loads((home / "summary.json").read_text())
    records = timeline.read(Path(summary["checkpoint_dir"]))
    assert [r["round"] for r in records] == list(range(1, 17))  # consecutive, none twice
    after = [r for r in records[killed_at:] if "charlie" in r["contributed"]]
    assert after, "charlie never contributed after its worker was killed"
    assert out.count("[charlie] charlie holds") == 2  # started again once
    state = _state(summary)["schedule"]
    assert state["version"] == 16
    applied = sum(d["updates"] for d in state["devices"].values())
    assert applied == state["applied"] == 2 * 16 - 0  # every step took a full buffer of 2

    rows = _devices_artifact(home, "killed-devices")
    for row in rows:  # a job handed out after the last version's state was written is abandoned
        assert row.pop("jobs") >= state["devices"][row["device"]]["jobs"]
    assert rows == [
        {
            "device": name,
            "updates": d["updates"],
            "staleness mean": round(d["staleness_sum"] / d["updates"], 2) if d["updates"] else 0.0,
            "staleness max": d["staleness_max"],
            "dropped (stale)": d["dropped_stale"],
            "failed": d["failed"],
        }
        for name, d in state["devices"].items()
    ]
    assert sum(row["updates"] for row in rows) == 32 and rows[2]["device"] == "charlie"


# Prefect's own client, in a fresh interpreter with the run's PREFECT_HOME: with no
# PREFECT_API_URL it serves the API from that home's database (a temporary server), as the
# training did. Artifact.get returns the key's latest version (the table is re-published as the
# training goes); a table artifact's data is its rows as a JSON string.
_READ_ARTIFACT = """
import json, sys
from prefect.artifacts import Artifact
found = Artifact.get(sys.argv[1])
print("ARTIFACT " + json.dumps(None if found is None else {"type": found.type, "data": found.data}))
"""


def _devices_artifact(home: Path, key: str) -> list[dict]:
    """The rows of the table artifact `key` of the run in `home`, without its idle seconds
    (wall time, which the run's state does not keep rounded the same way)."""
    env = dict(os.environ, PREFECT_HOME=str(home / "prefect"))
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    done = subprocess.run(
        [sys.executable, "-c", _READ_ARTIFACT, key],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("ARTIFACT ")][-1]
    artifact = json.loads(line.removeprefix("ARTIFACT "))
    assert artifact is not None, f"no artifact {key!r} in {home / 'prefect'}"
    assert artifact["type"] == "table"
    rows = json.loads(artifact["data"]) if isinstance(artifact["data"], str) else artifact["data"]
    for row in rows:
        assert row.pop("idle s") >= 0
    return rows
