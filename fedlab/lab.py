"""Starting, inspecting and stopping a lab: one emulated device per worker, and the lab's state.

`lab_up` gives each worker a host folder (sshd config, host key, log), a home with its shard, a
Linux user when run as root, and a running sshd; it writes the lab's known_hosts and inventory,
where a device given a `DeviceSpeed` is a slower or steady one.
Everything it creates is recorded in `<lab>/lab.json` as it goes, so that `lab_down` - also after
a failed or killed `lab_up` - stops exactly the sshd servers it started and deletes exactly the
users it created. `kill_host` and `restart_host` make one device die and come back, for the fault
tests.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import pwd
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedcore.shards import ShardSpec

from .commands import LabError
from .inventory import INVENTORY_FILE, DeviceSpeed, ssh_fields, worker_config, write_inventory
from .provision import Split, make_home, provision_shard
from .python import ensure_lab_python
from .sshd import (
    HOST_KEY,
    SSHD,
    generate_key,
    known_hosts_line,
    launch_sshd,
    owns,
    port_open,
    start_sshd,
    stop_sshd,
)
from .users import check_traversable, chown_tree, ensure_user, is_root, remove_user, user_name

log = logging.getLogger("fedlab")

STATE_FILE = "lab.json"


@dataclass(frozen=True)
class LabHost:
    """One emulated device."""

    name: str
    role: str  # trainer or evaluator
    shard: ShardSpec  # what to launch the worker with (its data is already only this shard)
    user: str
    port: int
    pid: int  # the sshd listener
    home: str
    data_dir: str  # on the "device"
    ssh: dict[str, Any]  # fields of fedcore.transport.ssh.SSHConfig
    slowdown: float = 1.0  # a slower device (fedcore.pacing); 1: as fast as it is
    step_seconds: float | None = None  # a steady device: seconds per training step (x slowdown)


@dataclass(frozen=True)
class LabInfo:
    """A running lab: where its files are and how to reach each device."""

    lab_dir: Path
    inventory: Path
    known_hosts: Path
    identity_file: Path
    python: str
    per_user: bool  # False without root: every device logs in as the current user
    hosts: dict[str, LabHost]


# -- state --------------------------------------------------------------------------------------


def _load_state(lab_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((lab_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _save_state(lab_dir: Path, state: dict[str, Any]) -> None:
    tmp = lab_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(lab_dir / STATE_FILE)


def _host_state(lab_dir: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    state = _load_state(lab_dir)
    host = (state or {}).get("hosts", {}).get(name)
    if state is None or host is None:
        raise LabError(f"the lab in {lab_dir} has no device {name!r}")
    return state, host


# -- one device dying and coming back -----------------------------------------------------------


def kill_host(lab_dir: Path, name: str) -> None:
    """Kill one device's sshd and every process of its sessions at once (a device dying).

    Raises:
        LabError: the lab has no device `name`.
    """
    _, host = _host_state(Path(lab_dir).resolve(), name)
    stop_sshd(host["pid"], host["config"], hard=True)


def restart_host(lab_dir: Path, name: str) -> int:
    """Start a device's sshd again (after `kill_host`): same port, host key and user.

    Returns:
        the new sshd's pid (also recorded in the lab's state, so `lab down` stops it).

    Raises:
        LabError: the lab has no device `name`, or its sshd does not start.
    """
    lab_dir = Path(lab_dir).resolve()
    state, host = _host_state(lab_dir, name)
    config = Path(host["config"])
    if owns(host["pid"], str(config)):
        return int(host["pid"])  # still running
    host["pid"] = start_sshd(config.parent, config)
    _save_state(lab_dir, state)
    return int(host["pid"])


# -- up, status, down ---------------------------------------------------------------------------


def lab_up(
    lab_dir: Path,
    workers: Mapping[str, ShardSpec],
    mnist_dir: Path,
    evaluator: str | None = None,
    python: Path | str | None = None,
    speeds: Mapping[str, DeviceSpeed] | None = None,
) -> LabInfo:
    """Start one emulated device per worker and write the lab's inventory.

    Args:
        lab_dir: folder of the lab (created; replaced when a lab is already there).
        workers: worker name -> its shard (label shards are provisioned as only their digits).
        mnist_dir: MNIST idx files (raw or .gz) to cut the shards from.
        evaluator: the worker with role evaluator (the others are trainers).
        python: the devices' Python venv folder or interpreter (see `ensure_lab_python`).
        speeds: worker name -> how fast its device trains (default: as fast as it is); the
            inventory entry carries it, so the worker paces itself.

    Returns:
        LabInfo; its `inventory` is `<lab_dir>/lab-workers.yaml`.

    Raises:
        LabError: sshd or the tools are missing, a user or sshd could not be set up.
    """
    lab_dir = Path(lab_dir).absolute()
    if evaluator is not None and evaluator not in workers:
        raise LabError(f"evaluator {evaluator!r} is not one of the workers {sorted(workers)}")
    unknown = sorted(set(speeds or {}) - set(workers))
    if unknown:
        raise LabError(f"speeds for {unknown}, which are not among the workers {sorted(workers)}")
    if not os.access(SSHD, os.X_OK):
        raise LabError(f"{SSHD} is missing: run scripts/install-sshd.sh (as root)")
    if _load_state(lab_dir) is not None:
        lab_down(lab_dir)  # a lab is already there: replace it
    elif lab_dir.exists() and any(lab_dir.iterdir()):
        raise LabError(f"{lab_dir} exists and is not a lab: give an empty or new folder")
    elif lab_dir.exists():
        lab_dir.rmdir()
    per_user = is_root()
    if not per_user:
        log.warning(
            "not root: every lab device logs in as %s (no per-user separation)", getpass.getuser()
        )
    users = {name: user_name(name) if per_user else getpass.getuser() for name in workers}
    if per_user and len(set(users.values())) != len(users):
        raise LabError(f"worker names map to clashing users {users}: rename them")
    if per_user:
        os.makedirs("/run/sshd", exist_ok=True)
    lab_dir.mkdir(parents=True)
    lab_dir.chmod(0o755)
    if per_user:
        check_traversable(lab_dir, "the lab folder")
    state: dict[str, Any] = {"per_user": per_user, "users": [], "hosts": {}}
    _save_state(lab_dir, state)
    try:
        return _lab_up(
            lab_dir, workers, Path(mnist_dir), evaluator, python, users, state, speeds or {}
        )
    except BaseException:
        lab_down(lab_dir)
        raise


def _lab_up(
    lab_dir: Path,
    workers: Mapping[str, ShardSpec],
    mnist_dir: Path,
    evaluator: str | None,
    python: Path | str | None,
    users: dict[str, str],
    state: dict[str, Any],
    speeds: Mapping[str, DeviceSpeed],
) -> LabInfo:
    per_user = bool(state["per_user"])
    interpreter = ensure_lab_python(python, lab_dir)
    key = lab_dir / "client_ed25519"
    generate_key(key, "fedmnist-lab-coordinator", "ssh-keygen (client key)")
    pubkey = (lab_dir / "client_ed25519.pub").read_text()
    splits: dict[str, Split] = {}
    known_lines, hosts = [], {}
    for name, spec in workers.items():
        user = users[name]
        host_dir = lab_dir / "hosts" / name
        home = lab_dir / "home" / name
        host_dir.mkdir(parents=True)
        home.mkdir(parents=True, mode=0o700)
        home.parent.chmod(0o755)
        generate_key(
            host_dir / HOST_KEY, f"fedmnist-lab-{name}", f"ssh-keygen (host key of {name})"
        )
        if per_user:
            ensure_user(user, home, lab_dir)
            state["users"].append(user)
            _save_state(lab_dir, state)
        authorized_keys, data_dir = make_home(home, pubkey)
        if spec.split not in splits:
            splits[spec.split] = Split(mnist_dir, spec.split)
        launch_spec = provision_shard(splits[spec.split], spec, data_dir)
        if per_user:
            entry = pwd.getpwnam(user)
            chown_tree(home, entry.pw_uid, entry.pw_gid)
        config, port, pid = launch_sshd(host_dir, user, authorized_keys, strict=per_user)
        state["hosts"][name] = {"pid": pid, "config": str(config), "port": port, "user": user}
        _save_state(lab_dir, state)
        known_lines.append(known_hosts_line(host_dir, port))
        ssh = ssh_fields(
            host="127.0.0.1",
            port=port,
            user=user,
            identity_file=str(key),
            known_hosts=str(lab_dir / "known_hosts"),
            python=interpreter,
            remote_dir="~/.fedmnist" if per_user else str(home / ".fedmnist"),
            data_dir=str(data_dir),
        )
        role = "evaluator" if name == evaluator else "trainer"
        speed = speeds.get(name, DeviceSpeed())
        hosts[name] = LabHost(
            name,
            role,
            launch_spec,
            user,
            port,
            pid,
            str(home),
            str(data_dir),
            ssh,
            speed.slowdown,
            speed.step_seconds,
        )
    (lab_dir / "known_hosts").write_text("".join(known_lines))
    inventory = lab_dir / INVENTORY_FILE
    write_inventory(
        inventory,
        [
            worker_config(h.name, h.role, h.shard, h.ssh, DeviceSpeed(h.slowdown, h.step_seconds))
            for h in hosts.values()
        ],
    )
    state["inventory"] = str(inventory)
    state["hosts"] = {n: {**state["hosts"][n], **_host_record(h)} for n, h in hosts.items()}
    _save_state(lab_dir, state)
    log.info("lab up in %s: %s", lab_dir, ", ".join(f"{n} on :{h.port}" for n, h in hosts.items()))
    return LabInfo(
        lab_dir=lab_dir,
        inventory=inventory,
        known_hosts=lab_dir / "known_hosts",
        identity_file=key,
        python=interpreter,
        per_user=per_user,
        hosts=hosts,
    )


def _host_record(host: LabHost) -> dict[str, Any]:
    """A device as the state file keeps it (the shard as its JSON text)."""
    return {
        **{k: v for k, v in asdict(host).items() if k != "shard"},
        "shard": host.shard.to_json(),
    }


def lab_status(lab_dir: Path) -> dict[str, dict[str, Any]]:
    """Per device: user, port, sshd pid, whether that sshd runs and its port answers.

    Returns:
        device name -> {user, port, pid, running, answers}; empty when no lab is there.
    """
    state = _load_state(Path(lab_dir).absolute())
    if state is None:
        return {}
    out = {}
    for name, h in state.get("hosts", {}).items():
        running = owns(h["pid"], h["config"])
        out[name] = {
            "user": h["user"],
            "port": h["port"],
            "pid": h["pid"],
            "running": running,
            "answers": running and port_open(h["port"]),
        }
    return out


def lab_down(lab_dir: Path) -> dict[str, list[str]]:
    """Stop the lab's sshd servers (and their sessions), delete its users and its folder.

    Only processes it started are stopped (by the pids it recorded, checked against their
    command line), and only users it created are deleted. Fine on a lab that is not there.

    Returns:
        {"stopped": device names, "users_removed": user names}.
    """
    lab_dir = Path(lab_dir).absolute()
    state = _load_state(lab_dir) or {}
    stopped, removed = [], []
    for name, h in state.get("hosts", {}).items():
        if h.get("pid"):
            stop_sshd(h["pid"], h["config"])
            stopped.append(name)
    for user in state.get("users", []):
        remove_user(user)
        removed.append(user)
    if (lab_dir / STATE_FILE).exists():
        shutil.rmtree(lab_dir, ignore_errors=True)
    return {"stopped": stopped, "users_removed": removed}
