"""The accountant against published numbers.

- TensorFlow Privacy, tutorials/README.md ("Select Parameters" table, MNIST, n = 60,000, batch
  256, delta = 1e-5): noise 1.12 for 60 epochs -> epsilon 2.92; noise 1.2 for 10 epochs -> 1.20.
- Abadi et al. 2016, "Deep Learning with Differential Privacy", Sec. 3.1: q = 0.01, sigma = 4,
  delta = 1e-5, T = 10,000 steps -> epsilon about 1.26 with the moments accountant.

Those used the classic RDP -> (epsilon, delta) conversion (Mironov 2017, Prop. 3); dp-accounting's
RdpAccountant, which `epsilon` uses, converts with a tighter bound, so its values are lower: both
are checked, the latter pinned.
"""

from __future__ import annotations

import math

import pytest

from fedcore.privacy.accountant import DeviceLedger, classic_epsilon, epsilon

TF_PRIVACY = [  # (noise multiplier, epochs, published epsilon, ours with the tighter conversion)
    (1.12, 60, 2.92, 2.5186),
    (1.2, 10, 1.20, 0.9316),
]


@pytest.mark.parametrize("noise,epochs,published,tighter", TF_PRIVACY)
def test_tensorflow_privacy_tutorial_values(noise, epochs, published, tighter) -> None:
    steps, q = epochs * 60000 // 256, 256 / 60000
    assert round(classic_epsilon(steps, q, noise, 1e-5), 2) == published
    ours = epsilon(steps, q, noise, 1e-5)
    assert ours < published and ours == pytest.approx(tighter, abs=1e-3)


def test_abadi_et_al_moments_accountant_example() -> None:
    assert round(classic_epsilon(10_000, 0.01, 4.0, 1e-5), 2) == 1.26
    assert epsilon(10_000, 0.01, 4.0, 1e-5) == pytest.approx(1.0355, abs=1e-3)


def test_no_noise_is_no_privacy_and_no_steps_is_zero() -> None:
    assert epsilon(10, 0.1, 0.0, 1e-5) == math.inf
    assert epsilon(0, 0.1, 1.0, 1e-5) == 0.0


def test_ledger_composes_rounds_and_stops_before_the_budget() -> None:
    ledger = DeviceLedger(delta=1e-5, target_epsilon=2.0)
    eps = [ledger.record("alice", 100, 32 / 24000, 1.0) for _ in range(3)]
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(epsilon(300, 32 / 24000, 1.0, 1e-5))  # rounds compose
    assert ledger.epsilon("bob") == 0.0
    assert not ledger.would_exceed("alice", 100, 32 / 24000, 1.0)
    assert ledger.would_exceed("alice", 100_000, 32 / 24000, 1.0)
    again = DeviceLedger.from_state(ledger.state_dict())
    assert again.epsilon("alice") == ledger.epsilon("alice")
