"""Device lineage on the coordinator's side: each hello as MLflow tags and its shard as a dataset
input (in a real MLflow SQLite store), per-round device metrics, the run folder's devices.jsonl
(one line per worker process, a restarted worker's new hello appended), `fedmnist report`'s
table of hellos (hostile values escaped) and `workers check`'s facts line.

The end-to-end record of a real training (tags, metrics, inputs through the MLflow server, a
worker's log lines on its task run through Prefect's client) is checked in tests/ui/test_ui.py,
on the training those checks share.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ALICE_COUNTS, CHARLIE_COUNTS

from fedcore import timeline
from fedcore.protocol import Hello, Update
from fedcore.training import TrainMetrics
from flows.devices_cli import facts_line
from tasks.report import build_report
from tasks.tracking.lineage import device_tags, label_digest, log_devices
from tasks.tracking.naming import round_metrics

JETSON = {
    "jetson_model": "NVIDIA Jetson Orin Nano Developer Kit",
    "machine": "aarch64",
    "cpus": "6",
    "memory_mb": "7619",
    "cuda_name": "Orin",
    "cuda_capability": "8.7",
    "cuda_memory_mb": "7619",
    "torch_func": "yes",
    "cryptography": "41.0.7",
    "temp_zone": "SOC-therm",
}


def _hello(
    worker: str, counts: dict[int, int], facts: dict[str, str] | None = None, pid: int = 100
) -> Hello:
    return Hello(
        worker, "train digits", counts, "3.8.10", "2.1.0", "cuda", 6, pid, facts=dict(facts or {})
    )


def test_a_hello_becomes_device_tags_with_its_facts() -> None:
    tags = device_tags("alice", _hello("alice", ALICE_COUNTS, JETSON))
    assert tags["device.alice.python"] == "3.8.10"
    assert tags["device.alice.torch"] == "2.1.0"
    assert tags["device.alice.device"] == "cuda"
    assert tags["device.alice.threads"] == "6"
    assert tags["device.alice.examples"] == str(sum(ALICE_COUNTS.values()))
    assert tags["device.alice.cuda_name"] == "Orin"
    assert tags["device.alice.cuda_capability"] == "8.7"
    assert tags["device.alice.cryptography"] == "41.0.7"
    assert tags["device.alice.torch_func"] == "yes"
    assert tags["device.alice.jetson_model"] == JETSON["jetson_model"]
    # a worker without CUDA or a Jetson has no such tags, rather than empty ones
    plain = device_tags("bob", _hello("bob", {4: 1}, {"machine": "x86_64", "torch_func": "no"}))
    assert not any("cuda" in k or "jetson" in k or "cryptography" in k for k in plain)


def test_the_label_digest_depends_on_the_counts_only() -> None:
    assert label_digest(ALICE_COUNTS) == label_digest(dict(reversed(ALICE_COUNTS.items())))
    assert label_digest(ALICE_COUNTS) != label_digest({**ALICE_COUNTS, 3: 6130})
    assert len(label_digest(ALICE_COUNTS)) == 16


def test_device_metrics_are_logged_per_worker_and_absent_ones_are_absent() -> None:
    w = {"x": torch.zeros(1)}
    updates = [
        Update("alice", 1, w, 9, TrainMetrics(0.5, 9, 1, 0.1), device={"rss_mb": 510.5}),
        Update("bob", 1, w, 9, TrainMetrics(0.5, 9, 1, 0.1), device={"temp_c": 49.25}),
        Update("charlie", 1, w, 9, TrainMetrics(0.5, 9, 1, 0.1)),  # an older worker
    ]
    device = {k: v for k, v in round_metrics(updates, []).items() if k.startswith("device/")}
    assert device == {"device/alice/rss_mb": 510.5, "device/bob/temp_c": 49.25}


def test_hellos_and_shards_in_a_real_mlflow_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("lineage", artifact_location=str(tmp_path / "a"))
    run_id = client.create_run(experiment).info.run_id
    hellos = {
        "alice": _hello("alice", ALICE_COUNTS, JETSON),
        "testing": _hello("testing", CHARLIE_COUNTS),
    }
    log_devices(client, run_id, hellos, ["alice"])
    log_devices(client, run_id, hellos, ["alice"])  # a resumed training says hello again
    run = client.get_run(run_id)
    assert run.inputs is not None
    assert run.data.tags["device.alice.cuda_name"] == "Orin"
    assert run.data.tags["device.testing.python"] == "3.8.10"
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["mnist-alice", "mnist-testing"]  # once each, not twice
    alice = inputs["mnist-alice"]
    assert alice.dataset.digest == label_digest(ALICE_COUNTS)
    assert {t.key: t.value for t in alice.tags}["mlflow.data.context"] == "training"
    profile = json.loads(alice.dataset.profile or "{}")
    assert profile["num_rows"] == sum(ALICE_COUNTS.values())
    assert profile["label_counts"] == {str(k): v for k, v in ALICE_COUNTS.items()}
    testing = inputs["mnist-testing"]
    assert {t.key: t.value for t in testing.tags}["mlflow.data.context"] == "evaluation"


def test_devices_jsonl_holds_each_worker_process_once(tmp_path: Path) -> None:
    first = {"alice": _hello("alice", ALICE_COUNTS, JETSON), "bob": _hello("bob", {4: 3})}
    assert timeline.record_devices(tmp_path, first) == first
    assert timeline.record_devices(tmp_path, first) == {}  # every round after: nothing new
    restarted = {**first, "bob": _hello("bob", {4: 3}, pid=101)}
    assert timeline.record_devices(tmp_path, restarted) == {"bob": restarted["bob"]}
    lines = timeline.read(tmp_path, timeline.DEVICES_FILE)
    assert [(line["worker"], line["pid"]) for line in lines] == [
        ("alice", 100),
        ("bob", 100),
        ("bob", 101),
    ]
    assert lines[0]["facts"] == JETSON and lines[0]["label_counts"]["3"] == ALICE_COUNTS[3]


def test_a_damaged_or_oversized_record_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / timeline.DEVICES_FILE).write_text('{"worker": "a"}\n[1]\n{"worker": "b"}\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        timeline.read(tmp_path, timeline.DEVICES_FILE)
    with pytest.raises(ValueError, match="more than the 10"):
        timeline.read(tmp_path, timeline.DEVICES_FILE, max_bytes=10)
    (tmp_path / timeline.TIMELINE_FILE).write_text('{"round": 1}\n{"round": 2')  # torn last
    assert timeline.read(tmp_path) == [{"round": 1}]


def _run_folder(tmp_path: Path, hellos: list[dict]) -> Path:
    state = {
        "config": {"name": "lineage", "rounds": 1, "workers": [{"name": "alice"}]},
        "round": 1,
        "metrics": {"device/alice/rss_mb": 512.4, "device/alice/temp_c": 49.25},
    }
    (tmp_path / "state.json").write_text(json.dumps(state))
    for line in hellos:
        timeline.append(tmp_path, line, timeline.DEVICES_FILE)
    return tmp_path


def test_the_report_shows_each_devices_hello(tmp_path: Path) -> None:
    hello = timeline.hello_record("alice", _hello("alice", ALICE_COUNTS, JETSON))
    page = build_report(_run_folder(tmp_path, [hello]))
    assert "What each device said it is" in page
    for text in (JETSON["jetson_model"], "Orin (sm 8.7)", "yes (41.0.7)", "3.8.10", "49.2"):
        assert text in page, text
    assert '<td class="num">512</td>' in page


def test_the_report_escapes_a_hostile_hello(tmp_path: Path) -> None:
    evil = {"worker": "<script>x</script>", "python": "<b>3</b>", "facts": {"cuda_name": "<i>"}}
    page = build_report(_run_folder(tmp_path, [evil, {"worker": 7, "facts": [1]}]))
    assert "<script>x" not in page and "<b>3" not in page and "<i> (sm" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page


def test_workers_check_says_what_a_device_is_ready_for() -> None:
    line = facts_line(JETSON)
    assert line.startswith("NVIDIA Jetson Orin Nano Developer Kit, aarch64, 6 CPUs, 7619 MiB")
    assert "secure aggregation ready (cryptography 41.0.7)" in line
    assert "DP-SGD ready" in line
    bare = facts_line({"machine": "aarch64", "cpus": "4", "torch_func": "no"})
    assert "secure aggregation NOT ready (no cryptography)" in bare
    assert "DP-SGD NOT ready (torch without torch.func)" in bare
    assert facts_line({}) == "no device facts (a worker older than this coordinator)"
