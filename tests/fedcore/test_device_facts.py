"""A worker's facts about its machine: read from /proc and /sys (a fake root stands in for a
Jetson's), carried in the hello and after each round in the update, and checked on decode like
every other field (bounded, typed, unknown keys refused; absent facts stay absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import BOB_COUNTS

from fedcore import device_facts, protocol, wire
from fedcore.device_facts import RoundProbe, hello_facts, pick_zone
from fedcore.errors import WireError
from fedcore.protocol import Hello, Update
from fedcore.shards import ShardSpec
from fedcore.training import TrainMetrics, TrainPlan
from fedcore.worker import Worker

ORIN = "NVIDIA Jetson Orin Nano Developer Kit"


def _jetson_root(tmp_path: Path) -> Path:
    """The files a Jetson Orin exposes that the facts are read from (values as on one)."""
    root = tmp_path / "jetson"
    (root / "proc" / "device-tree").mkdir(parents=True)
    (root / "proc" / "device-tree" / "model").write_bytes(ORIN.encode() + b"\x00")
    (root / "proc" / "meminfo").write_text("MemTotal:        7802664 kB\nMemFree: 1 kB\n")
    (root / "proc" / "self").mkdir()
    (root / "proc" / "self" / "status").write_text(
        "Name:\tpython3\nVmHWM:\t  614400 kB\nVmRSS:\t  512000 kB\n"
    )
    zones = [("CPU-therm", "48500"), ("GPU-therm", "47000"), ("SOC-therm", "49250")]
    zones.append(("PMIC-Die", "bad"))  # an unreadable sensor, never a temperature
    for i, (kind, milli) in enumerate(zones):
        zone = root / "sys" / "class" / "thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    return root


def test_a_jetsons_facts_are_read_from_its_files(tmp_path: Path) -> None:
    root = _jetson_root(tmp_path)
    facts = hello_facts("cpu", str(root))
    assert facts["jetson_model"] == ORIN
    assert facts["memory_mb"] == "7619"
    assert facts["temp_zone"] == "SOC-therm"  # the SoC's zone over the CPU's and GPU's
    assert facts["torch_func"] == "yes" and facts["threads"] == str(torch.get_num_threads())
    assert not any(k.startswith("cuda") for k in facts)  # a CPU worker never touches CUDA
    assert RoundProbe("cpu", str(root)).facts() == {
        "rss_mb": 500.0,
        "rss_peak_mb": 600.0,
        "temp_c": 49.25,
    }


def test_a_machine_without_those_files_reports_them_absent_not_zero(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    facts = hello_facts("cpu", str(bare))
    assert {"jetson_model", "memory_mb", "temp_zone"}.isdisjoint(facts)
    measured = RoundProbe("cpu", str(bare)).facts()
    assert "temp_c" not in measured and "rss_mb" not in measured
    assert measured["rss_peak_mb"] > 0  # from `resource`, which every Linux has


def test_only_plausible_zones_are_picked(tmp_path: Path) -> None:
    root = _jetson_root(tmp_path)
    (root / "sys/class/thermal/thermal_zone2/temp").write_text("999000\n")  # SoC sensor broken
    zone = pick_zone(str(root))
    assert zone is not None and zone[0] == "CPU-therm"
    for i in range(3):
        (root / f"sys/class/thermal/thermal_zone{i}/temp").write_text("garbage\n")
    assert pick_zone(str(root)) is None


def test_this_machines_worker_says_its_facts_in_hello_and_update(mnist_dir: Path) -> None:
    w = Worker("bob", str(mnist_dir), ShardSpec.by_labels([4, 5, 6]), "cpu")
    meta, _ = wire.decode_frame(w.hello())
    hello = protocol.decode_hello(meta)
    assert hello.label_counts == BOB_COUNTS
    assert hello.facts == device_facts.hello_facts("cpu")
    assert hello.facts["torch_func"] == "yes"  # this checkout's torch has torch.func
    request = protocol.TrainRequest(
        1, TrainPlan(steps=2, batch_size=8, lr=0.1), 7, dict(w.model.state_dict())
    )
    meta, payload = wire.decode_frame(protocol.encode_train(request))
    update = protocol.decode_update(*wire.decode_frame(w.train(meta, payload)))
    assert set(update.device) <= set(protocol.DEVICE_METRICS)
    assert update.device["rss_mb"] > 50 and update.device["rss_peak_mb"] >= update.device["rss_mb"]


# -- on the wire ---------------------------------------------------------------------------------


def _hello(**facts: str) -> Hello:
    return Hello(
        "alice", "train digits 0-3", {0: 5, 1: 6}, "3.8.10", "2.1.0", "cuda", 6, 42, facts=facts
    )


def _hello_meta(hello: Hello) -> dict:
    return wire.decode_frame(protocol.encode_hello(hello))[0]


def test_hello_facts_round_trip_and_an_older_hello_has_none() -> None:
    hello = _hello(cuda_name="Orin", cuda_capability="8.7", cryptography="41.0.7")
    assert protocol.decode_hello(_hello_meta(hello)) == hello
    old = _hello_meta(hello)
    del old["facts"]
    assert protocol.decode_hello(old).facts == {}


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        ({f"k{i}": "v" for i in range(protocol.MAX_FACTS + 1)}, "hello facts has 33 entries"),
        ({"Device": "x"}, "hello facts key 'Device'"),
        ({"a.b": "x"}, "hello facts key 'a.b'"),
        ({"": "x"}, "hello facts key ''"),
        ({"k" * 33: "x"}, "is not a word"),
        ({"caf\u00e9": "x"}, "is not a word"),
        ({"model": 3}, "hello fact model must be a string"),
        ({"model": "x" * 257}, "hello fact model must be a string of at most 256"),
        ([1, 2], "hello facts must be a JSON object"),
    ],
)
def test_hostile_hello_facts_are_refused_by_name(facts: object, message: str) -> None:
    meta = _hello_meta(_hello())
    meta["facts"] = facts
    with pytest.raises(WireError, match=message.replace("(", r"\(").replace(".", r"\.")):
        protocol.decode_hello(meta)


def _update_meta(device: dict) -> tuple[dict, bytes]:
    w = {"fc.weight": torch.zeros(2, 2)}
    u = Update("alice", 3, w, 10, TrainMetrics(0.5, 10, 2, 0.1), device=device)
    return wire.decode_frame(protocol.encode_update(u))


def test_device_metrics_round_trip_and_an_older_update_has_none() -> None:
    device = {"rss_mb": 512.5, "rss_peak_mb": 600.0, "cuda_max_mb": 80.1, "temp_c": 49.25}
    assert protocol.decode_update(*_update_meta(device)).device == device
    meta, payload = _update_meta({})
    assert "device" not in meta["metrics"]  # no facts, not one byte more on the wire
    assert protocol.decode_update(meta, payload).device == {}


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ({"gpu_load": 3.0}, "update device metric 'gpu_load' is unknown"),
        ({"temp_c": 900.0}, "update device metric temp_c must be a finite number in -60.0..200.0"),
        ({"rss_mb": -1}, "update device metric rss_mb must be a finite number"),
        ({"rss_mb": True}, "update device metric rss_mb must be a finite number"),
        ({"rss_mb": "512"}, "update device metric rss_mb must be a finite number"),
        ([512.0], "update device metrics must be a JSON object"),
    ],
)
def test_hostile_device_metrics_are_refused_by_name(device: object, message: str) -> None:
    meta, payload = _update_meta({})
    meta["metrics"]["device"] = device
    with pytest.raises(WireError, match=message.replace("(", r"\(").replace(".", r"\.")):
        protocol.decode_update(meta, payload)
