"""Resolve an `SSHConfig` to its hops, applying ~/.ssh/config as OpenSSH would.

HostName, Port, User, IdentityFile and ProxyJump are honoured; a `port` given in the config wins
over ssh_config's Port, as `ssh -p` does. Every host and user name that comes out of ssh_config is
held to the same patterns as the inventory's own (a name starting with '-' or holding shell
characters never reaches a connection).
"""

from __future__ import annotations

import getpass
from pathlib import Path

import paramiko

from ...errors import ConfigError
from .config import Endpoint, SSHConfig, check_host, check_user, split_jump


def _read_ssh_config(path: str) -> paramiko.SSHConfig:
    p = Path(path).expanduser()
    return paramiko.SSHConfig.from_path(str(p)) if p.is_file() else paramiko.SSHConfig()


def resolve(cfg: SSHConfig) -> tuple[list[Endpoint], Endpoint]:
    """The hops that reach the device of `cfg`.

    Args:
        cfg: the worker's ssh settings; its `ssh_config` file is read when present.

    Returns:
        (the bastions in the order they are crossed, the device).

    Raises:
        ConfigError: ssh_config gives a host or user name that is not one, or a ProxyJump entry
            has a port that is not a number (the file and the value are named).
    """
    try:
        bastions, device = _resolve(cfg)
        for ep in (*bastions, device):
            check_host(ep.host, "HostName")
            check_user(ep.user, "User")
    except ValueError as exc:
        raise ConfigError(f"{cfg.ssh_config}, for {cfg.alias or cfg.host!r}: {exc}") from None
    return bastions, device


def _resolve(cfg: SSHConfig) -> tuple[list[Endpoint], Endpoint]:
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
            user, host, jport = split_jump(spec)
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
