"""The "Jetson lab": emulated devices on loopback, each a real sshd with its own user and shard.

What a fleet of Jetsons gives the ssh transport, on one machine: per device an OpenSSH server
(`/usr/sbin/sshd -f CONFIG -E LOG`) on 127.0.0.1 and its own port, with its own host key, and -
as root - its own Linux user `fedlab-<name>` whose home (mode 700) holds the device's work folder
and its shard, provisioned as idx files holding only that worker's images and readable only by
that user. The coordinator logs in with one lab key pair and verifies every host key against the
lab's own known_hosts file, exactly as it would against real devices. A device's Python is a venv
of Debian's /usr/bin/python3 with torch, outside root's home (mode 700, unusable by other users),
built once and shared by every lab.

`lab_up` writes an inventory (`lab-workers.yaml`) of ssh workers; `lab_down` stops every sshd it
started (by pid, with the processes of its sessions), deletes the users it created and the lab
folder. Without root, every device logs in as the current user (no per-user separation).
Used by the ssh transport's tests and benchmarks; never by a training itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import gzip
import importlib.util
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import FedError
from .mnist import FILES, IMAGE_MAGIC, LABEL_MAGIC, shard_index
from .shards import ShardSpec

log = logging.getLogger("fedcore.lab")

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
SYSTEM_PYTHON = "/usr/bin/python3"
LAB_TORCH = "torch==2.14.1"  # the build this machine kind installs (see the Makefile)
USER_PREFIX = "fedlab-"
STATE_FILE = "lab.json"
INVENTORY_FILE = "lab-workers.yaml"
READY_MARK = ".fedmnist-lab-ready"


class LabError(FedError):
    """The lab could not be set up or torn down; the message says what to do."""


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


# -- small helpers ----------------------------------------------------------------------------


def _run(argv: list[str], what: str, timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{what} failed: {exc}") from None
    if done.returncode != 0:
        raise LabError(
            f"{what} failed (exit status {done.returncode}): {(done.stderr or done.stdout).strip()}"
        )
    return done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _is_root() -> bool:
    return os.geteuid() == 0


def user_name(worker: str) -> str:
    """The Linux user of a lab device: `fedlab-<name>`, sanitised for useradd (32 chars)."""
    clean = re.sub(r"[^a-z0-9_-]", "-", worker.lower())
    return (USER_PREFIX + clean)[:32]


def _proc_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, which a non-reaping init may leave, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children_map(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid and _proc_alive(int(entry.name)):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _proc_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if _proc_alive(p)]
    return left


def _ours(pid: int, config: str) -> bool:
    """Whether `pid` is the sshd we started with `config` (guards against pid reuse)."""
    return pid > 0 and _proc_alive(pid) and config in _cmdline(pid)


def _stop_sshd(pid: int, config: str, hard: bool = False) -> None:
    """Stop our sshd listener and every process of its sessions (workers included)."""
    if not _ours(pid, config):
        return
    family = _descendants(pid)
    _kill(family, signal.SIGKILL)
    _kill([pid], signal.SIGKILL if hard else signal.SIGTERM)
    left = _wait_gone([pid, *family], 5.0)
    if left:
        _kill(left, signal.SIGKILL)
        _wait_gone(left, 2.0)


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


# -- the devices' Python ------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _imports_torch(python: Path) -> bool:
    try:
        done = subprocess.run([str(python), "-c", "import torch"], capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _check_traversable(path: Path, what: str) -> None:
    for parent in [*reversed(path.parents), path]:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise LabError(
                f"{what} {path} lies under {parent} (mode {oct(parent.stat().st_mode & 0o777)}), "
                "which other users cannot enter: put it elsewhere (e.g. under /tmp or /opt)"
            )


def ensure_lab_python(venv: Path | str | None = None, lab_dir: Path | None = None) -> str:
    """The devices' Python interpreter: a venv of /usr/bin/python3 with torch, made once.

    `venv` (else $FEDMNIST_LAB_PYTHON, else `<lab_dir>/../fedmnist-lab-python`) names the venv
    folder, or an existing interpreter to use as it is. Reused when it already imports torch;
    otherwise built (`pip install torch==2.14.1` from the machine's index, about a minute).
    Without root, the current interpreter serves when it has torch.

    Raises:
        LabError: it cannot be built, or other users could not run it.
    """
    chosen = venv or os.environ.get("FEDMNIST_LAB_PYTHON")
    if chosen is None and not _is_root() and importlib.util.find_spec("torch"):
        return sys.executable
    if chosen is None:
        if lab_dir is None:
            raise LabError("give the lab Python's folder (or set FEDMNIST_LAB_PYTHON)")
        chosen = Path(lab_dir).resolve().parent / "fedmnist-lab-python"
    target = Path(chosen).expanduser().absolute()
    if target.is_file():
        if not _imports_torch(target):
            raise LabError(f"{target} cannot import torch: install it there, or name a venv folder")
        return str(target)
    python = target / "bin" / "python"
    with _locked(target.parent / f".{target.name}.lock"):
        ready = (target / READY_MARK).is_file() and python.exists()
        if not ready and python.exists() and _imports_torch(python):
            (target / READY_MARK).write_text(LAB_TORCH + "\n")
            ready = True
        if not ready:
            if target.exists():
                shutil.rmtree(target)
            if not Path(SYSTEM_PYTHON).exists():
                raise LabError(
                    f"{SYSTEM_PYTHON} is missing: apt-get install -y python3 python3-venv"
                )
            log.info(
                "building the lab devices' Python in %s (%s, about a minute)", target, LAB_TORCH
            )
            _run([SYSTEM_PYTHON, "-m", "venv", str(target)], f"creating the venv {target}")
            _run(
                [str(python), "-m", "pip", "install", "-q", LAB_TORCH],
                f"pip install {LAB_TORCH} into {target}",
                timeout=1800,
            )
            if not _imports_torch(python):
                raise LabError(f"{python} still cannot import torch after installing {LAB_TORCH}")
            _run(["chmod", "-R", "a+rX", str(target)], f"making {target} readable")
            (target / READY_MARK).write_text(LAB_TORCH + "\n")
    if _is_root():
        _check_traversable(target, "the lab Python")
    return str(python)


# -- shards -------------------------------------------------------------------------------------


def _read_idx(mnist_dir: Path, name: str) -> bytes:
    for candidate in (mnist_dir / name, mnist_dir / (name + ".gz")):
        if candidate.is_file():
            if candidate.suffix == ".gz":
                with gzip.open(candidate, "rb") as f:
                    return f.read()
            return candidate.read_bytes()
    raise LabError(
        f"{name} is missing in {mnist_dir}: prepare it with `fedmnist data --dir {mnist_dir}`"
    )


class _Split:
    """One MNIST split read once: labels and raw image bytes."""

    def __init__(self, mnist_dir: Path, split: str) -> None:
        img_name, lab_name = FILES[split]
        raw_labels = _read_idx(mnist_dir, lab_name)
        raw_images = _read_idx(mnist_dir, img_name)
        magic, n = struct.unpack(">II", raw_labels[:8])
        magic_i, n_i, rows, cols = struct.unpack(">IIII", raw_images[:16])
        if magic != LABEL_MAGIC or magic_i != IMAGE_MAGIC or n != n_i:
            raise LabError(f"{mnist_dir}: {lab_name}/{img_name} are not matching MNIST idx files")
        self.labels = torch.frombuffer(bytearray(raw_labels[8:]), dtype=torch.uint8)
        self.images = torch.frombuffer(bytearray(raw_images[16:]), dtype=torch.uint8).view(n, -1)
        self.rows, self.cols = rows, cols

    def write(self, index: torch.Tensor, out: Path, split: str) -> None:
        img_name, lab_name = FILES[split]
        n = index.numel()
        labels = self.labels.index_select(0, index)
        images = self.images.index_select(0, index)
        (out / lab_name).write_bytes(struct.pack(">II", LABEL_MAGIC, n) + labels.numpy().tobytes())
        (out / img_name).write_bytes(
            struct.pack(">IIII", IMAGE_MAGIC, n, self.rows, self.cols) + images.numpy().tobytes()
        )


def _provision(split: _Split, spec: ShardSpec, out: Path) -> ShardSpec:
    """Write `spec`'s images as idx files in `out`; returns the spec to launch the worker with."""
    index = shard_index(split.labels.to(torch.int64), spec)
    if index.numel() == 0:
        raise LabError(f"shard {spec.describe()} holds no images")
    split.write(index, out, spec.split)
    if spec.iid_count is not None:
        # The device holds only its part: the worker takes all of what it holds.
        return ShardSpec(split=spec.split)
    return spec


# -- users --------------------------------------------------------------------------------------


def _ensure_user(user: str, home: Path, lab_dir: Path) -> None:
    try:
        existing = pwd.getpwnam(user)
    except KeyError:
        _run(
            [
                "useradd",
                "-M",
                "-d",
                str(home),
                "-s",
                "/bin/sh",
                "-p",
                "*",
                "-c",
                "fedmnist lab device",
                user,
            ],
            f"useradd {user}",
        )
        return
    other_home = Path(existing.pw_dir)
    if other_home.exists() and lab_dir not in other_home.parents:
        raise LabError(
            f"user {user} already exists with home {other_home}: another lab uses it; run lab_down "
            "for that lab, or give this lab's workers other names"
        )
    # A leftover of a lab that died: take it over (its name is in the lab's namespace).
    _run(["usermod", "-d", str(home), "-s", "/bin/sh", "-p", "*", user], f"usermod {user}")


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            os.chown(os.path.join(root, n), uid, gid)


def _remove_user(user: str) -> None:
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return
    pids = _pids_of_uid(uid)  # only lab sessions run as a lab user
    _kill(pids, signal.SIGKILL)
    _wait_gone(pids, 5.0)
    done = subprocess.run(["userdel", user], capture_output=True, text=True)
    if done.returncode not in (0, 6):  # 6: no such user
        log.warning("userdel %s failed: %s", user, done.stderr.strip())


# -- sshd ---------------------------------------------------------------------------------------


def _sshd_version() -> tuple[int, int]:
    done = subprocess.run([SSHD, "-V"], capture_output=True, text=True)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", done.stderr + done.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _sshd_config(host_dir: Path, port: int, user: str, authorized_keys: Path, strict: bool) -> str:
    lines = [
        "# An emulated Jetson of the fedmnist lab (written by fedcore.lab).",
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_dir / 'ssh_host_ed25519_key'}",
        f"PidFile {host_dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized_keys}",
        f"AllowUsers {user}",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin no",
        # Without root the keys file lies outside the user's home, under world-writable /tmp,
        # which StrictModes refuses; with root it sits in the user's own home, checked.
        f"StrictModes {'yes' if strict else 'no'}",
        "AllowTcpForwarding yes",  # a lab device can be a ProxyJump bastion
        "X11Forwarding no",
        "PrintMotd no",
        "PrintLastLog no",
        "Subsystem sftp internal-sftp",
        # Scratch files (torch writes some on import) stay in the device's home, removed with it.
        f"SetEnv TMPDIR={authorized_keys.parent.parent / 'tmp'}",
        "LogLevel VERBOSE",
    ]
    if _sshd_version() >= (9, 8):
        lines.append("PerSourcePenalties no")  # tests fail logins on purpose, from one address
    return "\n".join(lines) + "\n"


def _start_sshd(host_dir: Path, config: Path) -> int:
    """Start a daemonised sshd with `config`; returns its pid once its port answers."""
    port = int(re.search(r"^Port (\d+)$", config.read_text(), re.M).group(1))  # type: ignore[union-attr]
    pid_file = host_dir / "sshd.pid"
    log_file = host_dir / "sshd.log"
    pid_file.unlink(missing_ok=True)
    done = subprocess.run(
        [SSHD, "-f", str(config), "-E", str(log_file)], capture_output=True, text=True, timeout=30
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if done.returncode == 0 and pid_file.is_file() and _port_open(port):
            pid = int(pid_file.read_text().split()[0])
            if _ours(pid, str(config)):
                return pid
        if done.returncode != 0:
            break
        time.sleep(0.02)
    tail = log_file.read_text()[-1500:] if log_file.is_file() else ""
    raise LabError(
        f"sshd with {config} did not start on 127.0.0.1:{port} (exit status {done.returncode}): "
        f"{done.stderr.strip()} {tail.strip()}"
    )


def kill_host(lab_dir: Path, name: str) -> None:
    """Kill one device's sshd and every process of its sessions at once (a device dying)."""
    state = _load_state(Path(lab_dir).resolve())
    host = (state or {}).get("hosts", {}).get(name)
    if host is None:
        raise LabError(f"the lab in {lab_dir} has no device {name!r}")
    _stop_sshd(host["pid"], host["config"], hard=True)


def restart_host(lab_dir: Path, name: str) -> int:
    """Start a device's sshd again (after `kill_host`): same port, host key and user.

    Returns:
        the new sshd's pid (also recorded in the lab's state, so `lab down` stops it).
    """
    lab_dir = Path(lab_dir).resolve()
    state = _load_state(lab_dir)
    host = (state or {}).get("hosts", {}).get(name)
    if state is None or host is None:
        raise LabError(f"the lab in {lab_dir} has no device {name!r}")
    config = Path(host["config"])
    if _ours(host["pid"], str(config)):
        return int(host["pid"])  # still running
    host["pid"] = _start_sshd(config.parent, config)
    _save_state(lab_dir, state)
    return int(host["pid"])


# -- up, status, down ---------------------------------------------------------------------------


def lab_up(
    lab_dir: Path,
    workers: Mapping[str, ShardSpec],
    mnist_dir: Path,
    evaluator: str | None = None,
    python: Path | str | None = None,
) -> LabInfo:
    """Start one emulated device per worker and write the lab's inventory.

    Args:
        lab_dir: folder of the lab (created; replaced when a lab is already there).
        workers: worker name -> its shard (label shards are provisioned as only their digits).
        mnist_dir: MNIST idx files (raw or .gz) to cut the shards from.
        evaluator: the worker with role evaluator (the others are trainers).
        python: the devices' Python venv folder or interpreter (see `ensure_lab_python`).

    Returns:
        LabInfo; its `inventory` is `<lab_dir>/lab-workers.yaml`.

    Raises:
        LabError: sshd or the tools are missing, a user or sshd could not be set up.
    """
    lab_dir = Path(lab_dir).absolute()
    if evaluator is not None and evaluator not in workers:
        raise LabError(f"evaluator {evaluator!r} is not one of the workers {sorted(workers)}")
    if not os.access(SSHD, os.X_OK):
        raise LabError(f"{SSHD} is missing: run scripts/install-sshd.sh (as root)")
    if _load_state(lab_dir) is not None:
        lab_down(lab_dir)  # a lab is already there: replace it
    elif lab_dir.exists() and any(lab_dir.iterdir()):
        raise LabError(f"{lab_dir} exists and is not a lab: give an empty or new folder")
    elif lab_dir.exists():
        lab_dir.rmdir()
    per_user = _is_root()
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
        _check_traversable(lab_dir, "the lab folder")
    state: dict[str, Any] = {"per_user": per_user, "users": [], "hosts": {}}
    _save_state(lab_dir, state)
    try:
        return _lab_up(lab_dir, workers, Path(mnist_dir), evaluator, python, per_user, users, state)
    except BaseException:
        lab_down(lab_dir)
        raise


def _lab_up(
    lab_dir: Path,
    workers: Mapping[str, ShardSpec],
    mnist_dir: Path,
    evaluator: str | None,
    python: Path | str | None,
    per_user: bool,
    users: dict[str, str],
    state: dict[str, Any],
) -> LabInfo:
    interpreter = ensure_lab_python(python, lab_dir)
    key = lab_dir / "client_ed25519"
    _run(
        [
            SSH_KEYGEN,
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "fedmnist-lab-coordinator",
            "-f",
            str(key),
        ],
        "ssh-keygen (client key)",
    )
    pubkey = (lab_dir / "client_ed25519.pub").read_text()
    splits: dict[str, _Split] = {}
    known_lines, hosts = [], {}
    for name, spec in workers.items():
        user = users[name]
        host_dir = lab_dir / "hosts" / name
        home = lab_dir / "home" / name
        host_dir.mkdir(parents=True)
        home.mkdir(parents=True, mode=0o700)
        home.parent.chmod(0o755)
        _run(
            [
                SSH_KEYGEN,
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"fedmnist-lab-{name}",
                "-f",
                str(host_dir / "ssh_host_ed25519_key"),
            ],
            f"ssh-keygen (host key of {name})",
        )
        if per_user:
            _ensure_user(user, home, lab_dir)
            state["users"].append(user)
            _save_state(lab_dir, state)
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "authorized_keys").write_text(pubkey)
        (ssh_dir / "authorized_keys").chmod(0o600)
        (home / "tmp").mkdir(mode=0o700)
        data_dir = home / "data" / "mnist"
        data_dir.mkdir(parents=True, mode=0o700)
        (home / "data").chmod(0o700)
        if spec.split not in splits:
            splits[spec.split] = _Split(mnist_dir, spec.split)
        launch_spec = _provision(splits[spec.split], spec, data_dir)
        for f in data_dir.iterdir():
            f.chmod(0o600)
        if per_user:
            entry = pwd.getpwnam(user)
            _chown_tree(home, entry.pw_uid, entry.pw_gid)
        config = host_dir / "sshd_config"
        pid = 0
        for attempt in range(3):
            port = _free_port()
            config.write_text(
                _sshd_config(host_dir, port, user, ssh_dir / "authorized_keys", strict=per_user)
            )
            try:
                pid = _start_sshd(host_dir, config)
                break
            except LabError:
                if attempt == 2:
                    raise
        state["hosts"][name] = {"pid": pid, "config": str(config), "port": port, "user": user}
        _save_state(lab_dir, state)
        keytype, b64 = (host_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        known_lines.append(f"[127.0.0.1]:{port} {keytype} {b64}\n")
        ssh = {
            "host": "127.0.0.1",
            "port": port,
            "user": user,
            "identity_file": str(key),
            "known_hosts": str(lab_dir / "known_hosts"),
            "python": interpreter,
            "remote_dir": "~/.fedmnist" if per_user else str(home / ".fedmnist"),
            "data_dir": str(data_dir),
        }
        role = "evaluator" if name == evaluator else "trainer"
        hosts[name] = LabHost(
            name, role, launch_spec, user, port, pid, str(home), str(data_dir), ssh
        )
    (lab_dir / "known_hosts").write_text("".join(known_lines))
    inventory = lab_dir / INVENTORY_FILE
    _write_inventory(inventory, hosts)
    state["inventory"] = str(inventory)
    state["hosts"] = {
        n: {
            **state["hosts"][n],
            **{k: v for k, v in asdict(h).items() if k != "shard"},
            "shard": h.shard.to_json(),
        }
        for n, h in hosts.items()
    }
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


def _write_inventory(path: Path, hosts: dict[str, LabHost]) -> None:
    entries = []
    for h in hosts.values():
        entry: dict[str, Any] = {"name": h.name, "role": h.role, "transport": "ssh"}
        entry["split"] = h.shard.split
        if h.shard.labels is not None:
            entry["labels"] = list(h.shard.labels)
        entry["ssh"] = dict(h.ssh)
        entries.append(entry)
    header = (
        "# Emulated Jetsons on loopback, written by fedcore.lab.lab_up: one sshd, user and shard\n"
        "# per worker. `ssh:` holds fedcore.transport.ssh.SSHConfig fields.\n"
    )
    path.write_text(header + yaml.safe_dump({"workers": entries}, sort_keys=False))


def lab_status(lab_dir: Path) -> dict[str, dict[str, Any]]:
    """Per device: user, port, sshd pid, whether that sshd runs and its port answers."""
    state = _load_state(Path(lab_dir).absolute())
    if state is None:
        return {}
    out = {}
    for name, h in state.get("hosts", {}).items():
        running = _ours(h["pid"], h["config"])
        out[name] = {
            "user": h["user"],
            "port": h["port"],
            "pid": h["pid"],
            "running": running,
            "answers": running and _port_open(h["port"]),
        }
    return out


def lab_down(lab_dir: Path) -> dict[str, list[str]]:
    """Stop the lab's sshd servers (and their sessions), delete its users and its folder.

    Only processes it started are stopped (by the pids it recorded, checked against their
    command line), and only users it created are deleted. Fine on a lab that is not there.
    """
    lab_dir = Path(lab_dir).absolute()
    state = _load_state(lab_dir) or {}
    stopped, removed = [], []
    for name, h in state.get("hosts", {}).items():
        if h.get("pid"):
            _stop_sshd(h["pid"], h["config"])
            stopped.append(name)
    for user in state.get("users", []):
        _remove_user(user)
        removed.append(user)
    if (lab_dir / STATE_FILE).exists():
        shutil.rmtree(lab_dir, ignore_errors=True)
    return {"stopped": stopped, "users_removed": removed}
