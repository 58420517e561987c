"""How to reach a device over SSH: the `ssh:` settings of a worker, and a resolved hop.

Pure values, no paramiko: `fedcore.config` validates every inventory with `SSHConfig`, and loading
a config must not import an SSH library (a run with only local workers never needs one).

Hosts, aliases and users are checked by pattern before anything uses them: ssh_config's
`Match exec` lines run a shell command with the host name substituted (`%h`), so a "host" such as
`x$(id)` ran a command on the coordinator (the CVE-2023-51385 class, fixed in OpenSSH 9.6 by the
same kind of check). A host is a DNS name or an IP address, a user a POSIX user name, an alias an
ssh_config Host name; none may start with `-` (it would read as an option). `check_host` and
`check_user` are exported for values read from ssh_config itself (HostName, User, ProxyJump).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")  # POSIX portable, as useradd takes
ALIAS = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
COMMAND = re.compile(r"^[A-Za-z0-9_./~+][A-Za-z0-9_./~+-]{0,255}$")  # a program name or path


def matching(pattern: re.Pattern[str], value: str, refusal: str) -> str:
    """`value` when `pattern` matches it, else ValueError(`refusal`)."""
    if not pattern.match(value):
        raise ValueError(refusal)
    return value


def check_host(value: str, field: str = "host") -> str:
    """`value` when it is a DNS name or an IP address, else ValueError naming field and fix."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    return matching(
        HOSTNAME,
        value,
        f"{field} {value!r} is not a host name or IP address (letters, digits, '-', '_' and "
        "dots, not starting with '-'); give the device's name or address, or an alias of "
        "~/.ssh/config",
    )


def check_user(value: str, field: str = "user") -> str:
    """`value` when it is a POSIX user name, else ValueError naming field and fix."""
    return matching(
        USER,
        value,
        f"{field} {value!r} is not a user name (letters, digits, '_', '.', '-', at most 32, "
        "a letter or '_' first, so not starting with '-'); give the device account's login name",
    )


def _check_alias(value: str) -> str:
    return matching(
        ALIAS,
        value,
        f"alias {value!r} is not an ssh_config Host name (letters, digits, '_', '.', '-', "
        "not starting with '-' or '.'); use the name of a Host entry without wildcards",
    )


def check_command(value: str, field: str = "python") -> str:
    """`value` when it is a program name or path without spaces or shell characters."""
    return matching(
        COMMAND,
        value,
        f"{field} {value!r} is not a program name or path (letters, digits and _ . / ~ + -, "
        "not starting with '-', no spaces or shell characters); give the interpreter's path",
    )


Host = Annotated[str, AfterValidator(check_host)]
User = Annotated[str, AfterValidator(check_user)]
Alias = Annotated[str, AfterValidator(_check_alias)]
Command = Annotated[str, AfterValidator(check_command)]


class SSHConfig(BaseModel):
    """How to reach one device over SSH. Keys only: passwords are refused."""

    # hide_input_in_errors: a refused password must not be echoed back in the error.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    host: Host | None = None  # address or name of the device
    alias: Alias | None = None  # or a `Host` entry of ssh_config (HostName, Port, User, ...)
    port: int = Field(22, ge=1, le=65535)  # given explicitly, it wins over ssh_config's Port
    user: User | None = None  # default: ssh_config's User, else the local user
    identity_file: str | None = None  # private key; default: ssh-agent and ~/.ssh/id_*
    known_hosts: str = "~/.ssh/known_hosts"
    ssh_config: str = "~/.ssh/config"  # read when present
    python: Command = "python3"  # the device's interpreter (JetPack's has torch)
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


@dataclass(frozen=True)
class Endpoint:
    """One SSH hop, fully resolved: address, port, user, keys."""

    host: str
    port: int
    user: str
    identity_files: tuple[str, ...]

    @property
    def known_hosts_name(self) -> str:
        """The host field of this hop's known_hosts line (`host`, or `[host]:port`)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def split_jump(spec: str) -> tuple[str | None, str, int | None]:
    """Parse one ProxyJump entry.

    Args:
        spec: `[user@]host[:port]`, `[user@][v6addr]:port`, optionally prefixed `ssh://`.

    Returns:
        (user or None, host, port or None).

    Raises:
        ValueError: the port is not a number.
    """
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
