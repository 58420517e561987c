"""The lab's inventory is written through the config models: what it writes, the loader accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedcore.config import WorkerConfig, load_inventory
from fedcore.shards import ShardSpec
from fedcore.transport.ssh import SSHConfig
from fedlab import LabError, user_name
from fedlab.inventory import ssh_fields, worker_config, write_inventory


def _ssh(port: int) -> dict:
    return ssh_fields(
        host="127.0.0.1",
        port=port,
        user="fedlab-alice",
        identity_file="/lab/client_ed25519",
        known_hosts="/lab/known_hosts",
        python="/opt/lab-python/bin/python",
        remote_dir="~/.fedmnist",
        data_dir="/lab/home/alice/data/mnist",
    )


def test_inventory_holds_what_the_lab_set_and_loads_back(tmp_path: Path) -> None:
    workers = [
        worker_config("alice", "trainer", ShardSpec.by_labels([0, 1, 2, 3]), _ssh(2201)),
        worker_config("testing", "evaluator", ShardSpec(split="test"), _ssh(2202)),
    ]
    path = tmp_path / "lab-workers.yaml"
    write_inventory(path, workers)
    entries = yaml.safe_load(path.read_text())["workers"]
    # Every field the lab set - role too, where it is the default - and nothing else.
    assert list(entries[0]) == ["name", "role", "transport", "split", "labels", "ssh"]
    assert list(entries[1]) == ["name", "role", "transport", "split", "ssh"]
    assert entries[0]["ssh"] == _ssh(2201)
    assert list(entries[0]["ssh"]) == [
        "host",
        "port",
        "user",
        "identity_file",
        "known_hosts",
        "python",
        "remote_dir",
        "data_dir",
    ]
    loaded = [WorkerConfig(**e) for e in load_inventory(path)]
    assert loaded == workers
    assert loaded[0].shard() == ShardSpec.by_labels([0, 1, 2, 3])
    assert SSHConfig(**entries[1]["ssh"]).port == 2202


def test_an_entry_the_loader_would_refuse_is_not_written() -> None:
    with pytest.raises(LabError, match="invalid inventory entry for 'al ice'"):
        worker_config("al ice", "trainer", ShardSpec(), _ssh(2201))
    with pytest.raises(LabError, match="invalid ssh config"):
        ssh_fields(host="127.0.0.1", port=70000)


def test_user_names_are_in_the_labs_namespace() -> None:
    assert user_name("Alice.1") == "fedlab-alice-1"
    assert len(user_name("x" * 60)) == 32
