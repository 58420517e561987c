"""Configuration: the seed config is exact, and bad input gives one clear message per field."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from fedcore.config import load_config, parse_config
from fedcore.errors import ConfigError
from fedcore.shards import ShardSpec
from flows.cli import main


def test_seed_config_is_the_seed_experiment() -> None:
    cfg = load_config(ROOT / "configs" / "seed.yaml")
    assert (cfg.seed, cfg.rounds, cfg.strategy.name) == (1, 40, "mean")
    assert (cfg.train.steps, cfg.train.batch_size) == (10, 32)
    assert cfg.train.lr_at(1) == 0.1
    assert abs(cfg.train.lr_at(11) - 0.1 * 0.98**10) < 1e-15
    assert cfg.train.lr_at(400) == 0.001  # the floor
    assert [r for r in range(1, 41) if cfg.evaluation.due(r, 40)] == [1, 11, 21, 31, 40]
    assert {w.name: w.shard() for w in cfg.workers} == {
        "alice": ShardSpec.by_labels([0, 1, 2, 3]),
        "bob": ShardSpec.by_labels([4, 5, 6]),
        "charlie": ShardSpec.by_labels([7, 8, 9]),
        "testing": ShardSpec(split="test"),
    }
    assert cfg.digit_groups() == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert cfg.required_updates() == 3


def test_overrides_are_validated_like_the_file() -> None:
    cfg = load_config(ROOT / "configs" / "seed.yaml", {"rounds": 2, "train.lr": 0.05})
    assert cfg.rounds == 2 and cfg.train.lr == 0.05
    # a shortened training still ends with an evaluation; listed rounds past it are skipped
    assert [r for r in range(1, 3) if cfg.evaluation.due(r, 2)] == [1, 2]
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(ROOT / "configs" / "seed.yaml", {"train.lr": -1})


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


BASE = "workers: [{name: alice, labels: [0]}]\n"


@pytest.mark.parametrize(
    ("text", "field", "detail"),
    [
        (BASE + "roundz: 3\n", "roundz", "unknown field"),
        (BASE + "rounds: many\n", "rounds", "valid integer"),
        (BASE + "rounds: -2\n", "rounds", "greater than 0"),
        (BASE + "train: {lr: 0}\n", "train.lr", "greater than 0"),
        (BASE + "strategy: {name: fedsgd}\n", "strategy", "fedsgd"),
        (
            "workers: [{name: alice, labels: [0, 12]}]\n",
            "workers.0.labels.1",
            "less than or equal to 9",
        ),
        (
            "workers: [{name: a, labels: [0]}, {name: a, labels: [1]}]\n",
            "(top level)",
            "repeated: ['a']",
        ),
        ("workers: [{name: t, role: evaluator}]\n", "(top level)", "role: trainer"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, text: str, field: str, detail: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    msg = str(err.value)
    assert f"  {field}" in msg
    assert detail in msg


def test_cli_refuses_bad_config_before_training(tmp_path: Path, capsys) -> None:
    assert main(["run", str(_write(tmp_path, BASE + "rounds: -1\n"))]) == 2
    err = capsys.readouterr().err
    assert "rounds: Input should be greater than 0 (got -1)" in err


def test_cli_names_a_missing_data_dir(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-mnist"
    assert main(["run", str(ROOT / "configs" / "smoke.yaml"), "--set", f"data_dir={missing}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "fedmnist data" in err and "alice" in err


def test_cli_names_a_missing_config_file(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_every_recorded_config_loads_again_as_a_resume_does() -> None:
    # a resumed training re-reads the config its state.json recorded, every default included
    for name in ("seed", "smoke", "best", "robust", "async"):  # the others need an inventory
        path = ROOT / "configs" / f"{name}.yaml"
        cfg = load_config(path, {"train.compression.name": "int8"})
        again = parse_config(cfg.model_dump(mode="json"), f"resumed {path.name}")
        assert again == cfg, path.name


def test_an_inventory_override_replaces_the_fleet(tmp_path: Path) -> None:
    seed = ROOT / "configs" / "seed.yaml"
    iid = ROOT / "configs" / "local-iid.yaml"
    cfg = load_config(seed, {"inventory": str(iid)})  # a file with workers: they are replaced
    assert [w.name for w in cfg.workers] == ["iid-0", "iid-1", "iid-2", "testing"]
    assert cfg.workers[1].shard() == ShardSpec.iid(1, 3, 1, "train")
    assert cfg.digit_groups() == []  # no label shards: no digit groups to report
    lab = load_config(ROOT / "configs" / "lab.yaml", {"inventory": "local-iid.yaml"})
    assert len(lab.workers) == 4  # a file with its own inventory; relative to the config's folder
    assert lab.model_dump(exclude={"workers"}) == load_config(
        ROOT / "configs" / "lab.yaml", {"inventory": str(iid)}
    ).model_dump(exclude={"workers"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers:\n  - {name: a, labels: [0], transport: ssh}\n")
    with pytest.raises(ConfigError, match=r"workers.0: Value error, transport: ssh needs"):
        load_config(seed, {"inventory": str(bad)})  # validated like the file's own workers
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(seed, {"inventory": str(tmp_path / "none.yaml")})


def test_privacy_sections_are_recorded_only_when_set() -> None:
    # off, the record (MLflow params, config.json, config_hash) is what it was before they existed
    seed = load_config(ROOT / "configs" / "seed.yaml")
    assert "privacy" not in seed.recorded() and "secure_aggregation" not in seed.recorded()
    private = load_config(ROOT / "configs" / "seed.yaml", {"privacy.enabled": True})
    assert private.recorded()["privacy"]["noise_multiplier"] == 1.0
    assert private.config_hash() != seed.config_hash()
    for cfg in (seed, private):  # a resume reads either record back to the same config
        assert parse_config(cfg.recorded(), "resumed") == cfg
        assert parse_config(cfg.model_dump(mode="json"), "resumed") == cfg
