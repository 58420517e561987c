"""A registered model serves itself: `mlflow models serve` in a fresh venv holding only MLflow
(our version) and torch (the Makefile's pin) answers 10 log-probabilities per image, equal to the
local Net's.

The model is logged and registered the way a training does (`log_global_model`, `register`) into
a SQLite store in a temporary folder; the fresh venv cannot import this project, so the Net's code
must travel with the model (`code/fedcore/`). The venv is set-up, not test time: built once per
content hash of what it holds by `scripts/serving_venv.py`, which `make test` runs first.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT

from fedcore.checkpoint import save_weights
from fedcore.mnist import load_shard
from fedcore.model import build_model, initial_weights
from fedcore.shards import ShardSpec
from fedcore.transport.ssh.bundle import import_closure
from tasks import mlflow_model
from tasks.mlflow_model import SHA_TAG
from tasks.tracking.models import ALIAS_CHAMPION, log_global_model, register
from tasks.tracking.store import open_store

NAME = "federated-mnist-cnn"
BUILDER = ROOT / "scripts" / "serving_venv.py"


@pytest.fixture(scope="session")
def serving_venv() -> Path:
    """A fresh venv with only MLflow and torch (and what they need), built by the set-up script
    (`make test` builds it before the suite; here it is reused, or built if missing)."""
    home = Path(os.environ.get("FEDMNIST_HOME", str(ROOT / ".fedmnist")))
    built = subprocess.run(
        [sys.executable, str(BUILDER), "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if built.returncode != 0:
        pytest.skip(built.stderr.strip()[-600:])
    return Path(built.stdout.strip().splitlines()[-1])


# -- the model's contents (fast) -------------------------------------------------------------


def _fedcore_imports(file: Path) -> set[str]:
    tree = ast.parse(file.read_text())
    return {
        node.module.split(".")[1]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedcore.")
    }


def test_the_model_code_is_the_closure_of_what_the_pyfunc_imports() -> None:
    roots = _fedcore_imports(mlflow_model.PYFUNC_CODE)
    assert roots == {"checkpoint", "model"}
    assert sorted(mlflow_model.MODEL_CODE_MODULES) == sorted(["__init__", *import_closure(roots)])


def test_a_saved_model_carries_its_code_example_and_only_loading_requirements(
    tmp_path: Path,
) -> None:
    file = save_weights(tmp_path / "w.safetensors", initial_weights(2), {"round": "4"})
    model_dir = mlflow_model.save(tmp_path / "model", file, metadata={"round": "4"})
    code = sorted(p.name for p in (model_dir / "code" / "fedcore").iterdir())
    assert code == sorted(f"{m}.py" for m in mlflow_model.MODEL_CODE_MODULES)
    reqs = (model_dir / "requirements.txt").read_text().split()
    assert [r.split("=")[0].split(">")[0] for r in reqs] == ["mlflow", "torch", "numpy"], reqs
    assert not any(p.suffix in (".pkl", ".pickle") for p in model_dir.rglob("*"))

    import mlflow.models

    info = mlflow.models.Model.load(str(model_dir))
    assert info.signature is not None
    spec_in = info.signature.inputs.inputs[0]
    spec_out = info.signature.outputs.inputs[0]
    assert (spec_in.type, spec_in.shape) == (np.dtype(np.float32), (-1, 1, 28, 28))
    assert (spec_out.type, spec_out.shape) == (np.dtype(np.float32), (-1, 10))
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    assert np.asarray(example["inputs"], dtype=np.float32).shape == (1, 1, 28, 28)


# -- serving from a fresh venv (slow: builds the venv once) ----------------------------------


def _registered_champion(tmp: Path, weights: dict[str, torch.Tensor]) -> str:
    """A SQLite store under `tmp` whose `federated-mnist-cnn@champion` holds `weights`."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = open_store(uri)
    exp_id = client.create_experiment("serving", artifact_location=(tmp / "art").as_uri())
    run_id = client.create_run(exp_id).info.run_id
    file = save_weights(tmp / "w.safetensors", weights, {"strategy": "fedavg", "round": "3"})
    model_id, sha = log_global_model(client, exp_id, run_id, 3, file, {"round": "3"})
    client.finalize_logged_model(model_id, "READY")
    number = register(client, NAME, run_id, model_id, {SHA_TAG: sha}, 0.5, uri)
    client.set_registered_model_alias(NAME, ALIAS_CHAMPION, number)
    assert str(client.get_registered_model(NAME).aliases[ALIAS_CHAMPION]) == number
    return uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except (urllib.error.URLError, OSError):
        return 0


@contextlib.contextmanager
def _serving(venv: Path, uri: str, cwd: Path) -> Iterator[str]:
    """`mlflow models serve` of the champion from `venv`; yields its base URL, stops it (its
    process group, started here) on the way out."""
    port = _free_port()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(cwd),
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
    }
    cmd = [
        str(venv / "bin" / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{NAME}@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    log = (cwd / "serve.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while _get(f"{base}/ping") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"mlflow models serve did not come up (exit {proc.poll()}):\n"
                    + (cwd / "serve.log").read_text()[-4000:]
                )
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
@pytest.mark.network
def test_a_registered_champion_serves_from_a_venv_with_only_mlflow_and_torch(
    serving_venv: Path, mnist_dir: Path, tmp_path: Path
) -> None:
    python = serving_venv / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import fedcore"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": f"{serving_venv / 'bin'}:/usr/bin:/bin"},  # no PYTHONPATH of ours
    )
    assert "No module named 'fedcore'" in probe.stderr  # the project is not there

    weights = initial_weights(11)
    uri = _registered_champion(tmp_path, weights)
    images, _ = load_shard(str(mnist_dir), ShardSpec(split="test"))
    batch = images[:2].numpy().astype(np.float32)
    with torch.inference_mode():
        expected = build_model(weights).eval()(torch.as_tensor(batch)).numpy()

    with _serving(serving_venv, uri, tmp_path) as base:
        answer = _post(f"{base}/invocations", {"inputs": batch.tolist()})

    got = np.asarray(answer["predictions"], dtype=np.float32)
    assert got.shape == (2, 10)
    assert np.allclose(np.exp(got).sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(got, expected, atol=1e-5)
    assert list(got.argmax(axis=1)) == list(expected.argmax(axis=1))
