"""Check a device and trust its host key: `fedmnist workers check` and `fedmnist workers trust`.

A key is recorded only after the user has seen its fingerprint (`expected_fingerprint`), and a
host that already has another key is refused, never overwritten: that change is for a person to
verify. Bastions must already be trusted; `fetch_host_key` logs in to them with the same hop
routine as `connect`, and only handshakes with the device.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from ...errors import WorkerError, WorkerUnreachable
from .config import Endpoint, SSHConfig
from .connection import bastion_hops, connect, fingerprint, login_hops, tunnel
from .errors import (
    ChangedHostKey,
    RevokedHostKey,
    SSHAuthFailed,
    UnknownHostKey,
    UnsupportedKnownHosts,
)
from .knownhosts import load_known_hosts
from .resolution import resolve

log = logging.getLogger("fedcore.transport.ssh")

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
    except (UnknownHostKey, ChangedHostKey, RevokedHostKey) as exc:
        result.update(reachable=True, host_key=exc.status, fingerprint=exc.offered, error=str(exc))
        return result
    except UnsupportedKnownHosts as exc:
        result.update(host_key=exc.status, error=str(exc))
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
        conn.run("echo fedmnist", cfg.connect_timeout)
        result["latency_ms"] = round((time.perf_counter() - start) * 1000, 1)
        status, out, err = conn.run(shlex.join([cfg.python, "-c", _PROBE]), cfg.command_timeout)
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


def _direct_socket(device: Endpoint, cfg: SSHConfig, name: str) -> socket.socket:
    try:
        return socket.create_connection((device.host, device.port), cfg.connect_timeout)
    except OSError as exc:
        raise WorkerUnreachable(
            name,
            f"cannot reach {device.host}:{device.port} ({exc}): is the device on and sshd running?",
        ) from None


def fetch_host_key(cfg: SSHConfig, name: str = "worker") -> tuple[str, paramiko.PKey, str]:
    """The host key the device offers, without logging in to it or trusting it.

    Args:
        cfg: the worker's ssh settings; its bastions (ProxyJump) must already be trusted.
        name: the worker's name, for errors.

    Returns:
        (key type, key, SHA256 fingerprint).

    Raises:
        WorkerUnreachable: the device (or a bastion) cannot be reached or does not speak SSH.
        HostKeyMismatch, SSHAuthFailed: logging in to a bastion failed.
    """
    bastions, device = resolve(cfg)
    clients = login_hops(cfg, name, bastion_hops(bastions))
    try:
        sock: Any
        if clients:
            sock = tunnel(clients[-1], device, cfg, name)
        else:
            sock = _direct_socket(device, cfg, name)
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
        ChangedHostKey, RevokedHostKey, UnsupportedKnownHosts, WorkerUnreachable.
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
    known_hosts = load_known_hosts(path, name)
    line = known_hosts.revoked_line(key)
    if line is not None:
        raise RevokedHostKey(
            name,
            f"{entry} offers {keytype} {fp}, which {path} line {line} marks @revoked: it is "
            "not trusted. Give the device a new host key, then trust again",
            offered=fp,
        )
    existing = known_hosts.host_keys().lookup(entry) or {}
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
