"""Resume state: written atomically per round, found by folder, name or MLflow run id."""

from __future__ import annotations

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
