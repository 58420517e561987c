"""The record's names: flattened params, run names and the `<quantity>/<model>` metric layout."""

from __future__ import annotations

import pytest
from tracking_fakes import GROUPS, fake_result

from fedcore.model import initial_weights
from fedcore.protocol import Update
from fedcore.strategies import Failure
from fedcore.training import TrainMetrics
from tasks.tracking import eval_metrics, flatten, round_metrics, run_name


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


def test_run_name_leads_with_the_deployment_when_there_is_one() -> None:
    assert run_name("seed", "mean").startswith("seed-mean-")
    assert run_name("seed", "scaffold", "nightly").startswith("nightly-seed-scaffold-")
    assert run_name("seed", "mean", "seed").startswith("seed-mean-")  # no stutter


def test_round_metrics_per_worker_and_totals() -> None:
    w = initial_weights(1)
    updates = [
        Update(
            "alice",
            3,
            w,
            24754,
            TrainMetrics(2.5, 64, 2, 0.25),
            wire_bytes=1000,
            wire_bytes_down=600,
        ),
        Update("bob", 3, w, 17181, TrainMetrics(1.5, 32, 1, 0.5), wire_bytes=3000),
    ]
    out = round_metrics(updates, [Failure("charlie", 3, "timeout", "no reply in 300 s")])
    assert out == {
        "train_loss/alice": 2.5,
        "train_samples/alice": 64,
        "train_seconds/alice": 0.25,
        "wire_bytes/alice": 1000,
        "wire_bytes_down/alice": 600,  # the request, of those 1000 bytes
        "failed/alice": 0,
        "train_loss/bob": 1.5,
        "train_samples/bob": 32,
        "train_seconds/bob": 0.5,
        "wire_bytes/bob": 3000,
        "wire_bytes_down/bob": 0,
        "failed/bob": 0,
        "failed/charlie": 1,
        "workers_ok": 2,
        "workers_failed": 1,
        "round_bytes": 4000,
    }


def test_eval_metrics_are_quantity_slash_model_and_skip_absent_digits() -> None:
    fed = fake_result([10, 9, 8, 7, 6, 5, 4, 3, 2])  # digit 9 absent from this test set
    alice = fake_result([10, 10, 10, 10, 0, 0, 0, 0, 0])
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


def test_a_version_is_final_only_at_its_trainings_last_round() -> None:
    from tasks.tracking.models import training_facts

    params = {"name": "seed", "strategy.name": "mean", "config_hash": "abc", "rounds": "40"}
    assert training_facts(params, "40") == {
        "recipe": "seed",
        "strategy": "mean",
        "config_hash": "abc",
        "training_rounds": "40",
        "final": "true",
    }
    assert training_facts(params, "31")["final"] == "false"
    assert training_facts({}, "3") == {"final": "true"}  # a run without `rounds`: taken as full


def test_champions_rank_by_test_images_then_accuracy_and_refuse_bad_tags() -> None:
    from tasks.tracking.models import rank

    assert rank({"total": "10000", "accuracy": "0.9"}) == (10000, 0.9)
    assert rank({"total": "10000", "accuracy": "0.5"}) > rank({"total": "1000", "accuracy": "1"})
    for bad in ({}, {"total": "-3", "accuracy": "0.9"}, {"total": "20000", "accuracy": "0.9"}):
        assert rank(bad) == (-1, -1.0)
    assert rank({"total": "10000", "accuracy": "nan"}) == (10000, -1.0)
    assert rank({"total": "10000", "accuracy": "1.5"}) == (10000, -1.0)


def test_the_experiment_links_its_runs_ordered_by_federated_accuracy() -> None:
    from tasks.tracking.links import experiment_note, runs_by_accuracy_route

    route = runs_by_accuracy_route("7")
    assert route == (
        "#/experiments/7/runs?orderByKey=metrics.%60accuracy%2Ffederated%60&orderByAsc=false"
    )
    assert f"({route})" in experiment_note("7") and "federated-mnist-cnn" in experiment_note("7")
