"""The lab's inventory, `lab-workers.yaml`: one ssh worker per emulated device.

A config names it with `inventory:` (configs/lab.yaml), so it must be exactly what the config
loader accepts. It is therefore built from the config models themselves - a `WorkerConfig`
holding an `SSHConfig` - and dumped from them: an inventory the loader would refuse fails here,
when the lab starts, instead of at the first training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedcore.config import WorkerConfig
from fedcore.shards import ShardSpec
from fedcore.transport.ssh import SSHConfig

from .commands import LabError

INVENTORY_FILE = "lab-workers.yaml"
HEADER = (
    "# Emulated Jetsons on loopback, written by fedlab.lab_up: one sshd, user and shard\n"
    "# per worker. `ssh:` holds fedcore.transport.ssh.SSHConfig fields.\n"
)


def ssh_fields(**fields: Any) -> dict[str, Any]:
    """The given SSHConfig fields, validated, as plain values (what `LabHost.ssh` holds).

    Raises:
        LabError: they do not make a valid SSHConfig.
    """
    try:
        return _dump(SSHConfig(**fields))
    except ValidationError as exc:
        raise LabError(f"the lab made an invalid ssh config: {exc}") from None


def worker_config(name: str, role: str, shard: ShardSpec, ssh: Mapping[str, Any]) -> WorkerConfig:
    """The inventory entry of one device: an ssh worker with its role, shard and SSHConfig.

    Raises:
        LabError: the entry would not pass the config loader (e.g. a worker name it refuses).
    """
    fields = {
        "name": name,
        "role": role,
        "transport": "ssh",
        "split": shard.split,
        "labels": list(shard.labels) if shard.labels is not None else None,
        "ssh": dict(ssh),
    }
    try:
        return WorkerConfig.model_validate(fields)  # as the config loader reads an entry
    except ValidationError as exc:
        raise LabError(f"the lab made an invalid inventory entry for {name!r}: {exc}") from None


def write_inventory(path: Path, workers: Iterable[WorkerConfig]) -> None:
    """Write `workers` as an inventory file: a mapping with `workers:`, only the fields given."""
    entries = []
    for worker in workers:
        entry = _dump(worker)
        entry["ssh"] = entry.pop("ssh")  # last: a reader sees name, role and shard first
        entries.append(entry)
    path.write_text(HEADER + yaml.safe_dump({"workers": entries}, sort_keys=False))


def _dump(model: WorkerConfig | SSHConfig) -> dict[str, Any]:
    # Only the fields the lab set: role stays even where it is the default, and nothing is None.
    return model.model_dump(mode="json", exclude_unset=True, exclude_none=True)
