"""Resume state: written atomically per round, found by folder, name or MLflow run id."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcore.errors import ConfigError
from fedcore.model import initial_weights
from fedcore.resume import find_run_dir, load_resume_point, write_round
from fedcore.strategies.base import StrategyState


def _write(run_dir: Path, rnd: int, seed: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_round(
        run_dir,
        config={"rounds": 5},
        config_path="configs/x.yaml",
        round=rnd,
        weights=initial_weights(seed),
        strategy=StrategyState(
            "fedavgm", {"momentum/fc2.bias": torch.full((10,), float(rnd))}, {"steps": rnd}
        ),
        metrics={"round_seconds": 0.5, "accuracy/federated": 0.9},
        mlflow_run_id="abc123",
        meta={"seed": seed},
    )


def test_latest_round_wins_and_reads_back_exactly(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "20261125-smoke"
    _write(run, 1, seed=1)
    _write(run, 2, seed=2)
    point = load_resume_point(run)
    assert point.round == 2 and point.mlflow_run_id == "abc123"
    assert point.config == {"rounds": 5} and point.config_path == "configs/x.yaml"
    w = initial_weights(2)
    assert all(torch.equal(point.weights[k], w[k]) for k in w)
    assert point.strategy.strategy == "fedavgm" and point.strategy.values == {"steps": 2}
    assert torch.equal(point.strategy.tensors["momentum/fc2.bias"], torch.full((10,), 2.0))
    assert point.metrics["accuracy/federated"] == 0.9
    assert not (run / "strategy-r001.safetensors").exists()  # only the latest state is kept
    assert sorted(p.name for p in run.iterdir()) == [
        "global-r001.safetensors",
        "global-r002.safetensors",
        "state.json",
        "strategy-r002.safetensors",
    ]


def test_found_by_path_name_or_mlflow_run_id(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _write(runs / "a-run", 1, seed=1)
    assert find_run_dir(str(runs / "a-run"), runs) == runs / "a-run"
    assert find_run_dir("a-run", runs) == runs / "a-run"
    assert find_run_dir("abc123", runs) == runs / "a-run"
    with pytest.raises(ConfigError, match="no interrupted training 'zzz'.*MLflow run id"):
        find_run_dir("zzz", runs)


def test_a_folder_without_a_complete_round_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "r"
    _write(run, 1, seed=1)
    (run / "global-r001.safetensors").write_bytes(b"\0" * 7)  # damaged model file
    with pytest.raises(ConfigError, match="no complete round"):
        load_resume_point(run)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_every_rename_of_a_round_is_followed_by_a_fsync_of_its_folder(tmp_path: Path) -> None:
    """Seen by the kernel, not by a spy: strace lists the renames and fsyncs of a real
    `write_round`; the folder is fsynced after the rename of state.json (a crash then cannot
    bring back the previous round's state.json nor lose the new one)."""
    run = (tmp_path / "run").resolve()
    run.mkdir()
    script = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from pathlib import Path\n"
        "from fedcore.model import initial_weights\n"
        "from fedcore.resume import write_round\n"
        "from fedcore.strategies.base import StrategyState\n"
        "write_round(Path(sys.argv[1]), config={}, config_path='', round=1,\n"
        "    weights=initial_weights(1), strategy=StrategyState('mean', {}, {}),\n"
        "    metrics={}, mlflow_run_id=None, meta={})\n"
    )
    proc = subprocess.run(
        ["strace", "-f", "-y", "-e", "trace=fsync,rename,renameat,renameat2", sys.executable]
        + ["-c", script, str(run), str(Path(__file__).resolve().parents[2])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "Operation not permitted" in proc.stderr and "ptrace" in proc.stderr:
        pytest.skip("ptrace is not permitted here")
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = [line for line in proc.stderr.splitlines() if "rename" in line or "fsync(" in line]
    renamed = [i for i, c in enumerate(calls) if "rename" in c and f'{run}/state.json"' in c]
    assert renamed, calls
    after = calls[renamed[-1] + 1 :]
    assert any("fsync(" in c and f"<{run}>" in c for c in after), calls
    for i, c in enumerate(calls):  # each model file too
        if "rename" in c and '.safetensors"' in c:
            assert any(f"<{run}>" in d for d in calls[i + 1 :] if "fsync(" in d), calls
