"""The lab's inventory, `lab-workers.yaml`: one ssh worker per emulated device.

A config names it with `inventory:` (configs/lab.yaml), so it must be exactly what the config
loader accepts. It is therefore built from the config models themselves - a `WorkerConfig`
holding an `SSHConfig` - and dumped from them: an inventory the loader would refuse fails here,
when the lab starts, instead of at the first training.

A device may be slower or steady (`DeviceSpeed`: a worker's `slowdown` and `step_seconds`), for a
heterogeneous fleet on one machine; the entry then carries those fields, and the worker paces
itself (fedcore.pacing). Lab devices log in as their own users, which may not create cgroups, so
a slowed lab device sleeps its pace rather than running under a CPU limit (its hello says so).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class DeviceSpeed:
    """How fast a lab device trains: `slowdown` N (1..1000) and `step_seconds` S, as in a
    worker's config (fedcore.config.WorkerConfig); the defaults are a device as fast as it is."""

    slowdown: float = 1.0
    step_seconds: float | None = None


def ssh_fields(**fields: Any) -> dict[str, Any]:
    """The given SSHConfig fields, validated, as plain values (what `LabHost.ssh` holds).

    Raises:
        LabError: they do not make a valid SSHConfig.
    """
    try:
        return _dump(SSHConfig(**fields))
    except ValidationError as exc:
        raise LabError(f"the lab made an invalid ssh config: {exc}") from None


def worker_config(
    name: str,
    role: str,
    shard: ShardSpec,
    ssh: Mapping[str, Any],
    speed: DeviceSpeed = DeviceSpeed(),
) -> WorkerConfig:
    """The inventory entry of one device: an ssh worker with its role, shard, speed and SSHConfig.

    A device as fast as it is gets no speed fields, so its entry is what it was before they
    existed.

    Raises:
        LabError: the entry would not pass the config loader (e.g. a worker name it refuses, a
            slowdown outside 1..1000).
    """
    fields: dict[str, Any] = {
        "name": name,
        "role": role,
        "transport": "ssh",
        "split": shard.split,
        "labels": list(shard.labels) if shard.labels is not None else None,
    }
    if speed.slowdown != 1.0:
        fields["slowdown"] = speed.slowdown
    if speed.step_seconds is not None:
        fields["step_seconds"] = speed.step_seconds
    fields["ssh"] = dict(ssh)
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
