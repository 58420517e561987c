"""Read a known_hosts file the way this client can honour it, and refuse what it cannot.

paramiko's own loader fails on OpenSSH's marker lines with an untyped error. Here:

- `@revoked` is honoured: the key on that line is never accepted, for any host (stricter than
  OpenSSH, which applies the line's host patterns: a revoked key is compromised everywhere);
  a plain line listing the same key is ignored;
- `@cert-authority` (and any other marker) is refused with `UnsupportedKnownHosts`, naming the file
  and line: paramiko does not check host certificates, and silently skipping the line would hide
  why a device is "unknown";
- a line that does not parse is skipped, as OpenSSH does.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from paramiko.hostkeys import HostKeyEntry

from .errors import UnsupportedKnownHosts

MAX_BYTES = 16 * 1024 * 1024  # a known_hosts file larger than this is not read


@dataclass
class KnownHosts:
    """The accepted host keys of a file, and the revoked ones with their line numbers."""

    path: Path
    pairs: list[tuple[str, paramiko.PKey]] = field(default_factory=list)  # (host field, key)
    revoked: dict[bytes, int] = field(default_factory=dict)  # key blob -> line number

    def add_to(self, keys: paramiko.HostKeys) -> None:
        """Add the accepted keys to `keys` (e.g. an SSHClient's system host keys)."""
        for host, key in self.pairs:
            keys.add(host, key.get_name(), key)

    def host_keys(self) -> paramiko.HostKeys:
        """The accepted keys as paramiko's HostKeys (for `lookup`)."""
        keys = paramiko.HostKeys()
        self.add_to(keys)
        return keys

    def revoked_line(self, key: paramiko.PKey) -> int | None:
        """The line that revokes `key`, or None."""
        return self.revoked.get(key.asbytes())


def _entry(line: str, lineno: int) -> HostKeyEntry | None:
    try:
        return HostKeyEntry.from_line(line, lineno)
    except Exception:  # paramiko raises several types for a bad line; OpenSSH skips it
        return None


def _usable_name(host: str) -> bool:
    """False for a hashed name paramiko's lookup would trip on (an AssertionError there)."""
    if not host.startswith("|1|"):
        return bool(host)
    try:
        salt, digest = (base64.b64decode(p, validate=True) for p in host[3:].split("|"))
    except (ValueError, binascii.Error):
        return False
    return len(salt) == len(digest) == 20


def load_known_hosts(path: Path, name: str) -> KnownHosts:
    """Read `path` (missing: no keys).

    Args:
        path: the known_hosts file.
        name: the worker's name, for errors.

    Raises:
        UnsupportedKnownHosts: a `@cert-authority` or other marker line, or a file over MAX_BYTES.
    """
    known = KnownHosts(path)
    if not path.is_file():
        return known
    if path.stat().st_size > MAX_BYTES:
        raise UnsupportedKnownHosts(
            name, f"{path} is over {MAX_BYTES} bytes: point `known_hosts:` at a smaller file"
        )
    plain: list[HostKeyEntry] = []
    for lineno, raw in enumerate(path.read_text("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            marker, _, rest = line.partition(" ")
            if marker != "@revoked":
                raise UnsupportedKnownHosts(
                    name,
                    f"{path} line {lineno} is a {marker} line, which fedmnist's SSH client does "
                    "not support (paramiko checks plain host keys only). Remove the line, or "
                    "point `known_hosts:` in the worker's ssh settings at a file of plain keys "
                    f"(`fedmnist workers trust {name}` writes one)",
                )
            entry = _entry(rest.strip(), lineno)
            if entry is not None and entry.key is not None:
                known.revoked[entry.key.asbytes()] = lineno
            continue
        entry = _entry(line, lineno)
        if entry is not None and entry.key is not None:
            plain.append(entry)
    for entry in plain:
        if entry.key.asbytes() not in known.revoked:
            known.pairs += [(h, entry.key) for h in entry.hostnames if _usable_name(h)]
    return known
