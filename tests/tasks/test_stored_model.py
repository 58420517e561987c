"""A tampered model store runs nothing here: `fedmnist models evaluate/export` read only the
version's safetensors file with the local model code.

A real SQLite store with a version registered the way a training registers it; then the stored
model's code and MLmodel are rewritten to write a marker file when loaded (shown to work through
`mlflow.pyfunc.load_model`, the path the command used before), and `fedmnist models evaluate` runs
as a subprocess: no marker, the right accuracy. Damaged weights files give `StoredModelError`
naming the version, the problem and the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
from conftest import ROOT

from fedcore.checkpoint import save_weights
from fedcore.evaluation import evaluate
from fedcore.mnist import load_shard
from fedcore.model import build_model, initial_weights
from fedcore.shards import ShardSpec
from tasks.mlflow_model import SHA_TAG, StoredModelError, load_stored_weights, max_weights_bytes
from tasks.tracking.models import evaluation_facts, log_global_model, register
from tasks.tracking.store import open_store

NAME = "federated-mnist-cnn"


def _register(uri: str, tmp: Path, seed: int, tags: dict[str, str]) -> Any:
    """Log and register the Net of `initial_weights(seed)` as the next version; returns it."""
    client = open_store(uri)
    exp = client.get_experiment_by_name("t")
    exp_id = (
        exp.experiment_id
        if exp is not None
        else client.create_experiment("t", artifact_location=(tmp / "art").as_uri())
    )
    run_id = client.create_run(exp_id).info.run_id
    file = save_weights(tmp / f"w{seed}.safetensors", initial_weights(seed), {"strategy": "mean"})
    model_id, sha = log_global_model(client, exp_id, run_id, 1, file, {"round": "1"})
    client.finalize_logged_model(model_id, "READY")
    number = register(client, NAME, run_id, model_id, {**tags, SHA_TAG: sha}, 0.1, uri)
    return client.get_model_version(NAME, number)


def _model_dir(client: Any, version: Any) -> Path:
    location = client.get_model_version_download_uri(version.name, version.version)
    return Path(unquote(urlparse(location).path))


def _tamper(model_dir: Path, marker: Path) -> None:
    """Make loading the stored model through MLflow write `marker`: code prepended to every
    Python file, and the MLmodel's loader_module pointed at a module of ours."""
    payload = f"open({str(marker)!r}, 'a').write('ran\\n')\n"
    for py in model_dir.rglob("*.py"):
        py.write_text(payload + py.read_text())
    code = model_dir / "code"
    code.mkdir(exist_ok=True)
    (code / "evil_loader.py").write_text(payload + "def _load_pyfunc(path):\n    return None\n")
    mlmodel = model_dir / "MLmodel"
    text = mlmodel.read_text().replace(
        "loader_module: mlflow.pyfunc.model", "loader_module: evil_loader"
    )
    mlmodel.write_text(text.replace("python_function:", "python_function:\n    code: code", 1))


def _fedmnist(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FEDMNIST_HOME=str(home))
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "fedmnist"), *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture()
def store(tmp_path: Path, mnist_dir: Path) -> tuple[str, Any, Any, int]:
    """A store holding version 1 (seed 7), whose `correct` tag is the true score."""
    images, labels = load_shard(str(mnist_dir), ShardSpec(split="test"))
    result = evaluate(build_model(initial_weights(7)), images, labels, [])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = _register(uri, tmp_path, 7, evaluation_facts(1, result, []))
    return uri, open_store(uri), version, result.correct


def test_tampered_code_and_mlmodel_never_run(tmp_path: Path, mnist_dir: Path, store) -> None:
    uri, client, version, correct = store
    model_dir = _model_dir(client, version)
    marker = tmp_path / "MARKER"
    _tamper(model_dir, marker)

    # The tamper works: MLflow's own loader runs it (what `models evaluate` did before).
    probe = (
        "import mlflow.pyfunc, sys\n"
        "try:\n    mlflow.pyfunc.load_model(sys.argv[1])\nexcept Exception:\n    pass\n"
    )
    subprocess.run([sys.executable, "-c", probe, str(model_dir)], capture_output=True, timeout=300)
    assert marker.exists()
    marker.unlink()

    proc = _evaluate_version_1(uri, mnist_dir, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert not marker.exists()
    assert f"Matches the logged accuracy ({correct}/10000)." in out

    exported = tmp_path / "out.safetensors"
    proc = _fedmnist(
        "models", "export", "1", "--tracking-uri", uri, "--out", str(exported), home=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert exported.read_bytes() == (model_dir / "artifacts" / "weights.safetensors").read_bytes()


def _evaluate_version_1(uri: str, mnist_dir: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """`fedmnist models evaluate 1` against the store at `uri`."""
    argv = ["models", "evaluate", "1", "--tracking-uri", uri, "--data-dir", str(mnist_dir)]
    return _fedmnist(*argv, home=home)


def test_a_replaced_weights_file_is_refused_by_its_hash(
    tmp_path: Path, mnist_dir: Path, store
) -> None:
    uri, client, version, _ = store
    stored = _model_dir(client, version) / "artifacts" / "weights.safetensors"
    # Another valid Net: loads fine, but is not what was registered.
    save_weights(stored, initial_weights(99), {"strategy": "mean"})
    with pytest.raises(StoredModelError) as err:
        load_stored_weights(client, uri, version, tmp_path / "dl")
    msg = str(err.value)
    assert f"{NAME} version 1" in msg and "SHA-256" in msg
    assert "changed after registration" in msg and "register the round again" in msg
    assert err.value.transient is False

    proc = _evaluate_version_1(uri, mnist_dir, tmp_path)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "changed after registration" in proc.stderr


def test_missing_oversized_or_invalid_weights_are_typed_errors(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = open_store(uri)
    versions = [_register(uri, tmp_path, seed, {}) for seed in (1, 2, 3)]
    for v in versions:  # drop the hash tag: the file's own checks must catch each case
        client.delete_model_version_tag(NAME, v.version, SHA_TAG)
    missing, huge, bad = (client.get_model_version(NAME, v.version) for v in versions)

    (_model_dir(client, missing) / "artifacts" / "weights.safetensors").unlink()
    with pytest.raises(StoredModelError, match=r"version 1: the store holds no artifacts/weights"):
        load_stored_weights(client, uri, missing, tmp_path / "a")

    big = _model_dir(client, huge) / "artifacts" / "weights.safetensors"
    big.write_bytes(b"\0" * (max_weights_bytes() + 1))
    with pytest.raises(
        StoredModelError, match=r"version 2: weights.safetensors is listed at \d+ bytes, more than"
    ):
        load_stored_weights(client, uri, huge, tmp_path / "b")

    broken = dict(initial_weights(3))
    broken["fc2.weight"] = broken["fc2.weight"][:5]
    save_weights(_model_dir(client, bad) / "artifacts" / "weights.safetensors", broken, {})
    with pytest.raises(StoredModelError) as err:
        load_stored_weights(client, uri, bad, tmp_path / "c")
    assert "version 3: weights.safetensors is not a valid model of this Net" in str(err.value)
    assert "fc2.weight" in str(err.value)

    proc = _fedmnist(
        "models", "export", "1", "--tracking-uri", uri, "--out", str(tmp_path / "x"), home=tmp_path
    )
    assert proc.returncode == 1 and "holds no artifacts/weights.safetensors" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_local_store_links_the_logged_model_and_marks_the_experiment(store) -> None:
    """MLflow's server lists a version on its logged model itself; a local store does not, so
    registration does it (the UI shows the logged model as registered), and the first logged
    model marks the experiment as model training (the UI opens it on its runs)."""
    import json

    _, client, version, _ = store
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": "1"}]
    experiment = client.get_experiment(client.get_run(version.run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Runs by federated accuracy" in experiment.tags["mlflow.note.content"]
    # the version is scored on the whole test set: the champion, and `current` (no rounds param)
    assert version.tags["final"] == "true"
    assert client.get_registered_model(NAME).aliases == {"current": 1, "champion": 1}
