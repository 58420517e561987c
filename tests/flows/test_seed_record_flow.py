"""The seed run's record stays what it was before the framework's costs were cut (issue 14).

Runs `fedmnist run configs/seed.yaml` (40 rounds, 4 local workers, Prefect's temporary server, a
new MLflow SQLite store) in a fresh process and compares what it printed and what it logged with
`test_seed_record_expected.json`, recorded from the run of main before any cost was taken out
(the figures `make run` prints: 39.69/84.50/93.86/95.59/95.85% at rounds 1/11/21/31/40).

Compared: every line the flow printed about the data, the rounds, the evaluations and the final
accuracy (a round's duration masked), every MLflow metric's full history except the wall-clock
ones (`*seconds*`) and the devices' own measurements (`device/<worker>/*`: memory and
temperature, whose values no two runs share; their names are compared), every param except the
data folder (and the config hash, which covers it), the run's tag names, its dataset inputs
(each shard's name, label digest and context), its artifact files and how many logged models it
holds.

To record the file again from a run (only when a change is meant to alter the record):

    .venv/bin/python tests/flows/test_seed_record_flow.py OUT.txt FEDMNIST_HOME RUN_ID
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = Path(__file__).with_name("test_seed_record_expected.json")
PRINTED = re.compile(
    r"Flow run '[^']*' - ("
    r"MNIST dataset .*available numbers on .*"
    r"|Training seed: .*"
    r"|Training round \d+/\d+"
    r"|Evaluating models .*"
    r"|(?:Model update \w+|Federated model): .*"
    r"|Round \d+/\d+ done in .*"
    r"|Final federated model: .*"
    r")$"
)
DURATION = re.compile(r"done in [0-9.]+s")
UNRECORDED_PARAMS = {"data_dir", "config_hash"}  # the test's data folder may differ
# An update's frame carries its training seconds as JSON text, so the bytes moved vary by a few
# characters a worker from run to run; anything more is a change of the wire.
BYTES_SLACK = {"wire_bytes": 64, "round_bytes": 6 * 64}


def printed_lines(output: str) -> list[str]:
    """The flow's lines about data, rounds and evaluations, in order, durations masked."""
    lines = []
    for line in output.splitlines():
        m = PRINTED.search(line)
        if m:
            lines.append(DURATION.sub("done in _s", m.group(1)))
    return lines


def mlflow_record(home: Path, run_id: str) -> dict[str, Any]:
    """What the run logged that does not depend on the clock or the machine's paths."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    run = client.get_run(run_id)
    metrics = {
        key: sorted([m.step, m.value] for m in client.get_metric_history(run_id, key))
        for key in sorted(run.data.metrics)
        if "seconds" not in key and not key.startswith("device/")
    }
    inputs = sorted(
        [i.dataset.name, i.dataset.digest, *sorted(t.value for t in i.tags)]
        for i in (run.inputs.dataset_inputs if run.inputs is not None else [])
    )

    def files(folder: str | None) -> list[str]:
        out: list[str] = []
        for a in client.list_artifacts(run_id, folder):
            out += files(a.path) if a.is_dir else [a.path]
        return out

    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    return {
        "metrics": metrics,
        "params": {k: v for k, v in sorted(run.data.params.items()) if k not in UNRECORDED_PARAMS},
        "tags": sorted(run.data.tags),
        "device_metrics": sorted(k for k in run.data.metrics if k.startswith("device/")),
        "inputs": inputs,
        "artifacts": files(None),
        "logged_models": len(models),
        "status": run.info.status,
    }


pytestmark = pytest.mark.slow


# The same numbers on every x86-64 machine with AVX2: torch picks its CPU kernels by the
# instructions the processor has (ATen's vectorised loops, oneDNN's convolutions, MKL's matrix
# products), and kernels of another width sum in another order, so a model trained on an
# AVX-512 machine differs from one trained on an AVX2 machine in the last bits after a few
# rounds. The run pins all three to AVX2 (the workers inherit the environment): the record is
# then one that any CI machine reproduces exactly.
SAME_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def seed_env(base: Path) -> dict[str, str]:
    """The environment of the seed run: its own homes, no outside servers, the same kernels."""
    env = dict(os.environ, FEDMNIST_HOME=str(base / "home"), PREFECT_HOME=str(base / "prefect"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(SAME_KERNELS)
    return env


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, mnist_dir: Path) -> tuple[dict[str, Any], str, Path]:
    base = tmp_path_factory.mktemp("seed")
    env = seed_env(base)
    summary = base / "summary.json"
    proc = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "fedmnist"),
            "run",
            "configs/seed.yaml",
            "--set",
            f"data_dir={mnist_dir}",
            "--summary-json",
            str(summary),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(summary.read_text()), proc.stdout + proc.stderr, base / "home"


def test_seed_run_prints_todays_lines(seed_run) -> None:
    summary, out, _ = seed_run
    expected = json.loads(EXPECTED.read_text())
    assert printed_lines(out) == expected["printed"]
    assert summary["evaluations"] == expected["evaluations"]


def test_seed_run_started_its_workers_before_the_flow_run(seed_run) -> None:
    """`fedmnist run` starts the local workers while Prefect starts (flows/launch.py): each
    worker's start-up line was written before the flow run began (its own time stamp says so)
    and is shown once, after the flow run's first line, held until there was a run to file it
    under."""
    _, out, _ = seed_run
    stamp = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| INFO +\| (.*)$")
    lines = [m.groups() for m in map(stamp.match, out.splitlines()) if m]
    began = next(i for i, (_, text) in enumerate(lines) if "Beginning flow run" in text)
    for worker in ("alice", "bob", "charlie", "testing"):
        said = [i for i, (_, text) in enumerate(lines) if f"[{worker}] {worker} holds " in text]
        assert len(said) == 1, (worker, said)
        assert said[0] > began
        assert lines[said[0]][0] < lines[began][0], (lines[said[0]], lines[began])


def test_seed_run_logs_todays_mlflow_record(seed_run) -> None:
    summary, _, home = seed_run
    expected = json.loads(EXPECTED.read_text())
    got = mlflow_record(home, summary["mlflow_run_id"])
    assert sorted(got["metrics"]) == sorted(expected["mlflow"]["metrics"])
    for key, history in expected["mlflow"]["metrics"].items():
        slack = next((v for k, v in BYTES_SLACK.items() if key.startswith(k)), 0)
        if not slack:
            assert got["metrics"][key] == history, key
            continue
        assert [s for s, _ in got["metrics"][key]] == [s for s, _ in history], key
        for (step, value), (_, want) in zip(got["metrics"][key], history, strict=True):
            assert abs(value - want) <= slack, (key, step, value, want)
    assert {k: v for k, v in got.items() if k != "metrics"} == {
        k: v for k, v in expected["mlflow"].items() if k != "metrics"
    }


def main(argv: list[str]) -> None:
    """Record the expected file from a finished seed run: its output, FEDMNIST_HOME, run id."""
    out, home, run_id = argv
    summary_evals = None
    summary_file = Path(home).parent / "summary.json"
    if summary_file.is_file():
        summary_evals = json.loads(summary_file.read_text())["evaluations"]
    record = {
        "printed": printed_lines(Path(out).read_text()),
        "evaluations": summary_evals,
        "mlflow": mlflow_record(Path(home), run_id),
    }
    EXPECTED.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
