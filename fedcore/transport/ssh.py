"""The `ssh` transport: start the worker program on a device over SSH (paramiko).

Agentless (DESIGN.md decision 1): a device needs only sshd and a Python with torch. Before a
worker starts, `SSHTransport.bootstrap` checks the device's Python and torch and ships the fedcore
modules the worker imports (`WORKER_MODULES`) over SFTP into `<remote_dir>/code/<version>/`, where
the version is a hash of their bytes: an unchanged version is never uploaded twice, and an upload
lands in a temporary folder renamed into place, so a half-upload never looks complete. The worker
then runs on one SSH channel: its stdout carries frames, its stderr log lines (logger
`fedcore.worker.<name>`).

Host keys are verified against a known_hosts file with `paramiko.RejectPolicy` semantics: an
unknown or changed key is a `HostKeyMismatch`, never retried and never silently accepted
(`fedmnist workers trust NAME` records a key after showing its fingerprint). Only keys
(`identity_file`, the ssh-agent, ~/.ssh/id_*) log in: configs refuse passwords. Hosts may be
aliases of ~/.ssh/config (HostName, Port, User, IdentityFile and ProxyJump are honoured; a jump
is a `direct-tcpip` channel opened on the bastion's connection).
"""

from __future__ import annotations

import ast
import dataclasses
import getpass
import hashlib
import io
import json
import logging
import os
import secrets
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import HostKeyMismatch, WorkerError, WorkerFailed, WorkerUnreachable
from .base import Pipe, Transport, WorkerLaunch

log = logging.getLogger("fedcore.transport.ssh")

# What `python -m fedcore.worker` imports, transitively: shipped to the device, nothing else.
# `worker_modules()` adds any fedcore module the worker has come to import since (and a test
# keeps this list complete), so a new device-side import never breaks a device.
WORKER_MODULES = (
    "__init__",
    "errors",
    "seeding",
    "shards",
    "model",
    "mnist",
    "training",
    "evaluation",
    "tensorcodec",
    "wire",
    "protocol",
    "local_algorithms",
    "worker",
)
PACKAGE_DIR = Path(__file__).resolve().parents[1]
MIN_PYTHON = (3, 8)
# AEAD ciphers first: paramiko's default (aes128-ctr + hmac-sha2-256) uploads about half as fast
# (21 vs 46 MB/s measured on the lab) and every round sends each worker the whole model. Both are
# OpenSSH defaults too; the server's choice falls back to paramiko's order when it has neither.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


class SSHConfig(BaseModel):
    """How to reach one device over SSH. Keys only: passwords are refused."""

    # hide_input_in_errors: a refused password must not be echoed back in the error.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    host: str | None = None  # address or name of the device
    alias: str | None = None  # or a `Host` entry of ssh_config (HostName, Port, User, ...)
    port: int = Field(22, ge=1, le=65535)  # given explicitly, it wins over ssh_config's Port
    user: str | None = None  # default: ssh_config's User, else the local user
    identity_file: str | None = None  # private key; default: ssh-agent and ~/.ssh/id_*
    known_hosts: str = "~/.ssh/known_hosts"
    ssh_config: str = "~/.ssh/config"  # read when present
    python: str = "python3"  # the device's interpreter (JetPack's has torch)
    remote_dir: str = "~/.fedmnist"  # work folder on the device (code versions live in code/)
    data_dir: str | None = None  # shard folder on the device, used when the launch names none
    connect_timeout: float = Field(10.0, gt=0)  # TCP connect, banner, key exchange, auth
    keepalive: float = Field(15.0, ge=0)  # seconds between SSH keepalives; 0 = off
    command_timeout: float = Field(120.0, gt=0)  # each setup command and upload step

    @model_validator(mode="before")
    @classmethod
    def _refuse_passwords(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if any(word in str(key).lower() for word in ("password", "passwd", "passphrase")):
                    raise ValueError(
                        f"passwords are not accepted in configs (field {key!r}): use "
                        "identity_file or the ssh-agent (an encrypted key goes into the agent)"
                    )
        return data

    @model_validator(mode="after")
    def _one_target(self) -> SSHConfig:
        if (self.host is None) == (self.alias is None):
            raise ValueError("give exactly one of host (an address) or alias (an ssh_config Host)")
        return self


# -- errors -----------------------------------------------------------------------------------


class UnknownHostKey(HostKeyMismatch):
    """The device's host key is not in known_hosts (status 'unknown')."""

    status = "unknown"

    def __init__(self, worker: str, message: str, offered: str) -> None:
        super().__init__(worker, message)
        self.offered = offered


class ChangedHostKey(HostKeyMismatch):
    """known_hosts holds another key for this device (status 'changed')."""

    status = "changed"

    def __init__(self, worker: str, message: str, offered: str, expected: str) -> None:
        super().__init__(worker, message)
        self.offered = offered
        self.expected = expected


class SSHAuthFailed(WorkerError):
    """The device refused our key (or no key was available). Not transient: fix the config."""


class RemoteSetupError(WorkerFailed):
    """The device's Python, torch or work folder is not usable. Not transient."""


# -- resolving a config to hops ------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One SSH hop, fully resolved: address, port, user, keys."""

    host: str
    port: int
    user: str
    identity_files: tuple[str, ...]

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def _read_ssh_config(path: str) -> paramiko.SSHConfig:
    p = Path(path).expanduser()
    return paramiko.SSHConfig.from_path(str(p)) if p.is_file() else paramiko.SSHConfig()


def _split_jump(spec: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` (or `ssh://...`) -> (user, host, port)."""
    spec = spec.strip().removeprefix("ssh://")
    user, _, hostport = spec.rpartition("@")
    port: int | None = None
    if hostport.startswith("["):  # [v6addr]:port
        host, _, rest = hostport[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = int(p)
    else:
        host = hostport
    return (user or None), host, port


def resolve(cfg: SSHConfig) -> tuple[list[Endpoint], Endpoint]:
    """(bastions in order, the device) for `cfg`, with ssh_config applied as OpenSSH would."""
    conf = _read_ssh_config(cfg.ssh_config)
    name = cfg.alias or cfg.host or ""
    opts = conf.lookup(name)
    port = cfg.port if "port" in cfg.model_fields_set or "port" not in opts else int(opts["port"])
    keys = (cfg.identity_file,) if cfg.identity_file else tuple(opts.get("identityfile", ()))
    device = Endpoint(
        host=opts.get("hostname", name),
        port=port,
        user=cfg.user or opts.get("user") or getpass.getuser(),
        identity_files=tuple(str(Path(k).expanduser()) for k in keys),
    )
    jumps = opts.get("proxyjump", "none")
    bastions = []
    if jumps.lower() != "none":
        for spec in jumps.split(","):
            user, host, jport = _split_jump(spec)
            jopts = conf.lookup(host)
            jkeys = tuple(jopts.get("identityfile", ())) or device.identity_files
            bastions.append(
                Endpoint(
                    host=jopts.get("hostname", host),
                    port=jport or int(jopts.get("port", 22)),
                    user=user or jopts.get("user") or getpass.getuser(),
                    identity_files=tuple(str(Path(k).expanduser()) for k in jkeys),
                )
            )
    return bastions, device


# -- connecting -------------------------------------------------------------------------------


class _RejectUnknown(paramiko.RejectPolicy):
    """RejectPolicy that keeps the offered key, so the error can show its fingerprint."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise _KeyNotKnown(hostname, key)


class _KeyNotKnown(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(f"Server {hostname!r} not found in known_hosts")
        self.key = key


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint, e.g. `SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s`."""
    return key.fingerprint


def _trust_hint(name: str) -> str:
    return f"run `fedmnist workers trust {name}` (it shows the fingerprint to compare first)"


def _host_key_error(
    name: str, ep: Endpoint, role: str, known_hosts: Path, exc: Exception
) -> HostKeyMismatch:
    if isinstance(exc, _KeyNotKnown):
        fp = fingerprint(exc.key)
        where = "not in" if known_hosts.is_file() else "no file"
        return UnknownHostKey(
            name,
            f"the host key of {role} {ep.known_hosts_name} is unknown ({where} {known_hosts}); it "
            f"offers {exc.key.get_name()} {fp}. Check that this is the device you expect, then "
            f"{_trust_hint(name)}",
            offered=fp,
        )
    assert isinstance(exc, paramiko.BadHostKeyException)
    old, new = fingerprint(exc.expected_key), fingerprint(exc.key)
    return ChangedHostKey(
        name,
        f"the host key of {role} {ep.known_hosts_name} CHANGED: {known_hosts} holds "
        f"{exc.expected_key.get_name()} {old}, the device now offers {exc.key.get_name()} {new}. "
        f"A re-flashed device does this, and so does someone in the middle. Verify the device "
        f"(`ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on its console), then remove the old line "
        f"(`ssh-keygen -R '{ep.known_hosts_name}' -f {known_hosts}`) and "
        f"{_trust_hint(name)}",
        offered=new,
        expected=old,
    )


def _auth_error(name: str, ep: Endpoint, role: str, exc: Exception) -> SSHAuthFailed:
    keys = ", ".join(ep.identity_files) or "the ssh-agent's keys and ~/.ssh/id_*"
    if isinstance(exc, paramiko.PasswordRequiredException):
        fix = (
            "the key is encrypted: add it to the ssh-agent (`ssh-add KEY`) and leave "
            "identity_file unset"
        )
    else:
        pub = f"{ep.identity_files[0]}.pub" if ep.identity_files else "your public key"
        fix = (
            f"check `user` and `identity_file` in the worker's ssh settings, and that {pub} is in "
            f"~{ep.user}/.ssh/authorized_keys on the device "
            f"(`ssh-copy-id -i {pub} -p {ep.port} {ep.user}@{ep.host}`)"
        )
    return SSHAuthFailed(name, f"{role} {ep} refused login with {keys} ({exc}): {fix}")


def _transport_factory(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """paramiko's Transport, with PREFERRED_CIPHERS first."""
    transport = paramiko.Transport(sock, **kwargs)
    opts = transport.get_security_options()
    fast = [c for c in PREFERRED_CIPHERS if c in opts.ciphers]
    opts.ciphers = tuple(fast + [c for c in opts.ciphers if c not in fast])
    return transport


class _Connection:
    """An authenticated SSH client to the device, and the bastion clients it runs through."""

    def __init__(
        self, client: paramiko.SSHClient, bastions: list[paramiko.SSHClient], ep: Endpoint
    ):
        self.client = client
        self.bastions = bastions
        self.endpoint = ep

    @property
    def transport(self) -> paramiko.Transport:
        t = self.client.get_transport()
        if t is None:
            raise ConnectionError(f"SSH connection to {self.endpoint} is closed")
        return t

    def close(self) -> None:
        for c in [self.client, *reversed(self.bastions)]:
            try:
                c.close()
            except Exception:  # closing never raises to the caller
                pass


def _connect_hop(
    ep: Endpoint,
    role: str,
    cfg: SSHConfig,
    name: str,
    known_hosts: Path,
    sock: paramiko.Channel | None,
) -> paramiko.SSHClient:
    for key in ep.identity_files:
        if not os.path.isfile(key):
            raise SSHAuthFailed(
                name,
                f"identity_file {key} for {role} {ep} does not exist: fix the path, or "
                "create a key with `ssh-keygen -t ed25519 -f KEY` and install KEY.pub on the "
                "device",
            )
    client = paramiko.SSHClient()
    if known_hosts.is_file():
        client.load_system_host_keys(str(known_hosts))  # read-only: never written back
    client.set_missing_host_key_policy(_RejectUnknown())
    t = cfg.connect_timeout
    try:
        client.connect(
            ep.host,
            ep.port,
            username=ep.user,
            key_filename=list(ep.identity_files) or None,
            timeout=t,
            banner_timeout=t,
            auth_timeout=t,
            channel_timeout=t,
            sock=sock,
            allow_agent=True,
            look_for_keys=not ep.identity_files,
            transport_factory=_transport_factory,
        )
    except (_KeyNotKnown, paramiko.BadHostKeyException) as exc:
        client.close()
        raise _host_key_error(name, ep, role, known_hosts, exc) from None
    except paramiko.AuthenticationException as exc:
        client.close()
        raise _auth_error(name, ep, role, exc) from None
    except paramiko.SSHException as exc:
        client.close()
        if "No authentication methods available" in str(exc):
            raise _auth_error(name, ep, role, exc) from None
        raise WorkerUnreachable(
            name, f"SSH handshake with {role} {ep} failed ({exc}): is it an SSH server, and up?"
        ) from None
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        client.close()
        raise WorkerUnreachable(
            name,
            f"{role} {ep.host}:{ep.port} refused the connection ({exc.strerror or exc}): is "
            "the device on and sshd running, and is the port right?",
        ) from None
    except (TimeoutError, OSError) as exc:  # socket.timeout, unreachable network, DNS
        client.close()
        raise WorkerUnreachable(
            name,
            f"cannot reach {role} {ep.host}:{ep.port} within {t:.0f}s ({exc!r}): check the "
            "address, the network and that the device is on",
        ) from None
    if cfg.keepalive:
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(int(max(1, cfg.keepalive)))
    return client


def connect(cfg: SSHConfig, name: str) -> _Connection:
    """An authenticated connection to the device (through its bastions, if any).

    Raises:
        HostKeyMismatch (UnknownHostKey, ChangedHostKey), SSHAuthFailed, WorkerUnreachable.
    """
    bastions, device = resolve(cfg)
    known_hosts = Path(cfg.known_hosts).expanduser()
    clients: list[paramiko.SSHClient] = []
    try:
        sock = None
        hops = [*((b, f"bastion {b.host}") for b in bastions), (device, "device")]
        for ep, role in hops:
            if clients:
                sock = _tunnel(clients[-1], ep, cfg, name)
            clients.append(_connect_hop(ep, role, cfg, name, known_hosts, sock))
    except BaseException:
        for c in reversed(clients):
            c.close()
        raise
    return _Connection(clients[-1], clients[:-1], device)


def _tunnel(via: paramiko.SSHClient, ep: Endpoint, cfg: SSHConfig, name: str) -> paramiko.Channel:
    transport = via.get_transport()
    assert transport is not None
    try:
        return transport.open_channel(
            "direct-tcpip", (ep.host, ep.port), ("127.0.0.1", 0), timeout=cfg.connect_timeout
        )
    except (paramiko.SSHException, OSError) as exc:
        raise WorkerUnreachable(
            name,
            f"the bastion could not reach {ep.host}:{ep.port} ({exc}): check ProxyJump, and "
            "that the bastion allows TCP forwarding",
        ) from None


# -- remote commands ----------------------------------------------------------------------------


def _run(conn: _Connection, command: str, timeout: float) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a short command on the device."""
    chan = conn.transport.open_session(timeout=timeout)
    try:
        chan.settimeout(timeout)
        chan.exec_command(command)
        out = chan.makefile("rb").read()
        err = chan.makefile_stderr("rb").read()
        status = chan.recv_exit_status()
    finally:
        chan.close()
    return status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


# Runs on the device's Python (any 3.x): reports versions without importing torch (fast).
_CHECK = r"""
import json, os, platform, sys
try:
    import importlib.util as u
    found = u.find_spec("torch") is not None
except Exception:
    found = False
tv = None
if found:
    try:
        import importlib.metadata as md
        tv = md.version("torch")
    except Exception:
        tv = "unknown"
root = os.path.abspath(os.path.expanduser(sys.argv[1]))
print(json.dumps({"python": platform.python_version(), "executable": sys.executable,
    "torch": tv, "home": os.path.expanduser("~"), "remote_dir": root,
    "complete": os.path.isfile(os.path.join(root, "code", sys.argv[2], ".complete"))}))
"""

_PROBE = r"""
import json, platform
out = {"python": platform.python_version()}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = bool(torch.cuda.is_available())
except Exception as exc:
    out["torch_error"] = repr(exc)
print(json.dumps(out))
"""


def _fedcore_imports(module: str) -> set[str]:
    """fedcore modules that fedcore/<module>.py imports (relative or absolute, top-level)."""
    tree = ast.parse((PACKAGE_DIR / f"{module}.py").read_bytes())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.startswith("fedcore."):
                found.add(node.module.split(".")[1])
    return {m for m in found if (PACKAGE_DIR / f"{m}.py").is_file()}


def worker_modules() -> list[str]:
    """WORKER_MODULES plus every fedcore module they import, transitively (sorted)."""
    seen: set[str] = set()
    todo = list(WORKER_MODULES)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_fedcore_imports(m) - seen)
    return sorted(seen)


_BUNDLE_LOCK = threading.Lock()


def code_bundle() -> tuple[str, dict[str, bytes]]:
    """(version, {relative path: bytes}) of the worker's modules; version = short sha256.

    Serialised: workers start on parallel task threads, and CPython 3.11's `ast.parse` is not
    safe to run on several threads at once ("AST constructor recursion depth mismatch").
    """
    with _BUNDLE_LOCK:
        return _code_bundle()


def _code_bundle() -> tuple[str, dict[str, bytes]]:
    files = {f"fedcore/{m}.py": (PACKAGE_DIR / f"{m}.py").read_bytes() for m in worker_modules()}
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + str(len(files[rel])).encode() + b"\0" + files[rel])
    return digest.hexdigest()[:16], files


@dataclass(frozen=True)
class BootstrapInfo:
    """What `bootstrap` found and did on the device."""

    version: str
    code_dir: str  # absolute, on the device
    uploaded: bool  # False when that version was already complete there
    python: str
    torch: str
    home: str
    seconds: float


def _bootstrap(conn: _Connection, cfg: SSHConfig, name: str) -> BootstrapInfo:
    start = time.monotonic()
    version, files = code_bundle()
    ep = conn.endpoint
    cmd = shlex.join([cfg.python, "-c", _CHECK, cfg.remote_dir, version])
    status, out, err = _run(conn, cmd, cfg.command_timeout)
    fix_python = (
        "install Python >= 3.8 with torch there (JetPack ships one), or set `python:` in the "
        "worker's ssh settings to the full path of an interpreter that has torch"
    )
    if status in (126, 127):
        raise RemoteSetupError(
            name,
            f"remote python {cfg.python!r} was not found or not executable on {ep} "
            f"({err.strip() or f'exit status {status}'}): {fix_python}",
        )
    try:
        found = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RemoteSetupError(
            name,
            f"remote python {cfg.python!r} on {ep} failed the version check (exit status "
            f"{status}: {err.strip()[-500:] or out.strip()[-500:]}): {fix_python}",
        ) from None
    pyver = tuple(int(p) for p in found["python"].split(".")[:2])
    if pyver < MIN_PYTHON:
        raise RemoteSetupError(
            name,
            f"remote python {cfg.python!r} on {ep} is Python {found['python']}; the worker "
            f"needs >= {'.'.join(map(str, MIN_PYTHON))}: {fix_python}",
        )
    if not found["torch"]:
        raise RemoteSetupError(
            name,
            f"remote python {cfg.python!r} ({found['executable']}, Python {found['python']}) "
            f"on {ep} has no torch: install torch into it (on a Jetson: NVIDIA's wheel for its "
            "JetPack), or set `python:` in the worker's ssh settings to an interpreter that has it",
        )
    code_dir = f"{found['remote_dir']}/code/{version}"
    uploaded = False
    if not found["complete"]:
        _upload(conn, cfg, name, found["remote_dir"], version, files)
        uploaded = True
    info = BootstrapInfo(
        version=version,
        code_dir=code_dir,
        uploaded=uploaded,
        python=found["python"],
        torch=found["torch"],
        home=found["home"],
        seconds=time.monotonic() - start,
    )
    log.info(
        "%s: Python %s, torch %s, code %s %s (%.2fs)",
        name,
        info.python,
        info.torch,
        version,
        "uploaded" if uploaded else "already there",
        info.seconds,
    )
    return info


def _upload(
    conn: _Connection,
    cfg: SSHConfig,
    name: str,
    remote_dir: str,
    version: str,
    files: dict[str, bytes],
) -> None:
    root = f"{remote_dir}/code"
    final = f"{root}/{version}"
    tmp = f"{root}/.tmp-{version}-{secrets.token_hex(4)}"
    try:
        sftp = conn.client.open_sftp()
    except (paramiko.SSHException, OSError) as exc:
        raise RemoteSetupError(
            name,
            f"cannot open SFTP on {conn.endpoint} ({exc}): enable the sftp Subsystem in the "
            "device's sshd_config",
        ) from None
    try:
        sftp.get_channel().settimeout(cfg.command_timeout)
        _makedirs(sftp, root)
        sftp.mkdir(tmp, 0o755)
        for d in sorted({str(Path(rel).parent) for rel in files}):
            sftp.mkdir(f"{tmp}/{d}", 0o755)
        for rel, data in sorted(files.items()):
            sftp.putfo(io.BytesIO(data), f"{tmp}/{rel}", file_size=len(data))
        manifest = {"version": version, "files": sorted(files), "uploaded": time.time()}
        sftp.putfo(io.BytesIO(json.dumps(manifest).encode()), f"{tmp}/.complete")
        try:
            sftp.posix_rename(tmp, final)
        except OSError:
            if _exists(sftp, f"{final}/.complete"):
                _rmtree(sftp, tmp)  # another session uploaded the same version first
            else:  # a folder without .complete, not made by us: replace it
                _rmtree(sftp, final)
                sftp.posix_rename(tmp, final)
        log.info("%s: uploaded %d modules to %s:%s", name, len(files), conn.endpoint, final)
    except (OSError, paramiko.SSHException) as exc:
        try:
            _rmtree(sftp, tmp)
        except (OSError, paramiko.SSHException):
            pass
        raise RemoteSetupError(
            name,
            f"uploading the worker code to {conn.endpoint}:{final} failed ({exc!r}): check "
            f"that remote_dir {cfg.remote_dir!r} is writable by {conn.endpoint.user} and the disk "
            "has room",
        ) from None
    finally:
        sftp.close()


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
        return True
    except OSError:
        return False


def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        sub = "/".join(parts[:i])
        if sub and not _exists(sftp, sub):
            sftp.mkdir(sub, 0o755)


def _rmtree(sftp: paramiko.SFTPClient, path: str) -> None:
    import stat

    for entry in sftp.listdir_attr(path):
        child = f"{path}/{entry.filename}"
        if stat.S_ISDIR(entry.st_mode or 0):
            _rmtree(sftp, child)
        else:
            sftp.remove(child)
    sftp.rmdir(path)


# -- the pipe ---------------------------------------------------------------------------------


class SSHPipe(Pipe):
    """The worker's stdin/stdout over one SSH channel; its stderr goes to the log."""

    def __init__(self, chan: paramiko.Channel, conn: _Connection, name: str, send_timeout: float):
        self._chan = chan
        self._conn = conn
        self._send_timeout = send_timeout
        self.remote_pid: int | None = None
        self.description = f"ssh worker {name} ({conn.endpoint})"
        self._log = logging.getLogger(f"fedcore.worker.{name}")
        self._stderr_thread = threading.Thread(
            target=self._pump_stderr, name=f"ssh-stderr-{name}", daemon=True
        )
        self._stderr_thread.start()

    def _pump_stderr(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self._chan.recv_stderr(32768)
            except TimeoutError:  # read_exact set a timeout on the shared channel: keep going
                continue
            except Exception:
                break
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                self._line(raw.decode("utf-8", "replace").rstrip())
        if buf.strip():
            self._line(buf.decode("utf-8", "replace").rstrip())

    def _line(self, text: str) -> None:
        if self.remote_pid is None and text.startswith("fedmnist-worker-pid "):
            self.remote_pid = int(text.split()[1])
            return
        self._log.info(text)

    def send(self, data: bytes) -> None:
        try:
            self._chan.settimeout(self._send_timeout)
            self._chan.sendall(data)
        except TimeoutError:
            raise TimeoutError(
                f"{self.description} took no input for {self._send_timeout:.0f}s"
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise ConnectionError(f"{self.description} is gone: {exc}") from None

    def read_exact(self, n: int, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks: list[bytes] = []
        left = n
        while left:
            wait = None
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise TimeoutError(f"{self.description} sent nothing for {timeout:.0f}s")
            try:
                self._chan.settimeout(wait)
                chunk = self._chan.recv(min(left, 1 << 20))
            except TimeoutError:
                raise TimeoutError(f"{self.description} sent nothing for {timeout:.0f}s") from None
            except (OSError, paramiko.SSHException) as exc:
                raise ConnectionError(f"{self.description} failed: {exc}") from None
            if not chunk:
                status = self._exit_status()
                if left == n:
                    raise EOFError(f"{self.description} closed its output{status}")
                raise ConnectionError(f"{self.description} closed its output mid-frame{status}")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _exit_status(self) -> str:
        t = self._conn.client.get_transport()
        if t is None or not t.is_active():
            return " (the SSH connection dropped)"
        if self._chan.exit_status_ready():
            return f" (exit status {self._chan.recv_exit_status()})"
        return ""

    def alive(self) -> bool:
        t = self._conn.client.get_transport()
        return (
            t is not None
            and t.is_active()
            and not self._chan.closed
            and not self._chan.exit_status_ready()
        )

    def close(self, timeout: float = 5.0) -> None:
        try:
            if self.alive():
                self._chan.shutdown_write()  # end of input: the worker exits by itself
                deadline = time.monotonic() + timeout
                while not self._chan.exit_status_ready() and time.monotonic() < deadline:
                    time.sleep(0.01)
                if not self._chan.exit_status_ready() and self.remote_pid:
                    # Still busy (e.g. mid-round): closing the channel alone would leave it
                    # running on the device until it next writes.
                    _run(self._conn, f"kill {self.remote_pid} 2>/dev/null", 5.0)
        except Exception:  # closing never raises; the connection goes below
            pass
        finally:
            self._chan.close()
            self._conn.close()


# -- the transport ------------------------------------------------------------------------------


class SSHTransport(Transport):
    """Start workers on a device over SSH, shipping their code first (agentless)."""

    def __init__(self, cfg: SSHConfig, name: str | None = None) -> None:
        self.cfg = cfg
        self.name = name or cfg.alias or cfg.host or "worker"
        self.last_bootstrap: BootstrapInfo | None = None

    def bootstrap(self) -> BootstrapInfo:
        """Check the device's Python and torch and ship the worker code (skipped when there).

        Raises:
            HostKeyMismatch, SSHAuthFailed, WorkerUnreachable, RemoteSetupError.
        """
        conn = connect(self.cfg, self.name)
        try:
            self.last_bootstrap = _bootstrap(conn, self.cfg, self.name)
        finally:
            conn.close()
        return self.last_bootstrap

    def worker_command(self, launch: WorkerLaunch, info: BootstrapInfo) -> str:
        """The shell command that starts the worker on the device."""
        data_dir = launch.data_dir or self.cfg.data_dir or ""
        if data_dir == "~" or data_dir.startswith("~/"):
            data_dir = info.home + data_dir[1:]
        argv = dataclasses.replace(launch, data_dir=data_dir).argv()
        env = f"export OMP_NUM_THREADS={launch.threads} && " if launch.threads > 0 else ""
        return (
            f"cd {shlex.quote(info.code_dir)} && {env}echo fedmnist-worker-pid $$ >&2 && "
            f"exec {shlex.join([self.cfg.python, *argv])}"
        )

    def open(self, launch: WorkerLaunch) -> SSHPipe:
        """Connect, bootstrap, start the worker; returns before its hello.

        Raises:
            HostKeyMismatch, SSHAuthFailed, WorkerUnreachable, RemoteSetupError.
        """
        name = launch.name
        conn = connect(self.cfg, name)
        try:
            info = _bootstrap(conn, self.cfg, name)
            self.last_bootstrap = info
            chan = conn.transport.open_session(timeout=self.cfg.connect_timeout)
            chan.exec_command(self.worker_command(launch, info))
        except (paramiko.SSHException, OSError) as exc:
            conn.close()
            raise WorkerUnreachable(
                name, f"starting the worker on {conn.endpoint} failed: {exc}"
            ) from None
        except BaseException:
            conn.close()
            raise
        return SSHPipe(chan, conn, name, send_timeout=self.cfg.command_timeout)


# -- checks and trust ----------------------------------------------------------------------------


def probe(cfg: SSHConfig, name: str) -> dict[str, Any]:
    """What `fedmnist workers check` shows for one device; ordinary failures fill `error`.

    Keys: worker, target, reachable, authenticated, host_key (trusted/unknown/changed/None),
    fingerprint, python, torch, cuda, latency_ms (an `echo` round trip), error.
    """
    result: dict[str, Any] = {
        "worker": name,
        "target": None,
        "reachable": False,
        "authenticated": False,
        "host_key": None,
        "fingerprint": None,
        "python": None,
        "torch": None,
        "cuda": None,
        "latency_ms": None,
        "error": None,
    }
    try:
        _, device = resolve(cfg)
        result["target"] = str(device)
        conn = connect(cfg, name)
    except (UnknownHostKey, ChangedHostKey) as exc:
        result.update(reachable=True, host_key=exc.status, fingerprint=exc.offered, error=str(exc))
        return result
    except SSHAuthFailed as exc:
        result.update(reachable=True, host_key="trusted", error=str(exc))
        return result
    except (WorkerError, ValueError, OSError) as exc:
        result["error"] = str(exc)
        return result
    result.update(reachable=True, authenticated=True, host_key="trusted")
    try:
        key = conn.transport.get_remote_server_key()
        result["fingerprint"] = fingerprint(key)
        start = time.perf_counter()
        _run(conn, "echo fedmnist", cfg.connect_timeout)
        result["latency_ms"] = round((time.perf_counter() - start) * 1000, 1)
        status, out, err = _run(conn, shlex.join([cfg.python, "-c", _PROBE]), cfg.command_timeout)
        if status != 0:
            result["error"] = (
                f"remote python {cfg.python!r} failed (exit status {status}): {err.strip()[-300:]}"
            )
        else:
            found = json.loads(out.strip().splitlines()[-1])
            result.update(
                python=found.get("python"), torch=found.get("torch"), cuda=found.get("cuda")
            )
            if "torch_error" in found:
                result["error"] = f"torch does not import in {cfg.python}: {found['torch_error']}"
    except Exception as exc:  # a check reports, it does not raise
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return result


def fetch_host_key(cfg: SSHConfig, name: str = "worker") -> tuple[str, paramiko.PKey, str]:
    """(key type, key, SHA256 fingerprint) the device offers, without logging in or trusting it.

    Bastions (ProxyJump) must already be trusted. Raises WorkerUnreachable when unreachable.
    """
    bastions, device = resolve(cfg)
    known_hosts = Path(cfg.known_hosts).expanduser()
    clients: list[paramiko.SSHClient] = []
    try:
        sock: Any
        for ep in bastions:
            hop_sock = _tunnel(clients[-1], ep, cfg, name) if clients else None
            clients.append(_connect_hop(ep, f"bastion {ep.host}", cfg, name, known_hosts, hop_sock))
        if clients:
            sock = _tunnel(clients[-1], device, cfg, name)
        else:
            try:
                sock = socket.create_connection((device.host, device.port), cfg.connect_timeout)
            except OSError as exc:
                raise WorkerUnreachable(
                    name,
                    f"cannot reach {device.host}:{device.port} ({exc}): is the device on "
                    "and sshd running?",
                ) from None
        t = paramiko.Transport(sock)
        try:
            t.start_client(timeout=cfg.connect_timeout)
            key = t.get_remote_server_key()
        except paramiko.SSHException as exc:
            raise WorkerUnreachable(name, f"SSH handshake with {device} failed: {exc}") from None
        finally:
            t.close()
    finally:
        for c in reversed(clients):
            c.close()
    return key.get_name(), key, fingerprint(key)


@dataclass(frozen=True)
class TrustedKey:
    """A host key `trust` recorded (or found already recorded)."""

    entry: str  # known_hosts host field, e.g. `[10.0.0.5]:2222`
    keytype: str
    fingerprint: str
    added: bool


def trust(
    cfg: SSHConfig,
    known_hosts_path: str | os.PathLike[str] | None = None,
    *,
    name: str = "worker",
    expected_fingerprint: str | None = None,
) -> TrustedKey:
    """Record the device's host key in known_hosts (default: cfg.known_hosts).

    Give `expected_fingerprint` (what the user was shown and accepted) so a key swapped in between
    is refused. A host that already has a different key is refused too: that is a change to
    verify, not to paper over.

    Raises:
        ChangedHostKey, WorkerUnreachable.
    """
    path = Path(known_hosts_path or cfg.known_hosts).expanduser()
    keytype, key, fp = fetch_host_key(cfg, name)
    _, device = resolve(cfg)
    entry = device.known_hosts_name
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise ChangedHostKey(
            name,
            f"{entry} now offers {fp}, not the {expected_fingerprint} you accepted: "
            "verify the device before trusting it",
            offered=fp,
            expected=expected_fingerprint,
        )
    known = paramiko.HostKeys()
    if path.is_file():
        known.load(str(path))
    existing = known.lookup(entry) or {}
    for other in existing.values():
        if other == key:
            return TrustedKey(entry, keytype, fp, added=False)
    if existing:
        old = next(iter(existing.values()))
        raise ChangedHostKey(
            name,
            f"{path} already holds {old.get_name()} {fingerprint(old)} for {entry}; the "
            f"device offers {keytype} {fp}. Verify the device, then remove the old line "
            f"(`ssh-keygen -R '{entry}' -f {path}`) and trust again",
            offered=fp,
            expected=fingerprint(old),
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    prefix = b""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            prefix = b"" if f.read(1) == b"\n" else b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "ab") as f:
        f.write(prefix + f"{entry} {keytype} {key.get_base64()}\n".encode())
    log.info("trusted %s %s %s in %s", entry, keytype, fp, path)
    return TrustedKey(entry, keytype, fp, added=True)
