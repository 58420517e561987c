"""The trackers: the MLflow one against a real SQLite store in a temporary folder (one migration,
~5-8 s) and a closed port for the unreachable-server path; the null one; the protocol both keep.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tracking_fakes import GROUPS, closed_port, fake_result

from fedcore.checkpoint import save_weights
from fedcore.config import TrackingConfig
from fedcore.model import initial_weights
from tasks.tracking import MlflowTracker, NullTracker, TrackingUnavailable, make_tracker


def test_tracker_on_an_unreachable_server_fails_before_training(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    tracker = MlflowTracker(uri, "federated-mnist")
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


def _train(
    tracker: MlflowTracker,
    tmp: Path,
    name: str,
    correct: list[list[int]],
    description: str | None = None,
) -> str:
    """Fake training: one evaluation per entry of `correct` (federated model's per-digit hits)."""
    tracker.start_run(
        name, {"strategy": "mean"}, {"rounds": str(len(correct))}, {"rounds": 3}, description
    )
    run_id = tracker.ensure_ready(timeout=120)
    for rnd, hits in enumerate(correct, start=1):
        path = save_weights(
            tmp / f"{name}-r{rnd}.safetensors",
            initial_weights(rnd),
            {"model": "fedcore.model.Net", "round": rnd, "strategy": "mean"},
        )
        tracker.log_artifact(path, "models")
        tracker.log_evaluation(
            rnd,
            {"federated": fake_result(hits), "alice": fake_result([10] * 4 + [0] * 6)},
            GROUPS,
            path,
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
    promise = "**Privacy.** Example-level differential privacy, per device"
    run_id = _train(MlflowTracker(uri, "exp"), tmp_path, "one", first, promise)
    client = MlflowClient(uri, registry_uri=uri)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["rounds"] == "3"
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(promise + "\n\n")  # the guarantee first, the chart links after
    assert "accuracy/alice" in note.replace("%2F", "/")
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
    _train(MlflowTracker(uri, "exp"), tmp_path, "two", [[6] * 10])
    assert client.get_registered_model(name).aliases == {"champion": 2, "current": 4}
    leftovers = {"mlflow.db", "mlruns", "mlartifacts"} & {p.name for p in tmp_path.iterdir()}
    assert not leftovers  # MLflow's defaults land in the current directory; ours do not
    assert (store / "mlartifacts" / "exp").is_dir()


def test_both_trackers_keep_the_protocol() -> None:
    import inspect

    from tasks.tracking import Tracker

    calls = [n for n, v in vars(Tracker).items() if inspect.isfunction(v) and n[0] != "_"]
    assert {"start_run", "resume_run", "ensure_ready", "log_evaluation", "close"} <= set(calls)
    for cls in (MlflowTracker, NullTracker):
        for name in calls:
            want = list(inspect.signature(getattr(Tracker, name)).parameters.values())
            got = list(inspect.signature(getattr(cls, name)).parameters.values())
            assert [(p.name, p.kind, p.default, p.annotation) for p in got] == [
                (p.name, p.kind, p.default, p.annotation) for p in want
            ], f"{cls.__name__}.{name}"
        assert cls.enabled is (cls is MlflowTracker)
