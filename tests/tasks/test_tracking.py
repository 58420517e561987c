"""The MLflow record's parts: names, URIs, metric layout, figures, the pyfunc model, the tracker.

The tracker tests use a real SQLite store in a temporary folder (one migration, ~5-8 s) and a
closed port for the unreachable-server path.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pytest
import torch

from fedcore.checkpoint import save_weights
from fedcore.config import TrackingConfig
from fedcore.evaluation import EvalResult
from fedcore.model import build_model, initial_weights
from fedcore.protocol import Update
from fedcore.strategies import Failure
from fedcore.training import TrainMetrics
from tasks import figures, mlflow_model
from tasks.tracking import (
    NullTracker,
    Tracker,
    TrackingUnavailable,
    artifact_root_for,
    check_server,
    eval_metrics,
    flatten,
    make_tracker,
    metric_chart_url,
    resolve_tracking_uri,
    round_metrics,
    run_name,
)

GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def _result(correct_per_digit: list[int], per_digit: int = 10) -> EvalResult:
    """A result over `per_digit` images of each digit; misses are predicted as digit 0 (or 1)."""
    confusion = [[0] * 10 for _ in range(10)]
    for d, ok in enumerate(correct_per_digit):
        confusion[d][d] = ok
        confusion[d][1 if d == 0 else 0] += per_digit - ok
    total = per_digit * len(correct_per_digit)
    preds = [sum(confusion[t][p] for t in range(10)) for p in range(10)]
    shares = [sum(preds[d] for d in g) / total for g in GROUPS]
    return EvalResult(
        correct=sum(correct_per_digit),
        total=total,
        loss=0.5,
        seed_loss=0.004,
        confusion=confusion,
        group_shares=shares,
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- names and places ---------------------------------------------------------------------


def test_flatten_names_workers_and_nests_sections() -> None:
    raw = {
        "rounds": 3,
        "train": {"lr": 0.1, "steps": 2},
        "workers": [{"name": "alice", "labels": [0, 1]}, {"name": "bob", "role": "trainer"}],
        "note": "x" * 7000,
    }
    out = flatten("", raw, {})
    assert out["rounds"] == "3" and out["train.lr"] == "0.1" and out["train.steps"] == "2"
    assert out["workers.alice.labels"] == "[0, 1]" and out["workers.bob.role"] == "trainer"
    assert len(out["note"]) == 6000  # MLflow's param value limit


def test_tracking_uri_config_beats_env_beats_default(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDMNIST_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None) == "http://env:5000"
    assert resolve_tracking_uri("http://config:5000") == "http://config:5000"


def test_sqlite_artifacts_go_beside_the_database_and_servers_decide() -> None:
    assert artifact_root_for("sqlite:////data/x/mlflow.db") == Path("/data/x/mlartifacts")
    assert artifact_root_for("http://127.0.0.1:5000") is None


def test_run_name_leads_with_the_deployment_when_there_is_one() -> None:
    assert run_name("seed", "mean").startswith("seed-mean-")
    assert run_name("seed", "scaffold", "nightly").startswith("nightly-seed-scaffold-")
    assert run_name("seed", "mean", "seed").startswith("seed-mean-")  # no stutter


# -- metric layout --------------------------------------------------------------------------


def test_round_metrics_per_worker_and_totals() -> None:
    w = initial_weights(1)
    updates = [
        Update("alice", 3, w, 24754, TrainMetrics(2.5, 64, 2, 0.25), wire_bytes=1000),
        Update("bob", 3, w, 17181, TrainMetrics(1.5, 32, 1, 0.5), wire_bytes=3000),
    ]
    out = round_metrics(updates, [Failure("charlie", 3, "timeout", "no reply in 300 s")])
    assert out == {
        "train_loss/alice": 2.5,
        "train_samples/alice": 64,
        "train_seconds/alice": 0.25,
        "wire_bytes/alice": 1000,
        "failed/alice": 0,
        "train_loss/bob": 1.5,
        "train_samples/bob": 32,
        "train_seconds/bob": 0.5,
        "wire_bytes/bob": 3000,
        "failed/bob": 0,
        "failed/charlie": 1,
        "workers_ok": 2,
        "workers_failed": 1,
        "round_bytes": 4000,
    }


def test_eval_metrics_are_quantity_slash_model_and_skip_absent_digits() -> None:
    fed = _result([10, 9, 8, 7, 6, 5, 4, 3, 2])  # digit 9 absent from this test set
    alice = _result([10, 10, 10, 10, 0, 0, 0, 0, 0])
    out = eval_metrics({"federated": fed, "alice": alice}, GROUPS)
    assert out["accuracy/federated"] == pytest.approx(54 / 90)
    assert out["accuracy/alice"] == pytest.approx(40 / 90)
    assert out["digit_1_accuracy/federated"] == pytest.approx(0.9)
    assert "digit_9_accuracy/federated" not in out
    assert out["share_0-3/alice"] == pytest.approx(1.0) and out["share_7-9/alice"] == 0.0
    assert {k.split("/")[0] for k in out} == {
        "accuracy",
        "loss",
        "seed_loss",
        "share_0-3",
        "share_4-6",
        "share_7-9",
        *(f"digit_{d}_accuracy" for d in range(9)),
    }


def test_metric_chart_url_plots_every_key_on_one_chart() -> None:
    keys = ["accuracy/federated", "accuracy/alice", "accuracy/bob"]
    url = metric_chart_url("7", "abc123", keys)
    assert url.startswith("#/metric?")
    q = {k: v[0] for k, v in parse_qs(url.split("?", 1)[1]).items()}
    assert json.loads(q["plot_metric_keys"]) == keys
    assert json.loads(q["runs"]) == ["abc123"] and json.loads(q["experiments"]) == ["7"]
    assert q["x_axis"] == "step"


# -- figures ------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_figures_are_png_files(tmp_path: Path) -> None:
    history = {1: {"federated": 0.1, "alice": 0.2}, 11: {"federated": 0.9, "alice": 0.4}}
    acc = figures.save_png(figures.accuracy_by_round(history), tmp_path / "a.png")
    conf = figures.save_png(
        figures.confusion_matrix(_result([9] * 10).confusion, "round 40"), tmp_path / "c.png"
    )
    shares = figures.save_png(
        figures.group_shares({"federated": [0.4, 0.3, 0.3], "bob": [0, 1, 0]}, GROUPS, "r40"),
        tmp_path / "s.png",
    )
    assert _png_size(acc) == (700, 420)
    assert _png_size(conf) == (560, 500)
    assert _png_size(shares) == (700, 420)


# -- the pyfunc model -----------------------------------------------------------------------


def test_pyfunc_loads_the_safetensors_file_and_predicts(tmp_path: Path) -> None:
    weights = initial_weights(7)
    file = save_weights(tmp_path / "w.safetensors", weights, {"round": 3, "strategy": "mean"})
    model_dir = mlflow_model.save(tmp_path / "model", file, metadata={"round": 3})
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert "artifacts/weights.safetensors" in files and "mlflow_model.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    reqs = (model_dir / "requirements.txt").read_text().split()
    assert "torch>=2.1" in reqs and any(r.startswith("federated-mnist==") for r in reqs)

    loaded = mlflow_model.load(model_dir)
    assert loaded.metadata["strategy"] == "mean"
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = build_model(weights).eval()(x).detach().numpy()
    got = loaded.predict(None, x.numpy())
    assert got.shape == (5, 10) and np.array_equal(got, expected)

    import mlflow.pyfunc

    pyfunc = mlflow.pyfunc.load_model(str(model_dir))  # through the signature check
    assert np.array_equal(pyfunc.predict(x.numpy()), expected)


def test_pyfunc_refuses_weights_of_another_shape(tmp_path: Path) -> None:
    bad = dict(initial_weights(1))
    bad["fc2.weight"] = torch.zeros(3, 500)
    file = save_weights(tmp_path / "bad.safetensors", bad, {})
    model_dir = mlflow_model.save(tmp_path / "model", file, metadata={})
    with pytest.raises(Exception, match="fc2.weight"):
        mlflow_model.load(model_dir)


# -- the tracker ----------------------------------------------------------------------------


def test_a_closed_port_is_named_with_the_fix() -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    started = time.perf_counter()
    with pytest.raises(TrackingUnavailable) as err:
        check_server(uri)
    assert time.perf_counter() - started < 6
    assert uri in str(err.value) and "mlflow server" in str(err.value)
    assert "tracking.enabled=false" in str(err.value)


def test_tracker_on_an_unreachable_server_fails_before_training(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    tracker = Tracker(uri, "federated-mnist")
    tracker.start_run("r", {}, {"rounds": "3"})
    tracker.log_metrics({"lr": 0.1}, step=1)  # queued behind the failed start: skipped
    with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")):
        tracker.ensure_ready()
    started = time.perf_counter()
    errors = tracker.close("FAILED")
    assert time.perf_counter() - started < 5
    assert errors and uri in errors[0]


def test_disabled_tracking_is_a_null_tracker() -> None:
    tracker = make_tracker(TrackingConfig(enabled=False))
    assert isinstance(tracker, NullTracker)
    tracker.start_run("r", {}, {})
    tracker.ensure_ready()
    tracker.log_metrics({"a": 1.0}, step=1)
    assert tracker.close() == [] and tracker.run_url("http://x") is None


def _train(tracker: Tracker, tmp: Path, name: str, correct: list[list[int]]) -> str:
    """Fake training: one evaluation per entry of `correct` (federated model's per-digit hits)."""
    tracker.start_run(name, {"strategy": "mean"}, {"rounds": str(len(correct))}, {"rounds": 3})
    run_id = tracker.ensure_ready(timeout=120)
    for rnd, hits in enumerate(correct, start=1):
        path = save_weights(
            tmp / f"{name}-r{rnd}.safetensors",
            initial_weights(rnd),
            {"model": "fedcore.model.Net", "round": rnd, "strategy": "mean"},
        )
        tracker.log_artifact(path, "models")
        tracker.log_evaluation(
            rnd, {"federated": _result(hits), "alice": _result([10] * 4 + [0] * 6)}, GROUPS, path
        )
        tracker.log_metrics({"lr": 0.1, "round_seconds": 1.0}, step=rnd)
    assert tracker.close() == []
    return run_id


def test_tracker_logs_links_registers_and_moves_aliases(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    first = [[5] * 10, [7] * 10, [6] * 10]  # accuracies 0.5, 0.7, 0.6
    run_id = _train(Tracker(uri, "exp"), tmp_path, "one", first)
    client = MlflowClient(uri, registry_uri=uri)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["rounds"] == "3"
    assert "accuracy/alice" in run.data.tags["mlflow.note.content"].replace("%2F", "/")
    acc = client.get_metric_history(run_id, "accuracy/federated")
    assert sorted((m.step, m.value) for m in acc) == [(1, 0.5), (2, 0.7), (3, 0.6)]
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "models", "figures"} <= arts
    figs = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert figs == {
        "figures/accuracy_by_round.png",
        "figures/confusion_federated_r003.png",
        "figures/group_shares_r003.png",
    }
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    by_round = {int(m.params["round"]): m for m in models}
    assert sorted(by_round) == [1, 2, 3]
    linked = {m.key: (m.step, m.value) for m in by_round[2].metrics}
    assert linked["accuracy/federated"] == (2, 0.7) and "accuracy/alice" not in linked

    name = "federated-mnist-cnn"
    versions = {v.version: v for v in client.search_model_versions(f"name='{name}'")}
    assert {int(v): versions[v].tags["round"] for v in versions} == {1: "1", 2: "2", 3: "3"}
    assert client.get_registered_model(name).aliases == {"champion": 2, "current": 3}

    # A second training, worse than the champion: `current` moves, `champion` stays.
    _train(Tracker(uri, "exp"), tmp_path, "two", [[6] * 10])
    assert client.get_registered_model(name).aliases == {"champion": 2, "current": 4}
    leftovers = {"mlflow.db", "mlruns", "mlartifacts"} & {p.name for p in tmp_path.iterdir()}
    assert not leftovers  # MLflow's defaults land in the current directory; ours do not
    assert (store / "mlartifacts" / "exp").is_dir()
