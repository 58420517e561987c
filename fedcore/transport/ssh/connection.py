"""Connect to a device over SSH, through its bastions (ProxyJump), and run short commands there.

Host keys are verified against a known_hosts file with `paramiko.RejectPolicy` semantics: an
unknown, changed or `@revoked` key is a `HostKeyMismatch`, never retried and never silently
accepted (`knownhosts` reads the file). Only keys log in (`identity_file`, the ssh-agent,
~/.ssh/id_*), and a key file others can read is refused, as OpenSSH refuses it. Commands run with
a total deadline and a byte cap (`commands`). A jump is a `direct-tcpip` channel opened on
the previous hop's connection. `login_hops` is the one hop routine: `connect` logs in to bastions
and device with it, `hostkeys.fetch_host_key` to the bastions only.
"""

from __future__ import annotations

import getpass
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paramiko

from ...errors import HostKeyMismatch, WorkerTimeout, WorkerUnreachable
from .commands import MAX_OUTPUT, OutputTooLarge, run_command
from .config import Endpoint, SSHConfig
from .errors import (
    ChangedHostKey,
    RemoteSetupError,
    RevokedHostKey,
    SSHAuthFailed,
    UnknownHostKey,
    UnprotectedPrivateKey,
)
from .knownhosts import KnownHosts, load_known_hosts
from .resolution import resolve

# AEAD ciphers first: paramiko's default (aes128-ctr + hmac-sha2-256) uploads about half as fast
# (21 vs 46 MB/s measured on the lab) and every round sends each worker the whole model. Both are
# OpenSSH defaults too; the server's choice falls back to paramiko's order when it has neither.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


class _RejectUnknown(paramiko.RejectPolicy):
    """RejectPolicy that keeps the offered key, so the error can show its fingerprint."""

    def __init__(self, known: KnownHosts) -> None:
        self.known = known

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        line = self.known.revoked_line(key)
        if line is not None:
            raise _KeyRevoked(key, line)
        raise _KeyNotKnown(hostname, key)


class _KeyRevoked(paramiko.SSHException):
    def __init__(self, key: paramiko.PKey, line: int) -> None:
        super().__init__("the host key is revoked")
        self.key = key
        self.line = line


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
    name: str, ep: Endpoint, role: str, known: KnownHosts, exc: Exception
) -> HostKeyMismatch:
    known_hosts = known.path
    if isinstance(exc, paramiko.BadHostKeyException) and known.revoked_line(exc.key):
        exc = _KeyRevoked(exc.key, known.revoked_line(exc.key) or 0)
    if isinstance(exc, _KeyRevoked):
        fp = fingerprint(exc.key)
        return RevokedHostKey(
            name,
            f"{role} {ep.known_hosts_name} offers the host key {exc.key.get_name()} {fp}, which "
            f"{known_hosts} line {exc.line} marks @revoked: it must never be accepted. Someone "
            "may hold the device's old key; check the device on its console and give it a new "
            f"host key (`ssh-keygen -A` after removing the old ones), then {_trust_hint(name)}",
            offered=fp,
        )
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


class Connection:
    """An authenticated SSH client to the device, and the bastion clients it runs through."""

    def __init__(
        self,
        client: paramiko.SSHClient,
        bastions: list[paramiko.SSHClient],
        ep: Endpoint,
        name: str = "worker",
    ):
        self.client = client
        self.bastions = bastions
        self.endpoint = ep
        self.name = name

    @property
    def transport(self) -> paramiko.Transport:
        """The device connection's transport.

        Raises:
            ConnectionError: the connection is closed.
        """
        t = self.client.get_transport()
        if t is None:
            raise ConnectionError(f"SSH connection to {self.endpoint} is closed")
        return t

    def run(
        self, command: str, timeout: float, max_output: int = MAX_OUTPUT
    ) -> tuple[int, str, str]:
        """Run a short shell command on the device.

        Args:
            command: the shell command line.
            timeout: seconds for all of it: opening the channel, starting it, its output, its
                exit status.
            max_output: the most bytes of stdout, and of stderr, it may print.

        Returns:
            (exit status, stdout, stderr), decoded as UTF-8 with replacement; the status is -1
            when the device sent none.

        Raises:
            WorkerTimeout: the deadline passed.
            RemoteSetupError: the command printed more than `max_output` bytes.
            paramiko.SSHException, OSError, ConnectionError: the channel failed.
        """
        what = command if len(command) <= 60 else command[:57] + "..."
        try:
            status, out, err = run_command(self.transport, command, timeout, max_output)
        except TimeoutError as exc:
            raise WorkerTimeout(
                self.name,
                f"the command `{what}` on {self.endpoint} did not finish within {timeout:g}s "
                f"({exc}): check the device's load, or raise `command_timeout` in its ssh settings",
            ) from None
        except OutputTooLarge as exc:
            raise RemoteSetupError(
                self.name,
                f"the command `{what}` on {self.endpoint} was stopped: {exc}. A setup command "
                "prints a few lines; check the device's shell startup files and `python:`",
            ) from None
        return status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def close(self) -> None:
        """Close the device connection, then the bastions; never raises."""
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
    for key in ep.identity_files or _default_keys():
        _check_key_mode(key, name, role, ep)
    known = load_known_hosts(known_hosts, name)
    client = paramiko.SSHClient()
    known.add_to(client.get_host_keys())  # no filename is set: never written back
    client.set_missing_host_key_policy(_RejectUnknown(known))
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
    except (_KeyNotKnown, _KeyRevoked, paramiko.BadHostKeyException) as exc:
        client.close()
        raise _host_key_error(name, ep, role, known, exc) from None
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


def _default_keys() -> list[str]:
    """The ~/.ssh/id_* private keys paramiko tries when no identity_file is given."""
    ssh_dir = Path("~/.ssh").expanduser()
    names = ("id_rsa", "id_ecdsa", "id_ed25519", "id_dsa")
    return [str(ssh_dir / n) for n in names if (ssh_dir / n).is_file()]


def _check_key_mode(key: str, name: str, role: str, ep: Endpoint) -> None:
    """Refuse a private key file that others can read, as OpenSSH does (`sshkey_perm_ok`: only a
    key owned by this user is checked)."""
    try:
        st = os.stat(key)
    except OSError:
        return  # a missing default key is simply not tried
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == os.getuid() and mode & 0o077:
        raise UnprotectedPrivateKey(
            name,
            f"UNPROTECTED PRIVATE KEY FILE: permissions {mode:04o} for {key} (the key for {role} "
            f"{ep}) are too open; a private key must be readable by {getpass.getuser()} only. "
            f"Run `chmod 600 {key}`",
        )


def tunnel(via: paramiko.SSHClient, ep: Endpoint, cfg: SSHConfig, name: str) -> paramiko.Channel:
    """A `direct-tcpip` channel from the hop `via` to `ep`, to run the next SSH connection over.

    Raises:
        WorkerUnreachable: the hop could not open it (no route, or forwarding refused).
    """
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


def bastion_hops(bastions: Sequence[Endpoint]) -> list[tuple[Endpoint, str]]:
    """(endpoint, role) pairs for `login_hops`, the role naming each bastion in errors."""
    return [(b, f"bastion {b.host}") for b in bastions]


def login_hops(
    cfg: SSHConfig, name: str, hops: Sequence[tuple[Endpoint, str]]
) -> list[paramiko.SSHClient]:
    """Log in to each hop in order, each one through a tunnel on the one before.

    Args:
        cfg: the worker's ssh settings (known_hosts, timeouts, keepalive).
        name: the worker's name, for errors.
        hops: (endpoint, role) pairs; the first is reached directly.

    Returns:
        One authenticated client per hop, in order (none when `hops` is empty).

    Raises:
        HostKeyMismatch (UnknownHostKey, ChangedHostKey), SSHAuthFailed, WorkerUnreachable;
        the clients opened so far are closed first.
    """
    known_hosts = Path(cfg.known_hosts).expanduser()
    clients: list[paramiko.SSHClient] = []
    try:
        for ep, role in hops:
            sock = tunnel(clients[-1], ep, cfg, name) if clients else None
            clients.append(_connect_hop(ep, role, cfg, name, known_hosts, sock))
    except BaseException:
        for c in reversed(clients):
            c.close()
        raise
    return clients


def connect(cfg: SSHConfig, name: str) -> Connection:
    """An authenticated connection to the device (through its bastions, if any).

    Raises:
        HostKeyMismatch (UnknownHostKey, ChangedHostKey), SSHAuthFailed, WorkerUnreachable.
    """
    bastions, device = resolve(cfg)
    clients = login_hops(cfg, name, [*bastion_hops(bastions), (device, "device")])
    return Connection(clients[-1], clients[:-1], device, name)
