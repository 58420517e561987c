"""Config files as an attacker would write them: repeated keys, names that read as options,
hosts that are shell commands. Each is refused by `load_config` with the field, the value and
the fix, before anything uses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from fedcore.config import load_config
from fedcore.errors import ConfigError
from fedcore.yamlfile import load_yaml
from flows.cli import main

BASE = "rounds: 2\nworkers:\n  - {name: alice, labels: [0]}\n  - {name: testing, role: evaluator}\n"


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("rounds: 40\nseed: 1\nrounds: 4\n" + BASE.split("\n", 1)[1], "rounds", (1, 3)),
        (BASE + "train:\n  lr: 0.1\n  steps: 2\n  lr: 5\n", "lr", (6, 8)),
        (BASE.replace("{name: alice,", "{name: alice, name: mallory,"), "name", (3, 3)),
    ],
)
def test_a_repeated_key_is_refused_with_key_and_lines(
    tmp_path: Path, text: str, key: str, lines: tuple[int, int]
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: key {key!r} is given twice in the same mapping (line {lines[0]} and line "
        f"{lines[1]}); keep one of them"
    )


def test_a_repeated_key_in_an_inventory_or_deployments_file_is_refused(tmp_path: Path) -> None:
    inv = _write(tmp_path, "workers:\n  - name: a\n    labels: [0]\n    labels: [1]\n", "inv.yaml")
    cfg = _write(tmp_path, f"rounds: 1\ninventory: {inv}\n")
    with pytest.raises(
        ConfigError, match=r"inv.yaml: key 'labels' is given twice .*line 3 and line 4"
    ):
        load_config(cfg)

    from flows.deployments import load_deployments

    deps = _write(
        tmp_path,
        "deployments:\n  seed: {config_path: configs/seed.yaml}\n  seed: {config_path: x.yaml}\n",
        "d.yaml",
    )
    with pytest.raises(ConfigError, match=r"key 'seed' is given twice .*line 2 and line 3"):
        load_deployments(deps)


def test_merge_keys_still_work_and_nothing_but_plain_data_is_built() -> None:
    data = load_yaml("base: &b {lr: 0.1, steps: 2}\ntrain:\n  <<: *b\n  lr: 0.5\n", "t")
    assert data["train"] == {"lr": 0.5, "steps": 2}
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml("x: !!python/object/apply:os.system ['true']\n", "t")


def test_cli_set_value_with_a_repeated_key_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit, match=r"--set strategy: key 'name' is given twice"):
        main(
            [
                "run",
                str(ROOT / "configs" / "smoke.yaml"),
                "--set",
                "strategy={name: mean, name: fedavg}",
            ]
        )


@pytest.mark.parametrize(
    ("entry", "field", "value"),
    [
        ("{name: -alice, labels: [0]}", "workers.0.name", "-alice"),
        ("{name: ../../x, labels: [0]}", "workers.0.name", "../../x"),
        (
            "{name: a, python: 'python3 -c evil', labels: [0]}",
            "workers.0.python",
            "python3 -c evil",
        ),
        ("{name: a, transport: ssh, ssh: {host: 'x$(id)'}}", "workers.0.ssh.host", "x$(id)"),
        (
            "{name: a, transport: ssh, ssh: {host: -oProxyCommand=sh}}",
            "workers.0.ssh.host",
            "-oProxyCommand=sh",
        ),
        ("{name: a, transport: ssh, ssh: {alias: 'j;id'}}", "workers.0.ssh.alias", "j;id"),
        (
            "{name: a, transport: ssh, ssh: {host: h, user: '-l root'}}",
            "workers.0.ssh.user",
            "-l root",
        ),
        (
            "{name: a, transport: ssh, ssh: {host: h, python: 'py $(id)'}}",
            "workers.0.ssh.python",
            "py $(id)",
        ),
    ],
)
def test_names_hosts_users_and_programs_are_checked_by_pattern(
    tmp_path: Path, entry: str, field: str, value: str
) -> None:
    path = _write(tmp_path, f"rounds: 1\nworkers:\n  - {entry}\n  - {{name: t, role: evaluator}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"  {field}: Value error, " in msg and repr(value) in msg, msg
    assert "not starting with '-'" in msg or "starting with a letter or digit" in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [("name", "../../.."), ("tracking.experiment", "../x"), ("tracking.registered_model", "-m")],
)
def test_experiment_and_record_names_are_checked(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: Value error, name '{value}' is not allowed"):
        load_config(ROOT / "configs" / "smoke.yaml", {key: value})


def test_a_host_that_is_a_command_never_reaches_match_exec(tmp_path: Path) -> None:
    """The CVE-2023-51385 class: with `Match exec` in ssh_config, paramiko (like OpenSSH < 9.6)
    hands the host name to a shell. Shown on paramiko directly; the config refuses the host."""
    marker = tmp_path / "RAN"
    ssh_config = _write(tmp_path, 'Match exec "test %h = jetson"\n  User jetson\n', "ssh_config")
    host = f"x$(touch {marker})"
    probe = "import paramiko, sys; paramiko.SSHConfig.from_path(sys.argv[1]).lookup(sys.argv[2])"
    subprocess.run(
        [sys.executable, "-c", probe, str(ssh_config), host],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert marker.exists()  # the attack, as it was
    marker.unlink()

    entry = f"{{name: a, transport: ssh, ssh: {{host: '{host}', ssh_config: {ssh_config}}}}}"
    path = _write(tmp_path, f"rounds: 1\nworkers:\n  - {entry}\n")
    assert main(["run", str(path)]) == 2
    assert not marker.exists()
