"""An evaluator that lies cannot abort a training or pick its champion (issue 12).

The smoke training through the real CLI, with local workers; the evaluator runs
`tests/faults/lying_worker.py` (the real worker with its evaluation replies altered) as its Python.
In round 1 it claims 10^400 correct answers, in round 2 it sends confusion rows of 3 counts: both
are refused where they arrive, the round's scores are skipped with the reason logged, and the
training completes with every round's model written.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lied_to(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[dict, str]:
    base = tmp_path_factory.mktemp("hostile-evaluator")
    wrapper = base / "lying-python"
    wrapper.write_text(
        f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} "
        f'{ROOT / "tests" / "faults" / "lying_worker.py"} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["name"] = "hostile-evaluator"
    cfg["workers"][-1]["python"] = str(wrapper)
    config = base / "hostile.yaml"
    config.write_text(yaml.safe_dump(cfg))
    faults = base / "faults"
    faults.mkdir()
    env = dict(
        os.environ,
        FEDMNIST_HOME=str(base / "home"),
        PREFECT_HOME=str(base / "prefect"),
        FEDMNIST_FAULT_TESTING="inflate@1,shortrow@2",
        FEDMNIST_FAULT_DIR=str(faults),
    )
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    summary = base / "summary.json"
    argv = [str(ROOT / ".venv" / "bin" / "fedmnist"), "run", str(config)]
    argv += ["--summary-json", str(summary), "--set", f"data_dir={mnist_dir}"]
    argv += ["--set", "tracking.enabled=false"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(summary.read_text()), proc.stdout + proc.stderr


def test_the_training_completes_without_the_lying_scores(lied_to: tuple[dict, str]) -> None:
    summary, _ = lied_to
    assert summary["rounds"] == 2
    assert summary["evaluations"] == {}
    assert summary["final_accuracy"] is None
    for rnd in (1, 2):
        assert (Path(summary["checkpoint_dir"]) / f"global-r{rnd:03d}.safetensors").is_file()


def test_each_lie_is_named_in_the_log(lied_to: tuple[dict, str]) -> None:
    _, log = lied_to
    lines = [line for line in log.splitlines() if "evaluation skipped" in line]
    assert len(lines) == 2, log[-4000:]
    assert "Round 1: evaluation skipped: evaluator testing" in lines[0]
    assert "sent a bad frame" in lines[0] and "more than 20 digits" in lines[0]
    assert "Round 2: evaluation skipped: evaluator testing" in lines[1]
    assert "confusion" in lines[1]
    assert all(len(line) < 2000 for line in lines)
