"""The ssh transport end to end, against real OpenSSH servers: the loopback Jetson lab.

Every device is an sshd on 127.0.0.1 with its own host key, Linux user and shard (fedlab).
Nothing is mocked: host keys, logins, the agentless bootstrap over SFTP and the worker program all
run for real. Skipped, with the reason, where sshd cannot be installed or started.

Over 400 lines on purpose: every test shares one module-wide lab (four sshd devices, their users
and shards), so splitting the module would build the lab twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pydantic
import pytest
import torch
from labkit import IS_ROOT, SEED_SHARDS, start_lab
from waiting import wait_until

from fedcore.errors import HostKeyMismatch, WorkerFailed, WorkerTimeout, WorkerUnreachable
from fedcore.model import initial_weights
from fedcore.protocol import TrainRequest
from fedcore.seeding import derive_seed
from fedcore.session import WorkerSession
from fedcore.shards import ShardSpec
from fedcore.strategies import build_strategy
from fedcore.training import TrainPlan
from fedcore.transport.base import WorkerLaunch
from fedcore.transport.local import LocalTransport
from fedcore.transport.ssh import (
    WORKER_MODULES,
    ChangedHostKey,
    RemoteSetupError,
    RevokedHostKey,
    SSHAuthFailed,
    SSHConfig,
    SSHPipe,
    SSHTransport,
    UnknownHostKey,
    UnprotectedPrivateKey,
    UnsupportedKnownHosts,
    code_bundle,
    connect,
    fetch_host_key,
    probe,
    trust,
    worker_modules,
)
from fedlab import LabInfo, kill_host, lab_status

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRAINERS = ("alice", "bob", "charlie")


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, mnist_dir: Path) -> LabInfo:
    return start_lab(request, "fedmnist-lab-", SEED_SHARDS, mnist_dir, evaluator="testing")


def cfg(lab: LabInfo, name: str, **changes) -> SSHConfig:
    return SSHConfig(**{**lab.hosts[name].ssh, **changes})


def launch(lab: LabInfo, name: str, data_dir: str | None = None) -> WorkerLaunch:
    host = lab.hosts[name]
    return WorkerLaunch(name, data_dir or host.data_dir, host.shard, threads=1)


@contextmanager
def sessions(launches_and_transports) -> Iterator[list[WorkerSession]]:
    opened = [WorkerSession(lch, tr) for lch, tr in launches_and_transports]
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


def _fingerprint_by_openssh(pub: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[1]


# -- the happy path -----------------------------------------------------------------------------


def test_hello_over_ssh_reports_alices_exact_counts(lab: LabInfo) -> None:
    # "~/..." is the device's home: the transport expands it there, not here.
    with sessions([(launch(lab, "alice", "~/data/mnist"), SSHTransport(cfg(lab, "alice")))]) as (
        s,
    ):
        hello = s.hello(timeout=120)
    assert hello.worker == "alice"
    assert hello.label_counts == {0: 5923, 1: 6742, 2: 5958, 3: 6131}
    assert hello.shard == "train digits 0-3"
    assert hello.threads == 1


def _three_rounds(sessions_: list[WorkerSession]) -> list[dict[str, torch.Tensor]]:
    """The seed's loop for 3 rounds; the global weights after each round."""
    strategy = build_strategy("mean")
    weights = initial_weights(1)
    history = []
    with ThreadPoolExecutor(len(sessions_)) as pool:
        for r in range(1, 4):
            plan = TrainPlan(lr=0.1 * 0.98 ** (r - 1))

            def train(s: WorkerSession, r: int = r, plan: TrainPlan = plan, w=weights):
                return s.train(TrainRequest(r, plan, derive_seed(1, s.name, r), w), timeout=120)

            updates = list(pool.map(train, sessions_))
            weights = strategy.aggregate(r, weights, updates, [])
            history.append(weights)
    return history


def test_three_rounds_over_ssh_equal_local_exactly(lab: LabInfo, mnist_dir: Path) -> None:
    local = LocalTransport()
    over_ssh = [(launch(lab, n), SSHTransport(cfg(lab, n))) for n in TRAINERS]
    here = [(WorkerLaunch(n, str(mnist_dir), SEED_SHARDS[n], threads=1), local) for n in TRAINERS]
    with sessions(over_ssh + here) as everyone:
        with ThreadPoolExecutor(len(everyone)) as pool:  # six start-ups overlap
            list(pool.map(lambda s: s.hello(timeout=180), everyone))
        ssh_history = _three_rounds(everyone[:3])
        local_history = _three_rounds(everyone[3:])
    start = initial_weights(1)
    for r, (a, b) in enumerate(zip(ssh_history, local_history, strict=True), start=1):
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"round {r}: {k} differs between ssh and local"
        assert not torch.equal(a["fc2.weight"], start["fc2.weight"])  # it did train


# -- the agentless bootstrap ----------------------------------------------------------------------


def test_bootstrap_uploads_once_then_skips(lab: LabInfo) -> None:
    c = cfg(lab, "bob", remote_dir="~/.fedmnist-bootstrap-test")
    code_root = Path(lab.hosts["bob"].home) / ".fedmnist-bootstrap-test" / "code"
    version, files = code_bundle()
    # An interrupted upload leaves only a temporary folder, which never counts as complete.
    stale = code_root / f".tmp-{version}-dead"
    stale.mkdir(parents=True)
    (stale / "half").write_text("x")
    shutil.chown(code_root.parent, lab.hosts["bob"].user)
    shutil.chown(code_root, lab.hosts["bob"].user)
    shutil.chown(stale, lab.hosts["bob"].user)

    first = SSHTransport(c, "bob").bootstrap()
    assert first.uploaded is True and first.version == version
    marker = code_root / version / ".complete"
    stamp = marker.stat().st_mtime_ns
    second = SSHTransport(c, "bob").bootstrap()
    assert second.uploaded is False and second.code_dir == first.code_dir
    assert marker.stat().st_mtime_ns == stamp
    shipped = sorted(
        p.relative_to(code_root / version).as_posix() for p in (code_root / version).rglob("*.py")
    )
    assert shipped == sorted(files)
    assert [p.name for p in code_root.iterdir() if p.name.startswith(".tmp-") and p != stale] == []
    if IS_ROOT:
        assert pwd.getpwuid(marker.stat().st_uid).pw_name == lab.hosts["bob"].user


def test_worker_modules_list_is_complete() -> None:
    # The constant names every fedcore module the worker imports, transitively.
    assert set(worker_modules()) == set(WORKER_MODULES)


# -- ProxyJump and probe/trust ----------------------------------------------------------------


def test_alias_with_proxyjump_through_another_device(lab: LabInfo, tmp_path: Path) -> None:
    alice, bob = lab.hosts["alice"], lab.hosts["bob"]
    conf = tmp_path / "ssh_config"
    conf.write_text(
        f"Host lab-bob\n  HostName 127.0.0.1\n  Port {bob.port}\n  User {bob.user}\n"
        f"  IdentityFile {lab.identity_file}\n  ProxyJump {alice.user}@127.0.0.1:{alice.port}\n"
    )
    c = SSHConfig(
        alias="lab-bob",
        ssh_config=str(conf),
        known_hosts=str(lab.known_hosts),
        python=lab.python,
        data_dir=bob.data_dir,
    )
    transport = SSHTransport(c)
    with sessions([(WorkerLaunch("bob", "", bob.shard, threads=1), transport)]) as (s,):
        assert s.hello(timeout=120).label_counts == {4: 5842, 5: 5421, 6: 5918}
        assert len(s._pipe._conn.bastions) == 1  # type: ignore[union-attr]


def test_probe_reports_a_healthy_device(lab: LabInfo) -> None:
    got = probe(cfg(lab, "charlie"), "charlie")
    pub = Path(lab.lab_dir) / "hosts" / "charlie" / "ssh_host_ed25519_key.pub"
    assert got["error"] is None
    assert (got["reachable"], got["authenticated"], got["host_key"]) == (True, True, "trusted")
    assert got["fingerprint"] == _fingerprint_by_openssh(pub)
    assert got["python"] == "3.11.2" and got["torch"].startswith("2.14.1") and got["cuda"] is False
    assert 0 < got["latency_ms"] < 5000


def test_probe_fills_error_instead_of_raising(lab: LabInfo, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    unknown = probe(cfg(lab, "alice", known_hosts=str(empty)), "alice")
    assert (unknown["reachable"], unknown["authenticated"], unknown["host_key"]) == (
        True,
        False,
        "unknown",
    )
    assert "fedmnist workers trust alice" in unknown["error"]
    closed = probe(cfg(lab, "alice", port=_closed_port()), "alice")
    assert (closed["reachable"], closed["host_key"]) == (False, None)
    assert "refused" in closed["error"]


def test_trust_records_the_key_openssh_shows(lab: LabInfo, tmp_path: Path) -> None:
    pub = Path(lab.lab_dir) / "hosts" / "alice" / "ssh_host_ed25519_key.pub"
    known = tmp_path / "ssh" / "known_hosts"
    c = cfg(lab, "alice", known_hosts=str(known))
    keytype, _, fp = fetch_host_key(c, "alice")
    assert (keytype, fp) == ("ssh-ed25519", _fingerprint_by_openssh(pub))
    with pytest.raises(ChangedHostKey, match="not the SHA256:wrong you accepted"):
        trust(c, name="alice", expected_fingerprint="SHA256:wrong")
    added = trust(c, name="alice", expected_fingerprint=fp)
    assert added.added and added.entry == f"[127.0.0.1]:{lab.hosts['alice'].port}"
    assert trust(c, name="alice").added is False  # already there: not written twice
    assert len(known.read_text().splitlines()) == 1
    assert probe(c, "alice")["host_key"] == "trusted"


# -- bad input: the right error, naming the worker and the fix ---------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _other_host_key(tmp_path: Path) -> Path:
    key = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return Path(str(key) + ".pub")


def _hello_error(c: SSHConfig, lch: WorkerLaunch) -> Exception:
    session = WorkerSession(lch, SSHTransport(c))
    try:
        session.hello(timeout=60)
    except Exception as exc:  # the test inspects it
        return exc
    finally:
        session.close()
    raise AssertionError("hello succeeded")


def test_unknown_host_key_is_refused(lab: LabInfo, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    exc = _hello_error(cfg(lab, "alice", known_hosts=str(empty)), launch(lab, "alice"))
    assert isinstance(exc, UnknownHostKey) and isinstance(exc, HostKeyMismatch)
    assert not isinstance(exc, WorkerUnreachable)  # never retried
    msg = str(exc)
    assert "'alice'" in msg and "unknown" in msg and "fedmnist workers trust alice" in msg
    pub = Path(lab.lab_dir) / "hosts" / "alice" / "ssh_host_ed25519_key.pub"
    assert _fingerprint_by_openssh(pub) in msg


def test_changed_host_key_is_refused_with_both_fingerprints(lab: LabInfo, tmp_path: Path) -> None:
    port = lab.hosts["alice"].port
    other = _other_host_key(tmp_path)
    keytype, b64 = other.read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {keytype} {b64}\n")
    exc = _hello_error(cfg(lab, "alice", known_hosts=str(known)), launch(lab, "alice"))
    assert isinstance(exc, ChangedHostKey) and not isinstance(exc, WorkerUnreachable)
    msg = str(exc)
    real = Path(lab.lab_dir) / "hosts" / "alice" / "ssh_host_ed25519_key.pub"
    assert "'alice'" in msg and "CHANGED" in msg
    assert _fingerprint_by_openssh(other) in msg and _fingerprint_by_openssh(real) in msg
    assert f"ssh-keygen -R '[127.0.0.1]:{port}'" in msg and "fedmnist workers trust alice" in msg


def test_connection_refused_is_transient_and_named(lab: LabInfo) -> None:
    port = _closed_port()
    exc = _hello_error(cfg(lab, "alice", port=port), launch(lab, "alice"))
    # The refusal itself, not a deadline running out (that would be a WorkerTimeout).
    assert type(exc) is WorkerUnreachable
    assert "'alice'" in str(exc) and f"127.0.0.1:{port} refused" in str(exc)
    assert "sshd running" in str(exc)


@pytest.mark.parametrize("what", ["user", "key"])
def test_wrong_user_or_key_is_an_auth_error(lab: LabInfo, tmp_path: Path, what: str) -> None:
    if what == "user":
        c, shown = cfg(lab, "alice", user=lab.hosts["bob"].user), lab.hosts["bob"].user
    else:
        key = tmp_path / "stranger_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        c, shown = cfg(lab, "alice", identity_file=str(key)), str(key)
    exc = _hello_error(c, launch(lab, "alice"))
    assert isinstance(exc, SSHAuthFailed) and not isinstance(exc, WorkerUnreachable)
    msg = str(exc)
    assert "'alice'" in msg and shown in msg and "authorized_keys" in msg


def test_missing_remote_python_names_it_and_the_fix(lab: LabInfo) -> None:
    exc = _hello_error(cfg(lab, "alice", python="/nonexistent/python3"), launch(lab, "alice"))
    assert isinstance(exc, RemoteSetupError) and isinstance(exc, WorkerFailed)
    msg = str(exc)
    assert "'alice'" in msg and "/nonexistent/python3" in msg and "not found" in msg
    assert "set `python:`" in msg


def test_remote_python_without_torch_names_it_and_the_fix(lab: LabInfo) -> None:
    bare = "/usr/bin/python3"
    if (
        not Path(bare).exists()
        or subprocess.run([bare, "-c", "import torch"], capture_output=True).returncode == 0
    ):
        pytest.skip(f"{bare} is missing or has torch")
    exc = _hello_error(cfg(lab, "alice", python=bare), launch(lab, "alice"))
    assert isinstance(exc, RemoteSetupError)
    msg = str(exc)
    assert "'alice'" in msg and bare in msg and "has no torch" in msg and "install torch" in msg


def test_missing_shard_on_the_device_surfaces_as_worker_failed(lab: LabInfo) -> None:
    exc = _hello_error(cfg(lab, "alice"), launch(lab, "alice", "/nonexistent/mnist"))
    assert type(exc) is WorkerFailed
    msg = str(exc)
    assert "'alice'" in msg and "ShardError" in msg and "/nonexistent/mnist" in msg
    assert "fedmnist data" in msg


@pytest.mark.parametrize("field", ["password", "passphrase"])
def test_a_password_in_the_config_is_refused(field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        SSHConfig(host="jetson-1", user="nvidia", **{field: "hunter2"})
    msg = str(info.value)
    assert "passwords are not accepted" in msg and "identity_file or the ssh-agent" in msg
    assert "hunter2" not in msg  # never echo the secret


# -- a device dying mid-training --------------------------------------------------------------


@pytest.fixture
def small_lab(request: pytest.FixtureRequest, mnist_dir: Path) -> LabInfo:
    return start_lab(
        request, "fedmnist-lab-small-", {"dora": ShardSpec.by_labels([0, 1])}, mnist_dir
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process `pid` has used (/proc/<pid>/stat, fields 14-15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_device_dying_mid_training_is_unreachable_without_hanging(small_lab: LabInfo) -> None:
    lab = small_lab
    session = WorkerSession(launch(lab, "dora"), SSHTransport(cfg(lab, "dora", keepalive=1)))
    try:
        hello = session.hello(timeout=120)
        assert hello.label_counts == {0: 5923, 1: 6742}
        w = initial_weights(1)
        session.train(TrainRequest(1, TrainPlan(steps=2), 11, w), timeout=60)
        # A long round, killed while the worker computes it: once the worker (a process of this
        # machine: the lab is loopback) has spent CPU time on it since the request went out.
        idle = cpu_seconds(hello.pid)
        outcome: dict[str, object] = {}

        def long_round() -> None:
            try:
                session.train(TrainRequest(2, TrainPlan(steps=100_000), 12, w), timeout=60)
            except Exception as exc:  # inspected below
                outcome["error"] = exc

        thread = threading.Thread(target=long_round)
        thread.start()
        wait_until(lambda: cpu_seconds(hello.pid) >= idle + 0.5, 60, "dora computing round 2")
        kill_host(lab.lab_dir, "dora")
        thread.join(30)
        assert not thread.is_alive(), "the train call hung after the device died"
        assert isinstance(outcome["error"], WorkerUnreachable), outcome
        assert "'dora'" in str(outcome["error"])
        assert lab_status(lab.lab_dir)["dora"]["running"] is False

        # The refused connection is the error, not the 30 s deadline running out.
        with pytest.raises((WorkerUnreachable, WorkerTimeout), match="'dora'.*refused"):
            session.train(TrainRequest(3, TrainPlan(steps=2), 13, w), timeout=30)
    finally:
        session.close()


# -- hostile bytes and stalls: bounded reads, trust edge cases (issue 12) ----------------------


def test_a_bad_pid_line_and_a_stderr_flood_do_not_stop_the_pump(
    lab: LabInfo, caplog: pytest.LogCaptureFixture
) -> None:
    # 8 MiB on stderr is more than the channel's window: if the pump stopped, the remote
    # command would block before `cat` and the echo below would never come.
    caplog.set_level(logging.INFO, logger="fedcore.worker")
    conn = connect(cfg(lab, "alice"), "mallory")
    chan = conn.transport.open_session(timeout=30)
    chan.exec_command(
        "{ echo 'fedmnist-worker-pid 12x'; echo 'fedmnist-worker-pid 99999999999999'; "
        "head -c 8388608 /dev/zero | tr '\\0' b; echo; echo after; } >&2; cat"
    )
    pipe = SSHPipe(chan, conn, "mallory", send_timeout=30)
    try:
        pipe.send(b"ping\n")
        assert pipe.read_exact(5, 60) == b"ping\n"
    finally:
        pipe.close()
    assert pipe.remote_pid is None
    fwd = pipe.stderr
    assert fwd.hook_errors == 2
    msgs = [r.getMessage() for r in caplog.records if r.name == "fedcore.worker.mallory"]
    bad = [m for m in msgs if "could not read" in m]
    assert len(bad) == 1  # logged once
    assert "BadPidLine" in bad[0] and "'fedmnist-worker-pid 12x'" in bad[0]
    cut = [m for m in msgs if m.startswith("bbbb")]
    assert len(cut) == 1 and f"[... {8388608 - 4096} more bytes of this line dropped" in cut[0]
    assert "after" in msgs


def test_setup_commands_have_a_byte_cap_and_a_deadline(lab: LabInfo) -> None:
    conn = connect(cfg(lab, "alice"), "alice")
    try:
        with pytest.raises(RemoteSetupError, match="more than 65536 bytes to stdout"):
            conn.run("head -c 1000000 /dev/zero", 60, max_output=65536)
        with pytest.raises(RemoteSetupError, match="'alice'.*more than 65536 bytes to stderr"):
            conn.run("yes >&2", 60, max_output=65536)
        with pytest.raises(WorkerTimeout) as info:
            conn.run("sleep 60", 1)
        assert "'alice'" in str(info.value) and "did not finish within 1s" in str(info.value)
        assert "command_timeout" in str(info.value)
        assert conn.run("echo fine", 30) == (0, "fine\n", "")  # the connection still works
    finally:
        conn.close()
    # Through the bootstrap: a `python` that prints for ever is stopped at the cap, one that
    # never ends at the deadline (command_timeout).
    scripts = {"flood": "exec yes", "stall": "exec sleep 20"}
    for what, body in scripts.items():
        script = Path(lab.lab_dir) / f"{what}-python"
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    exc = _hello_error(
        cfg(lab, "alice", python=f"{lab.lab_dir}/flood-python"), launch(lab, "alice")
    )
    assert isinstance(exc, RemoteSetupError)
    assert "'alice'" in str(exc) and "bytes to stdout" in str(exc)
    exc = _hello_error(
        cfg(lab, "alice", python=f"{lab.lab_dir}/stall-python", command_timeout=2),
        launch(lab, "alice"),
    )
    assert isinstance(exc, WorkerTimeout) and "did not finish within 2s" in str(exc)


def test_cert_authority_in_known_hosts_is_refused_naming_the_line(
    lab: LabInfo, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(
        lab.known_hosts.read_text() + "@cert-authority *.example ssh-ed25519 AAAAC3Nz\n"
    )
    line = len(known.read_text().splitlines())
    exc = _hello_error(cfg(lab, "alice", known_hosts=str(known)), launch(lab, "alice"))
    assert isinstance(exc, UnsupportedKnownHosts) and isinstance(exc, HostKeyMismatch)
    msg = str(exc)
    assert f"{known} line {line} is a @cert-authority line" in msg and "not support" in msg
    assert "Remove the line" in msg and "fedmnist workers trust alice" in msg
    assert probe(cfg(lab, "alice", known_hosts=str(known)), "alice")["host_key"] == "unsupported"


def test_a_revoked_host_key_is_refused_even_when_listed(lab: LabInfo, tmp_path: Path) -> None:
    pub = Path(lab.lab_dir) / "hosts" / "alice" / "ssh_host_ed25519_key.pub"
    keytype, b64 = pub.read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(lab.known_hosts.read_text() + f"@revoked * {keytype} {b64}\n")
    line = len(known.read_text().splitlines())
    c = cfg(lab, "alice", known_hosts=str(known))
    exc = _hello_error(c, launch(lab, "alice"))
    assert isinstance(exc, RevokedHostKey) and not isinstance(exc, WorkerUnreachable)
    msg = str(exc)
    assert f"{known} line {line} marks @revoked" in msg
    assert _fingerprint_by_openssh(pub) in msg and "'alice'" in msg
    with pytest.raises(RevokedHostKey, match=f"line {line} marks @revoked"):
        trust(c, name="alice")
    # Bob's key is not revoked: the same file still works for him.
    bob = WorkerSession(launch(lab, "bob"), SSHTransport(cfg(lab, "bob", known_hosts=str(known))))
    try:
        assert bob.hello(timeout=120).worker == "bob"
    finally:
        bob.close()


def test_a_private_key_others_can_read_is_refused(lab: LabInfo, tmp_path: Path) -> None:
    key = tmp_path / "lab_key"
    shutil.copyfile(lab.identity_file, key)
    key.chmod(0o644)
    exc = _hello_error(cfg(lab, "alice", identity_file=str(key)), launch(lab, "alice"))
    assert isinstance(exc, UnprotectedPrivateKey) and isinstance(exc, SSHAuthFailed)
    assert not exc.transient
    msg = str(exc)
    assert "UNPROTECTED PRIVATE KEY FILE" in msg and f"0644 for {key}" in msg
    assert f"chmod 600 {key}" in msg and "'alice'" in msg
    key.chmod(0o600)
    session = WorkerSession(
        launch(lab, "alice"), SSHTransport(cfg(lab, "alice", identity_file=str(key)))
    )
    try:
        assert session.hello(timeout=120).worker == "alice"
    finally:
        session.close()


def test_a_tampered_bundle_on_the_device_is_uploaded_again(lab: LabInfo) -> None:
    c = cfg(lab, "charlie", remote_dir="~/.fedmnist-tamper-test")
    first = SSHTransport(c, "charlie").bootstrap()
    version, files = code_bundle()
    assert first.version == version
    wire = Path(first.code_dir) / "fedcore" / "wire.py"
    with open(wire, "ab") as f:  # keeps the owner: the device's user could have done it
        f.write(b"\nraise SystemExit('tampered')\n")
    second = SSHTransport(c, "charlie").bootstrap()
    assert second.uploaded is True and second.code_dir == first.code_dir
    assert wire.read_bytes() == files["fedcore/wire.py"]
    assert (
        json.loads((Path(first.code_dir) / ".complete").read_text())["files"]["fedcore/wire.py"]
        == hashlib.sha256(files["fedcore/wire.py"]).hexdigest()
    )
    code_root = Path(first.code_dir).parent
    assert [p.name for p in code_root.iterdir() if p.name.startswith((".tmp-", ".old-"))] == []
    assert SSHTransport(c, "charlie").bootstrap().uploaded is False  # intact now: left alone
    session = WorkerSession(launch(lab, "charlie"), SSHTransport(c))
    try:
        assert session.hello(timeout=120).worker == "charlie"  # the restored code runs
    finally:
        session.close()
