"""The loopback Jetson lab itself (fedlab), against real sshd: each device holds only its shard,
each device's user reads only its own files, `lab up` twice replaces, `lab down` cleans everything,
and the inventory it writes is a valid fleet."""

from __future__ import annotations

import pwd
import re
import struct
import subprocess
from pathlib import Path

import pytest
from labkit import IS_ROOT, SEED_SHARDS, alive, start_lab

from fedcore.shards import ShardSpec
from fedcore.transport.ssh import SSHConfig, probe
from fedlab import LabInfo, lab_down, lab_status, lab_up, user_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, mnist_dir: Path) -> LabInfo:
    return start_lab(request, "fedmnist-lab-", SEED_SHARDS, mnist_dir, evaluator="testing")


@pytest.fixture
def small_lab(request: pytest.FixtureRequest, mnist_dir: Path) -> LabInfo:
    return start_lab(
        request, "fedmnist-lab-small-", {"dora": ShardSpec.by_labels([0, 1])}, mnist_dir
    )


def cfg(lab: LabInfo, name: str) -> SSHConfig:
    return SSHConfig(**lab.hosts[name].ssh)


def test_each_lab_device_holds_only_its_digits(lab: LabInfo) -> None:
    expected = {"alice": {0, 1, 2, 3}, "bob": {4, 5, 6}, "charlie": {7, 8, 9}}
    for name, digits in expected.items():
        raw = (Path(lab.hosts[name].data_dir) / "train-labels-idx1-ubyte").read_bytes()
        magic, count = struct.unpack(">II", raw[:8])
        assert (magic, count) == (2049, len(raw) - 8)
        assert set(raw[8:]) == digits
    raw = (Path(lab.hosts["testing"].data_dir) / "t10k-labels-idx1-ubyte").read_bytes()
    assert struct.unpack(">II", raw[:8]) == (2049, 10000)


@pytest.mark.skipif(not IS_ROOT, reason="per-device users need root")
def test_each_lab_user_reads_only_its_own_shard(lab: LabInfo) -> None:
    for reader in SEED_SHARDS:
        for owner in SEED_SHARDS:
            host = lab.hosts[owner]
            split = "t10k" if host.shard.split == "test" else "train"
            target = Path(host.data_dir) / f"{split}-labels-idx1-ubyte"
            done = subprocess.run(
                [
                    "su",
                    "-s",
                    "/bin/sh",
                    user_name(reader),
                    "-c",
                    f"head -c 8 {target} | od -An -tx1",
                ],
                capture_output=True,
                text=True,
            )
            if reader == owner:
                assert done.stdout.split()[:4] == ["00", "00", "08", "01"], done.stderr
            else:
                assert "Permission denied" in done.stderr, (reader, owner, done.stdout)


def test_lab_up_twice_replaces_and_lab_down_cleans_everything(
    small_lab: LabInfo, mnist_dir: Path
) -> None:
    lab_dir = small_lab.lab_dir
    old_pid = small_lab.hosts["dora"].pid
    again = lab_up(lab_dir, {"dora": ShardSpec.by_labels([0, 1])}, mnist_dir)
    assert lab_status(lab_dir)["dora"]["running"] and lab_status(lab_dir)["dora"]["answers"]
    assert again.hosts["dora"].pid != old_pid and not alive(old_pid)
    assert probe(cfg(again, "dora"), "dora")["error"] is None
    new_pid = again.hosts["dora"].pid
    summary = lab_down(lab_dir)
    assert summary["stopped"] == ["dora"]
    assert not alive(new_pid) and not lab_dir.exists()
    if IS_ROOT:
        assert summary["users_removed"] == [user_name("dora")]
        with pytest.raises(KeyError):
            pwd.getpwnam(user_name("dora"))
    assert lab_down(lab_dir) == {"stopped": [], "users_removed": []}  # nothing left: fine


def test_inventory_matches_sshconfig_fields(lab: LabInfo) -> None:
    import yaml

    entries = yaml.safe_load(lab.inventory.read_text())["workers"]
    assert [e["name"] for e in entries] == list(SEED_SHARDS)
    roles = {e["name"]: e["role"] for e in entries}
    assert roles == {
        "alice": "trainer",
        "bob": "trainer",
        "charlie": "trainer",
        "testing": "evaluator",
    }
    assert entries[0]["labels"] == [0, 1, 2, 3] and entries[3]["split"] == "test"
    for e in entries:
        c = SSHConfig(**e["ssh"])
        assert c.host == "127.0.0.1" and c.port == lab.hosts[e["name"]].port
        assert re.fullmatch(r"fedlab-\w+", c.user or "") or not IS_ROOT
