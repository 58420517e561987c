"""The `ssh` transport: start the worker program on a device over SSH (paramiko).

Agentless: a device needs only sshd and a Python with torch. One concern per module:

- `config`: `SSHConfig` (a worker's `ssh:` settings) and `Endpoint` (one resolved hop);
- `errors`: host key, login and device setup errors;
- `knownhosts`: reading known_hosts (`@revoked` honoured, `@cert-authority` refused);
- `commands`: remote commands and SFTP sessions with a total deadline and a byte cap;
- `resolution`: ~/.ssh/config applied to a config, giving the hops (`resolve`);
- `connection`: logging in through the hops, host key checks, short remote commands (`connect`);
- `bundle`: the fedcore modules the worker imports, with a version hash;
- `bootstrap`: checking the device's Python and torch, uploading the bundle over SFTP;
- `pipe`: `SSHPipe`, the worker's stdin/stdout on one channel;
- `transport`: `SSHTransport`;
- `hostkeys`: `probe`, `fetch_host_key`, `trust`.

Names are imported lazily (PEP 562): `fedcore.config` needs `SSHConfig`, and loading a config
must not import paramiko, which only the modules that talk SSH load. No submodule shares a name
with a function exported here: importing a submodule sets that name on the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, for type checkers (`X as X`: an explicit re-export)
    from .bootstrap import MIN_PYTHON as MIN_PYTHON
    from .bootstrap import BootstrapInfo as BootstrapInfo
    from .bundle import PACKAGE_DIR as PACKAGE_DIR
    from .bundle import WORKER_MODULES as WORKER_MODULES
    from .bundle import code_bundle as code_bundle
    from .bundle import fedcore_imports as fedcore_imports
    from .bundle import import_closure as import_closure
    from .bundle import worker_modules as worker_modules
    from .config import Endpoint as Endpoint
    from .config import SSHConfig as SSHConfig
    from .config import split_jump as split_jump
    from .connection import PREFERRED_CIPHERS as PREFERRED_CIPHERS
    from .connection import Connection as Connection
    from .connection import connect as connect
    from .connection import fingerprint as fingerprint
    from .errors import ChangedHostKey as ChangedHostKey
    from .errors import RemoteSetupError as RemoteSetupError
    from .errors import RevokedHostKey as RevokedHostKey
    from .errors import SSHAuthFailed as SSHAuthFailed
    from .errors import UnknownHostKey as UnknownHostKey
    from .errors import UnprotectedPrivateKey as UnprotectedPrivateKey
    from .errors import UnsupportedKnownHosts as UnsupportedKnownHosts
    from .hostkeys import TrustedKey as TrustedKey
    from .hostkeys import fetch_host_key as fetch_host_key
    from .hostkeys import probe as probe
    from .hostkeys import trust as trust
    from .pipe import SSHPipe as SSHPipe
    from .resolution import resolve as resolve
    from .transport import SSHTransport as SSHTransport

# Public name -> the submodule that defines it.
_WHERE = {
    "MIN_PYTHON": "bootstrap",
    "BootstrapInfo": "bootstrap",
    "PACKAGE_DIR": "bundle",
    "WORKER_MODULES": "bundle",
    "code_bundle": "bundle",
    "fedcore_imports": "bundle",
    "import_closure": "bundle",
    "worker_modules": "bundle",
    "Endpoint": "config",
    "SSHConfig": "config",
    "split_jump": "config",
    "PREFERRED_CIPHERS": "connection",
    "Connection": "connection",
    "connect": "connection",
    "fingerprint": "connection",
    "ChangedHostKey": "errors",
    "RemoteSetupError": "errors",
    "RevokedHostKey": "errors",
    "SSHAuthFailed": "errors",
    "UnknownHostKey": "errors",
    "UnprotectedPrivateKey": "errors",
    "UnsupportedKnownHosts": "errors",
    "SSHPipe": "pipe",
    "resolve": "resolution",
    "SSHTransport": "transport",
    "TrustedKey": "hostkeys",
    "fetch_host_key": "hostkeys",
    "probe": "hostkeys",
    "trust": "hostkeys",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines `name` on first use (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
