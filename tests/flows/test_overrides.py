"""What a flow run's parameters may change: training fields only. The inventory, interpreters,
ssh settings, names, paths and the store come from files on the coordinator (the checkout's
configs/ or $FEDMNIST_HOME/configs); `fedmnist run --set` still changes anything, through a
derived file there. Through the flow body itself (`federated_mnist.fn`): every refusal happens
before a worker starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from fedcore.config import load_config
from fedcore.errors import ConfigError
from fedcore.resume import find_run_dir
from flows.cli import derived_config, flow_arguments
from flows.deployments import load_deployments
from flows.federated import federated_mnist
from flows.parameters import check_config_path, check_overrides, config_overrides

SMOKE = str(ROOT / "configs" / "smoke.yaml")


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDMNIST_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("workers.0.python", "/tmp/evil.sh"),
        ("workers", [{"name": "a", "python": "/tmp/evil.sh"}]),
        ("inventory", "/tmp/inv.yaml"),
        ("name", "../../.."),
        ("tracking.uri", "http://attacker:5000"),
        ("screening.norm_factor", 0),
        ("data_dir", "/tmp"),
        ("Train.lr", 1),
    ],
)
def test_overrides_outside_training_fields_are_refused(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        federated_mnist.fn(config_path=SMOKE, overrides={key: value})
    msg = str(err.value)
    assert msg.startswith(f"overrides: {key!r} (= ")
    assert "cannot be set by a flow parameter" in msg
    assert "Set it in the config file on the coordinator" in msg


def test_training_fields_pass() -> None:
    ok = {
        "rounds": 3,
        "seed": 2,
        "train.lr": 0.05,
        "strategy": {"name": "fedavg"},
        "strategy.weighting": "samples",
        "evaluation.every": 2,
        "quorum": 2,
        "timeouts.train": 60,
    }
    assert check_overrides(ok) == ok


def test_config_path_outside_the_config_folders_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    shutil.copyfile(SMOKE, evil)
    with pytest.raises(ConfigError) as err:
        federated_mnist.fn(config_path=str(evil))
    assert f"config_path {str(evil)!r} is outside " in str(err.value)
    assert str(ROOT / "configs") in str(err.value)

    link = ROOT / "configs" / "zz-test-link.yaml"  # a symlink inside points outside: refused
    link.symlink_to(evil)
    try:
        with pytest.raises(ConfigError, match="is outside"):
            federated_mnist.fn(config_path=str(link))
    finally:
        link.unlink()


def test_a_world_writable_config_is_refused(home: Path) -> None:
    cfg = home / "configs" / "x.yaml"
    cfg.parent.mkdir(parents=True)
    shutil.copyfile(SMOKE, cfg)
    cfg.chmod(0o666)
    with pytest.raises(ConfigError, match=r"writable by every user of this host; `chmod o-w"):
        federated_mnist.fn(config_path=str(cfg))


def test_resume_outside_the_runs_folder_is_refused(tmp_path: Path, home: Path) -> None:
    fake = tmp_path / "elsewhere"
    fake.mkdir()
    (fake / "state.json").write_text(json.dumps({"round": 1, "config": {}}))
    with pytest.raises(ConfigError) as err:
        federated_mnist.fn(resume=str(fake))
    assert f"run folder {str(fake)!r} is outside {home / 'runs'}" in str(err.value)
    (home / "runs").mkdir(parents=True)
    with pytest.raises(ConfigError, match="is outside"):
        find_run_dir("../../elsewhere", home / "runs")


def test_deployment_defaults_are_checked_the_same_way(tmp_path: Path) -> None:
    deps = tmp_path / "d.yaml"
    deps.write_text(
        "deployments:\n  seed:\n    config_path: configs/seed.yaml\n"
        "    parameters: {overrides: {workers.0.python: /tmp/evil.sh}}\n"
    )
    with pytest.raises(ConfigError, match=r"deployment seed: overrides: 'workers.0.python'"):
        load_deployments(deps)


def test_cli_set_of_other_fields_goes_through_a_derived_file(home: Path) -> None:
    cfg = load_config(SMOKE, {"tracking.uri": "http://ann:s3cret@h:1", "name": "renamed"})
    path = derived_config(cfg, SMOKE, ["name", "tracking.uri"])
    assert path.parent == home / "configs" and oct(path.stat().st_mode & 0o777) == "0o600"
    text = path.read_text()
    assert text.startswith(f"# {SMOKE} with --set name, tracking.uri (written by fedmnist run)")
    assert load_config(path) == cfg
    assert yaml.safe_load(text)["name"] == "renamed"
    assert check_config_path(path) == path  # a flow run may read it


def test_flow_arguments_split_training_fields_from_the_rest(home: Path, tmp_path: Path) -> None:
    plain = flow_arguments(SMOKE, {"rounds": 2, "data_dir": "/d"})
    assert plain == {"config_path": SMOKE, "overrides": {"rounds": 2}, "data_dir": "/d"}
    mixed = flow_arguments(SMOKE, {"train.steps": 1, "tracking.enabled": False})
    assert mixed["overrides"] == {"train.steps": 1}
    derived = Path(mixed["config_path"])
    assert derived.parent == home / "configs"
    assert load_config(derived).tracking.enabled is False
    elsewhere = tmp_path / "mine.yaml"  # a file outside the config folders is copied in
    shutil.copyfile(SMOKE, elsewhere)
    copied = Path(flow_arguments(str(elsewhere), {})["config_path"])
    assert copied.parent == home / "configs" and load_config(copied) == load_config(elsewhere)


# --- another fleet under the same experiment: `--inventory` and the `inventory` parameter ---

BEST = ROOT / "configs" / "best.yaml"
IID = ROOT / "configs" / "local-iid.yaml"


def test_an_inventory_parameter_replaces_the_workers_with_a_checked_file() -> None:
    merged = config_overrides(BEST, None, rounds=2, inventory="configs/local-iid.yaml")
    assert merged == {"rounds": 2, "inventory": str(IID)}
    cfg = load_config(BEST, merged)
    assert [w.name for w in cfg.workers] == ["iid-0", "iid-1", "iid-2", "testing"]
    assert (cfg.name, cfg.strategy.name, cfg.rounds) == ("best", "scaffold", 2)
    # an experiment file serves as the inventory of its workers (configs/jetsons.yaml)
    jetsons = load_config(BEST, config_overrides(BEST, None, inventory="configs/jetsons.yaml"))
    assert {w.transport for w in jetsons.workers} == {"ssh"}
    assert jetsons.train.label_smoothing == 0.1  # the recipe stays best.yaml's


def test_an_inventory_from_elsewhere_is_refused(tmp_path: Path, home: Path) -> None:
    evil = tmp_path / "inv.yaml"
    evil.write_text("- {name: a, python: /tmp/evil.sh}\n- {name: t, role: evaluator}\n")
    with pytest.raises(ConfigError) as err:
        config_overrides(BEST, None, inventory=str(evil))
    assert f"inventory {str(evil)!r} is outside " in str(err.value)
    assert str(home / "lab") in str(err.value)  # where `fedmnist lab up` writes its inventory
    with pytest.raises(ConfigError, match="inventory 'configs/none.yaml' does not exist"):
        config_overrides(BEST, None, inventory="configs/none.yaml")
    lab = home / "lab" / "lab-workers.yaml"
    lab.parent.mkdir(parents=True)
    shutil.copyfile(IID, lab)
    assert config_overrides(BEST, None, inventory=str(lab)) == {"inventory": str(lab)}
    lab.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by every user of this host"):
        config_overrides(BEST, None, inventory=str(lab))


def test_cli_inventory_runs_the_recipe_on_that_fleet(home: Path, capsys) -> None:
    from flows.cli import main

    argv = ["run", str(BEST), "--inventory", "configs/local-iid.yaml", "--set", "data_dir=/no"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data directory missing for iid-0: /no; iid-1: /no; iid-2: /no; testing: /no" in err
    derived = flow_arguments(str(BEST), {"inventory": str(IID)})
    assert derived["overrides"] is None
    cfg = load_config(derived["config_path"])
    assert [w.name for w in cfg.workers] == ["iid-0", "iid-1", "iid-2", "testing"]
    assert cfg.strategy.name == "scaffold"
