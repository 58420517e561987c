"""The coordinator's privacy budget (fedcore.privacy.budget) against published numbers.

Abadi et al. 2016, "Deep Learning with Differential Privacy", Sec. 3.1: q = 0.01, sigma = 4,
delta = 1e-5, T = 10,000 steps -> epsilon 1.26 with the moments accountant; dp-accounting's
tighter RDP conversion gives 1.0355 (tests/fedcore/test_accountant.py pins both). Here that
device is one with 10,000 examples, batches of 100 and rounds of 1,000 steps, so its epsilon after
10 rounds is that value; a device with 5,000 examples samples at q = 0.02.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import pytest

from fedcore.config import load_config
from fedcore.privacy.accountant import epsilon
from fedcore.privacy.budget import PrivacyBudget
from fedcore.privacy.errors import PrivacyBudgetSpent
from fedcore.privacy_config import PrivacyConfig
from fedcore.training import TrainPlan

ROOT = Path(__file__).resolve().parents[2]
Spent = Literal["stop-device", "stop-training"]
PLAN = TrainPlan(steps=1000, batch_size=100, dp_noise_multiplier=4.0, dp_max_grad_norm=1.0)
EXAMPLES = {"alice": 10_000, "bob": 5_000}
# epsilon(k * 1000 steps) at delta 1e-5, sigma 4: q = 0.01 (alice) and q = 0.02 (bob)
ALICE = {1: 0.3012, 2: 0.4358, 10: 1.0355, 11: 1.0909}
BOB = {1: 0.6372, 2: 0.9232, 3: 1.1487}


def budget(on_spent: Spent = "stop-device", target: float = 1.05) -> PrivacyBudget:
    config = PrivacyConfig(
        enabled=True, noise_multiplier=4.0, target_epsilon=target, on_budget_spent=on_spent
    )
    return PrivacyBudget(config, ["alice", "bob"])


def test_the_table_is_the_accountants() -> None:
    for k, eps in ALICE.items():
        assert epsilon(1000 * k, 0.01, 4.0, 1e-5) == pytest.approx(eps, abs=1e-4)
    for k, eps in BOB.items():
        assert epsilon(1000 * k, 0.02, 4.0, 1e-5) == pytest.approx(eps, abs=1e-4)


def test_a_spent_device_is_stopped_and_the_rest_train_to_the_published_epsilon() -> None:
    b = budget()
    for rnd in range(1, 11):
        admitted = b.admit(rnd, PLAN, EXAMPLES, quorum=1)
        # bob's third round would take him to 1.1487 > 1.05: he trains rounds 1 and 2 only
        assert admitted == (["alice", "bob"] if rnd <= 2 else ["alice"])
        assert b.newly_stopped(rnd) == (["bob"] if rnd == 3 else [])
        b.charge(PLAN, admitted, EXAMPLES)
    assert b.metrics() == pytest.approx({"epsilon/alice": 1.0355, "epsilon/bob": 0.9232}, abs=1e-4)
    assert b.epsilon("alice") <= 1.05 and b.epsilon("bob") <= 1.05  # nobody above the budget
    with pytest.raises(PrivacyBudgetSpent, match=r"round 11: only 0 device\(s\) have privacy"):
        b.admit(11, PLAN, EXAMPLES, quorum=1)  # alice's 11th would be 1.0909


def test_stop_training_ends_before_the_first_device_passes() -> None:
    b = budget("stop-training")
    for rnd in (1, 2):
        b.charge(PLAN, b.admit(rnd, PLAN, EXAMPLES, quorum=1), EXAMPLES)
    with pytest.raises(PrivacyBudgetSpent) as err:
        b.admit(3, PLAN, EXAMPLES, quorum=1)
    text = str(err.value)
    assert "round 3: the privacy budget of bob is spent (epsilon bob 0.923 now" in text
    assert "target_epsilon 1.05 at delta 1e-05" in text and "stop-training" in text
    assert not err.value.transient and b.stopped == {}


def test_too_few_devices_left_for_the_quorum_ends_the_training() -> None:
    b = budget()
    for rnd in (1, 2):
        b.charge(PLAN, b.admit(rnd, PLAN, EXAMPLES, quorum=2), EXAMPLES)
    with pytest.raises(PrivacyBudgetSpent, match=r"only 1 device\(s\) .*alice; stopped: bob.*2"):
        b.admit(3, PLAN, EXAMPLES, quorum=2)


def test_every_device_sent_a_request_is_charged_and_unknown_counts_overstate() -> None:
    b = budget(target=100.0)
    # bob was asked to train but never answered: he is charged all the same
    eps = b.charge(PLAN, ["alice", "bob"], EXAMPLES)
    assert eps == pytest.approx({"alice": ALICE[1], "bob": BOB[1]}, abs=1e-4)
    assert PrivacyBudget.sample_rate(PLAN, None) == 1.0  # every example, every step
    assert PrivacyBudget.sample_rate(PLAN, 50) == 1.0
    assert b.charge(PLAN, ["alice"], {"alice": None})["alice"] > 10
    assert budget().admit(1, PLAN, {"alice": 10_000, "bob": None}, quorum=1) == ["alice"]


def test_state_survives_a_resume_through_json() -> None:
    b = budget()
    for rnd in range(1, 4):
        b.charge(PLAN, b.admit(rnd, PLAN, EXAMPLES, quorum=1), EXAMPLES)
    again = budget()
    again.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert again.metrics() == b.metrics() and again.stopped == {"bob": 3}
    assert again.admit(4, PLAN, EXAMPLES, quorum=1) == ["alice"]
    other = PrivacyBudget(PrivacyConfig(enabled=True, delta=1e-6), ["alice", "bob"])
    with pytest.raises(ValueError, match="delta 1e-05, the config says 1e-06"):
        other.load_state_dict(b.state_dict())
    with pytest.raises(ValueError, match="malformed"):
        other.load_state_dict({"ledger": {}})


def test_the_seed_split_and_budget_at_noise_one() -> None:
    cfg = load_config(ROOT / "configs/best.yaml", {"privacy.enabled": True})
    b = PrivacyBudget(cfg.privacy, [w.name for w in cfg.trainers])
    examples = {"alice": 24754, "bob": 17181, "charlie": 18065}  # the seed's shards
    for rnd in range(1, cfg.rounds + 1):
        plan = cfg.plan(rnd)
        b.charge(plan, b.admit(rnd, plan, examples, cfg.required_updates()), examples)
    expected = {"epsilon/alice": 0.6809, "epsilon/bob": 0.7521, "epsilon/charlie": 0.7492}
    assert b.metrics() == pytest.approx(expected, abs=1e-4)
    assert max(b.metrics().values()) <= cfg.privacy.target_epsilon and not b.stopped


def test_statement_says_what_is_protected_and_how() -> None:
    text = budget().statement()
    for words in (
        "Example-level differential privacy, per device",
        "(at most 1.05, 1e-05)",
        "the coordinator included",
        "clipped to L2 norm 1",
        "noise of 4 x that norm",
        "dp-accounting RDP",
        "epsilon/<device>",
        "trains no more",
        "not about a device's data as a whole",
    ):
        assert words in text
    assert "the training ends" in budget("stop-training").statement()


def test_no_budget_without_privacy() -> None:
    with pytest.raises(ValueError, match="privacy.enabled"):
        PrivacyBudget(PrivacyConfig(), ["alice"])
    assert math.isinf(epsilon(10, 0.1, 0.0, 1e-5))
