"""The ssh transport's pure parts, without a device: settings, hop resolution, the pipe read loop.

The end-to-end behaviour runs against real sshd servers in test_ssh.py; these are fast and need
no lab.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcore.errors import ConfigError
from fedcore.transport.base import Pipe
from fedcore.transport.ssh.config import Endpoint, SSHConfig, split_jump
from fedcore.transport.ssh.resolution import resolve


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("gate", (None, "gate", None)),
        ("ops@gate:2222", ("ops", "gate", 2222)),
        (" ssh://ops@gate ", ("ops", "gate", None)),
        ("[fe80::1]:2200", (None, "fe80::1", 2200)),
        ("fe80::1", (None, "fe80::1", None)),
    ],
)
def test_split_jump(spec: str, parsed: tuple) -> None:
    assert split_jump(spec) == parsed


def test_endpoint_known_hosts_name() -> None:
    assert Endpoint("10.0.0.5", 22, "u", ()).known_hosts_name == "10.0.0.5"
    assert Endpoint("10.0.0.5", 2222, "u", ()).known_hosts_name == "[10.0.0.5]:2222"
    assert str(Endpoint("h", 22, "u", ())) == "u@h:22"


def test_resolve_applies_ssh_config_and_proxyjump(tmp_path: Path) -> None:
    conf = tmp_path / "config"
    conf.write_text(
        "Host jet\n  HostName 10.0.0.7\n  Port 2201\n  User nvidia\n"
        f"  IdentityFile {tmp_path}/id_jet\n  ProxyJump ops@gate:2222,edge\n"
        "Host edge\n  HostName 10.0.0.2\n  User edgeuser\n"
    )
    bastions, device = resolve(SSHConfig(alias="jet", ssh_config=str(conf)))
    assert device == Endpoint("10.0.0.7", 2201, "nvidia", (f"{tmp_path}/id_jet",))
    assert bastions == [
        Endpoint("gate", 2222, "ops", (f"{tmp_path}/id_jet",)),
        Endpoint("10.0.0.2", 22, "edgeuser", (f"{tmp_path}/id_jet",)),
    ]
    # An explicit port wins over ssh_config's Port, as `ssh -p` does.
    _, device = resolve(SSHConfig(alias="jet", port=22, ssh_config=str(conf)))
    assert device.port == 22


@pytest.mark.parametrize(
    "entry, named",
    [
        ("  HostName -oProxyCommand=touch_x\n", "HostName '-oProxyCommand=touch_x'"),
        ("  HostName 10.0.0.7\n  User -x\n", "User '-x'"),
        ("  HostName 10.0.0.7\n  ProxyJump ops@gate:22a\n", "22a"),
    ],
)
def test_resolve_refuses_what_ssh_config_gives_that_is_not_a_name(
    tmp_path: Path, entry: str, named: str
) -> None:
    conf = tmp_path / "config"
    conf.write_text("Host jet\n" + entry)
    with pytest.raises(ConfigError) as info:
        resolve(SSHConfig(alias="jet", ssh_config=str(conf)))
    assert str(conf) in str(info.value) and named in str(info.value)


class ScriptedPipe(Pipe):
    """A pipe whose reads come from a script: bytes, b"" (end of stream) or TimeoutError."""

    description = "scripted worker"

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.asked: list[int] = []

    def read_available(self, n: int, wait: float | None) -> bytes:
        self.asked.append(n)
        step = self.script.pop(0)
        if step is TimeoutError:
            raise TimeoutError
        return step[:n]

    def end_reason(self) -> str:
        return " (exit status 3)"

    def send(self, data: bytes, timeout: float | None = None) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        return True

    def close(self, timeout: float = 5.0) -> None:
        pass


def test_read_exact_joins_pieces() -> None:
    pipe = ScriptedPipe([b"ab", b"cde", b"fg"])
    assert pipe.read_exact(6, 5.0) == b"abcdef"
    assert pipe.asked == [6, 4, 1]


def test_read_exact_end_before_any_byte_is_eof() -> None:
    with pytest.raises(EOFError, match=r"scripted worker closed its output \(exit status 3\)"):
        ScriptedPipe([b""]).read_exact(4, None)


def test_read_exact_end_mid_frame_is_a_connection_error() -> None:
    with pytest.raises(ConnectionError, match=r"mid-frame \(exit status 3\)"):
        ScriptedPipe([b"ab", b""]).read_exact(4, None)


def test_read_exact_timeout_names_the_pipe() -> None:
    with pytest.raises(TimeoutError, match="scripted worker sent nothing for 2s"):
        ScriptedPipe([b"a", TimeoutError]).read_exact(4, 2.0)
    pipe = ScriptedPipe([b"a"])
    with pytest.raises(TimeoutError):
        pipe.read_exact(1, 0.0)  # no time at all: no read is attempted
    assert pipe.asked == []


def test_known_hosts_lines_paramiko_trips_on_are_skipped_not_raised(tmp_path: Path) -> None:
    from fedcore.transport.ssh.knownhosts import load_known_hosts

    good = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    known = tmp_path / "known_hosts"
    known.write_text(
        "# a comment\n"
        "|1|bad|salt ssh-ed25519 " + good + "\n"  # paramiko's lookup asserts on this
        "host-only-one-field\n"
        "badkey ssh-ed25519 !!!notbase64\n"
        "[10.0.0.5]:2222 ssh-ed25519 " + good + "\n"
    )
    loaded = load_known_hosts(known, "alice")
    assert [host for host, _ in loaded.pairs] == ["[10.0.0.5]:2222"]
    assert loaded.host_keys().lookup("[10.0.0.5]:2222") is not None
