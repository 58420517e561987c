"""Ten local trainers, two rounds, through `fedmnist run configs/fleet-10.yaml`: the streamed
aggregate (each update folded into a running sum as it arrived) equals the held one.

The same training runs twice in fresh processes, MLflow off: as shipped (screening off, no
worker model scored: the round streams, flows/rounds.py `streams`), and with screening on at a
bound no honest update reaches (`screening.norm_factor: 1e9`: every update is held until the
round ends and screened, none dropped, then `aggregate` averages them). The workers train the
same (seeds derive from the config's seed, worker and round), so both runs' round-1 models must
agree to float32 rounding (the streamed sum adds c_i w_i in float64 and divides once, the held
mean adds (c_i / sum c) w_i: fedcore.strategies.streaming), and round 2's, trained from those,
to a millionth. Each round's timeline line says
which path it took: a streamed round records the seconds it spent folding (`fold`).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from fedcore.checkpoint import load_weights

pytestmark = pytest.mark.slow

ROUNDS = 2
TRAINERS = [f"w{i:02d}" for i in range(10)]


def run_fleet(base: Path, mnist_dir: Path, overrides: dict[str, str]) -> dict:
    env = dict(os.environ, FEDMNIST_HOME=str(base / "home"), PREFECT_HOME=str(base / "prefect"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    summary = base / "summary.json"
    argv = [str(ROOT / ".venv" / "bin" / "fedmnist"), "run", "configs/fleet-10.yaml"]
    argv += ["--rounds", str(ROUNDS), "--summary-json", str(summary)]
    settings = {"data_dir": str(mnist_dir), "tracking.enabled": "false", **overrides}
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(summary.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("fleet")
    return {
        "streamed": run_fleet(base / "streamed", mnist_dir, {}),
        "held": run_fleet(base / "held", mnist_dir, {"screening.norm_factor": "1e9"}),
    }


def timeline(summary: dict) -> list[dict]:
    path = Path(summary["checkpoint_dir"]) / "timeline.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_run_took_its_path_with_every_trainer(runs: dict[str, dict]) -> None:
    for name, summary in runs.items():
        lines = timeline(summary)
        assert [line["round"] for line in lines] == [1, 2]
        for line in lines:
            assert line["updates"] == TRAINERS
            assert ("fold" in line["phases"]) == (name == "streamed")


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference between `a` and `b` in float32 ulps of `b`'s largest value."""
    scale = float(b.abs().max())
    ulp = float(torch.nextafter(torch.tensor(scale), torch.tensor(float("inf"))) - scale)
    return float((a.double() - b.double()).abs().max()) / ulp


def test_streamed_round_models_equal_the_held_ones(runs: dict[str, dict]) -> None:
    models = {
        (name, rnd): load_weights(Path(s["checkpoint_dir"]) / f"global-r{rnd:03d}.safetensors")[0]
        for name, s in runs.items()
        for rnd in range(1, ROUNDS + 1)
    }
    # Round 1, from the same initial model: the two sums round apart by at most one ulp (measured:
    # 1.7% of fc1's weights one ulp apart, the rest equal).
    first, held_first = models["streamed", 1], models["held", 1]
    assert set(first) == set(held_first)
    assert max(ulps(first[k], held_first[k]) for k in held_first) <= 1
    # Round 2 trains from those two models, so the workers' own float sums differ a little too.
    last, held_last = models["streamed", ROUNDS], models["held", ROUNDS]
    assert all(torch.allclose(last[k], held_last[k], rtol=0, atol=1e-6) for k in held_last)
    assert runs["streamed"]["final_accuracy"] == pytest.approx(runs["held"]["final_accuracy"])
