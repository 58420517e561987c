"""The `secure_aggregation:` and `privacy:` sections and their composition rules, on the real
ExperimentConfig (its two fields and `check_composition` in its validator), and loading the
recipes with secure aggregation on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from fedcore.config import ExperimentConfig, load_config, parse_config
from fedcore.errors import ConfigError
from fedcore.model import weight_spec
from fedcore.privacy.secagg_coordinator import SecAggCoordinator, block_tensors
from fedcore.privacy.secagg_device import SecAggDevice
from fedcore.privacy_config import evaluates_workers, screening_factor, secagg_setup

ROOT = Path(__file__).resolve().parents[2]

WORKERS = [
    {"name": "alice", "labels": [0, 1, 2, 3]},
    {"name": "bob", "labels": [4, 5, 6]},
    {"name": "charlie", "labels": [7, 8, 9]},
    {"name": "testing", "role": "evaluator"},
]


def config(**raw: Any) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"workers": WORKERS, **raw})


def refused(match: str, **raw: Any) -> None:
    with pytest.raises(ValidationError, match=match):
        config(**raw)


SECAGG = {"enabled": True}


def test_defaults_are_off_and_the_seed_config_is_unchanged() -> None:
    c = config()
    assert not c.secure_aggregation.enabled and not c.privacy.enabled
    assert screening_factor(c) == 10.0


def test_secure_aggregation_with_the_seed_and_best_recipes() -> None:
    c = config(secure_aggregation=SECAGG)
    assert c.secure_aggregation.threshold_for(3) == 2 and c.secure_aggregation.degree_for(3) == 2
    assert screening_factor(c) == 0.0  # the default screening is off, replaced by clipping
    assert not evaluates_workers(c) and evaluates_workers(config())
    best = {"name": "scaffold", "weighting": "unweighted", "momentum": 0.8, "nesterov": True}
    config(secure_aggregation=SECAGG, strategy=best, privacy={"enabled": True})


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "clipped-mean"])
def test_robust_aggregation_and_secure_aggregation_are_mutually_exclusive(name: str) -> None:
    refused(
        f"secure_aggregation and strategy {name} are mutually exclusive",
        secure_aggregation=SECAGG,
        strategy={"name": name, "weighting": "unweighted"},
    )


def test_the_other_compositions_are_refused_with_the_fix() -> None:
    refused("remove it \\(or set 0\\)", secure_aggregation=SECAGG, screening={"norm_factor": 5})
    config(secure_aggregation=SECAGG, screening={"norm_factor": 0})
    refused(
        "scores each worker's own model", secure_aggregation=SECAGG, evaluation={"workers": True}
    )
    refused(
        "not strategy fedavg weighted by samples",
        secure_aggregation=SECAGG,
        strategy={"name": "fedavg"},
    )
    samples = {"name": "fedavgm", "weighting": "samples"}
    refused("weighting: unweighted", secure_aggregation=SECAGG, strategy=samples)
    refused("schedule.mode: sync", secure_aggregation=SECAGG, schedule={"mode": "async"})
    refused(
        "replaces train.compression",
        secure_aggregation=SECAGG,
        train={"compression": {"name": "fp16"}},
    )
    refused("must be a majority", secure_aggregation={"enabled": True, "threshold": 4})
    refused("quorum \\(1 updates\\) is below", secure_aggregation=SECAGG, quorum=1)
    refused("greater than 0.5", secure_aggregation={"enabled": True, "threshold": 0.4})


def test_privacy_section() -> None:
    c = config(privacy={"enabled": True, "noise_multiplier": 1.1, "target_epsilon": 2})
    assert c.privacy.delta == 1e-5 and c.privacy.on_budget_spent == "stop-device"
    refused("gives no privacy", privacy={"enabled": True, "noise_multiplier": 0})
    refused("on_budget_spent", privacy={"enabled": True, "on_budget_spent": "ignore"})
    refused("Extra inputs", privacy={"enabled": True, "epsilon": 2})


def test_the_rounds_setup_follows_the_config() -> None:
    best = {"name": "scaffold", "weighting": "unweighted"}
    c = config(secure_aggregation=SECAGG, strategy=best)
    spec = weight_spec()
    trainers = ["alice", "bob", "charlie"]
    s = secagg_setup(c, 7, trainers, spec)
    assert (s.round, s.participants, s.threshold, s.degree) == (7, tuple(trainers), 2, 2)
    assert [(b.name, b.length) for b in s.blocks] == [
        ("delta", 431_080),
        ("control_delta", 431_080),
    ]
    # a whole round on it; the mean delta comes back as the model's named tensors
    devices = {n: SecAggDevice(n, s) for n in trainers}
    coord = SecAggCoordinator(s)
    books = coord.collect_keys({n: d.advertise() for n, d in devices.items()})
    relayed = coord.collect_shares({n: devices[n].share_keys(b) for n, b in books.items()})
    values = {
        n: {
            "delta": torch.full((431_080,), 0.001 * (i + 1), dtype=torch.float64),
            "control_delta": torch.zeros(431_080, dtype=torch.float64),
        }
        for i, n in enumerate(trainers)
    }
    requests = coord.collect_masked({n: devices[n].mask(r, values[n]) for n, r in relayed.items()})
    result = coord.collect_unmask({n: devices[n].unmask(r) for n, r in requests.items()})
    mean = block_tensors(result, "delta", spec)
    assert list(mean) == list(spec)
    assert all(t.shape == spec[k][0] and t.dtype == spec[k][1] for k, t in mean.items())
    assert float(mean["fc1.weight"].mean()) == pytest.approx(0.002, abs=1e-8)


def test_loading_a_recipe_with_secure_aggregation() -> None:
    # the seed's and the best recipe score each worker's model, which secure aggregation never
    # shows: the file's explicit `workers: true` is refused with the fix, and accepted once off
    for recipe in ("seed", "best"):
        with pytest.raises(ConfigError, match="scores each worker's own model"):
            load_config(ROOT / f"configs/{recipe}.yaml", {"secure_aggregation.enabled": True})
        on = load_config(
            ROOT / f"configs/{recipe}.yaml",
            {"secure_aggregation.enabled": True, "evaluation.workers": False},
        )
        assert on.secure_aggregation.enabled and not evaluates_workers(on)
    assert parse_config({"workers": WORKERS, "secure_aggregation": SECAGG}).secure_aggregation
    assert load_config(ROOT / "configs/best.yaml", {"privacy.enabled": True}).privacy.enabled


def test_privacy_needs_the_sync_schedule_in_this_version() -> None:
    with pytest.raises(ConfigError, match="privacy with schedule.mode: async is not available"):
        parse_config(
            {"workers": WORKERS, "privacy": {"enabled": True}, "schedule": {"mode": "async"}}
        )
