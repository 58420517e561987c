"""The smoke training learns, and what the flow reports is the model it wrote.

Runs `fedmnist run configs/smoke.yaml` for 3 rounds of 20 batches of 32 per worker (seed 1, the
seed's label-skewed split alice 0-3, bob 4-6, charlie 7-9, unweighted mean) in a fresh process
with its own FEDMNIST_HOME and PREFECT_HOME, and MLflow off (this test is about the model, not its
record). Then, in this process:
- the federated accuracy the flow reports is far above chance (10%);
- the last round's global model file is not the initial model, nor the round before's;
- scored here with `fedcore.evaluation` on the 10,000 test images, that file gives exactly the
  count the flow reported: a flow that evaluated one model and wrote another (say, the round's
  incoming global weights instead of the aggregate) fails here.
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
from fedcore.evaluation import evaluate
from fedcore.mnist import load_shard
from fedcore.model import build_model, initial_weights
from fedcore.shards import ShardSpec

pytestmark = pytest.mark.slow

SEED = 1
ROUNDS = 3
STEPS = 20
# Measured here (2-core machine): 0.7473 (7473/10000) after round 3, from 0.5285 after round 1
# and 0.7339 after round 2; about 70 s in all. Chance is 0.10 and the initial model scores about
# that. The margin leaves room for other CPUs' float results and still fails a flow that does not
# learn (or learns one worker's digits only: alice's 0-3 are 0.42 of the test set).
MIN_ACCURACY = 0.6
EVALUATOR_THREADS = 2  # configs/smoke.yaml's evaluator: scoring here with the same count of threads
# and the same batches gives the same sums, hence the same predictions.


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> dict:
    base = tmp_path_factory.mktemp("learning")
    env = dict(os.environ, FEDMNIST_HOME=str(base / "home"), PREFECT_HOME=str(base / "prefect"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    summary = base / "summary.json"
    overrides = {
        "data_dir": str(mnist_dir),
        "seed": SEED,
        "train.steps": STEPS,
        "evaluation.workers": "false",
        "tracking.enabled": "false",
    }
    argv = [str(ROOT / ".venv" / "bin" / "fedmnist"), "run", "configs/smoke.yaml"]
    argv += ["--rounds", str(ROUNDS), "--summary-json", str(summary)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(summary.read_text())


@pytest.fixture(scope="module")
def test_set(mnist_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_shard(str(mnist_dir), ShardSpec(split="test"))


def _score(weights: dict[str, torch.Tensor], test_set: tuple[torch.Tensor, torch.Tensor]):
    before = torch.get_num_threads()
    torch.set_num_threads(EVALUATOR_THREADS)
    try:
        return evaluate(build_model(weights, "cpu"), *test_set, groups=[])
    finally:
        torch.set_num_threads(before)


def _model(summary: dict, rnd: int) -> dict[str, torch.Tensor]:
    weights, meta = load_weights(Path(summary["checkpoint_dir"]) / f"global-r{rnd:03d}.safetensors")
    assert meta["round"] == str(rnd)
    return weights


def test_federated_accuracy_is_far_above_chance(trained: dict) -> None:
    assert trained["rounds"] == ROUNDS
    assert trained["final_accuracy"] == trained["evaluations"][str(ROUNDS)]["federated"]
    assert trained["final_accuracy"] > MIN_ACCURACY


def test_last_global_model_is_new(trained: dict) -> None:
    last = _model(trained, ROUNDS)
    for stale in (initial_weights(SEED), _model(trained, ROUNDS - 1)):
        assert set(stale) == set(last)
        assert any(not torch.equal(last[k], stale[k]) for k in last)


def test_written_model_scores_what_the_flow_reported(trained: dict, test_set) -> None:
    result = _score(_model(trained, ROUNDS), test_set)
    assert result.total == 10_000
    assert result.correct == round(trained["final_accuracy"] * result.total)
    # The starting point was chance, so the accuracy above was learned in these rounds.
    assert _score(initial_weights(SEED), test_set).accuracy < 0.2
