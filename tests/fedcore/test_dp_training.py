"""DP-SGD in the worker's local step: the plan's DP fields, a DP round through a real worker
process, and the non-private path unchanged to the bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedcore.config import load_config
from fedcore.errors import WireError
from fedcore.mnist import load_shard
from fedcore.model import build_model, initial_weights
from fedcore.protocol import TrainRequest
from fedcore.session import WorkerSession
from fedcore.shards import ShardSpec
from fedcore.training import TrainPlan, batch_indices, train_local
from fedcore.transport.base import WorkerLaunch
from fedcore.transport.local import LocalTransport

ROOT = Path(__file__).resolve().parents[2]
DP = TrainPlan(steps=3, batch_size=16, lr=0.1, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0)
SEED_KEYS = ["batch_size", "label_smoothing", "lr", "momentum", "prox_mu", "scaffold", "steps"]
SEED_KEYS += ["weight_decay"]


def test_a_plan_without_dp_travels_as_before_and_with_dp_round_trips() -> None:
    assert sorted(TrainPlan().to_dict()) == sorted(SEED_KEYS)  # the seed's request, unchanged
    assert sorted(DP.to_dict()) == sorted([*SEED_KEYS, "dp_max_grad_norm", "dp_noise_multiplier"])
    assert TrainPlan.from_dict(DP.to_dict()) == DP


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"dp_noise_multiplier": 1.0}, "needs dp_max_grad_norm > 0"),
        ({"dp_noise_multiplier": -1.0, "dp_max_grad_norm": 1.0}, "finite DP parameters"),
        ({"dp_noise_multiplier": 1e300, "dp_max_grad_norm": 1.0}, "finite DP parameters"),
        ({"dp_noise_multiplier": float("nan"), "dp_max_grad_norm": 1.0}, "finite DP"),
        ({"dp_noise_multiplier": True, "dp_max_grad_norm": 1.0}, "must be a number"),
    ],
)
def test_hostile_dp_fields_are_refused(fields: dict, match: str) -> None:
    with pytest.raises(WireError, match=match):
        TrainPlan.from_dict({**TrainPlan().to_dict(), **fields})


def test_the_config_privacy_section_reaches_the_plan() -> None:
    seed = load_config(ROOT / "configs/seed.yaml")
    assert seed.plan(3) == seed.train.plan(3)  # off: the seed's plan, field for field
    cfg = load_config(
        ROOT / "configs/best.yaml",
        {"privacy.enabled": True, "privacy.noise_multiplier": 1.5, "privacy.max_grad_norm": 0.5},
    )
    plan = cfg.plan(2)
    assert (plan.dp_noise_multiplier, plan.dp_max_grad_norm) == (1.5, 0.5)
    assert plan.lr == cfg.train.lr_at(2) and plan.label_smoothing == 0.1


def seed_loop(weights: dict, x: torch.Tensor, y: torch.Tensor, plan: TrainPlan, seed: int) -> dict:
    """The seed's local step written out: shuffled batches, nll loss, backward, plain SGD."""
    model = build_model(weights)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=plan.lr)
    gen = torch.Generator().manual_seed(seed)
    for idx in batch_indices(y.numel(), plan.steps, plan.batch_size, gen):
        opt.zero_grad(set_to_none=True)
        F.nll_loss(model(x.index_select(0, idx)), y.index_select(0, idx)).backward()
        opt.step()
    return model.state_dict()


def test_without_dp_the_seed_step_is_bit_identical(mnist_dir: Path) -> None:
    x, y = load_shard(str(mnist_dir), ShardSpec.by_labels([4, 5, 6]))
    w0 = initial_weights(1)
    plan = load_config(ROOT / "configs/seed.yaml").plan(1)
    model = build_model(w0)
    metrics = train_local(model, x, y, plan, torch.Generator().manual_seed(7))
    ref = seed_loop(w0, x, y, plan, 7)
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    assert metrics.samples == plan.steps * plan.batch_size


def test_dp_trains_with_secret_noise_and_sample(mnist_dir: Path) -> None:
    x, y = load_shard(str(mnist_dir), ShardSpec.by_labels([4, 5, 6]))
    w0 = initial_weights(1)
    plan = TrainPlan(steps=20, batch_size=32, lr=0.1, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0)
    runs = []
    for _ in range(2):  # the same generator: the coordinator's seed fixes nothing under DP
        model = build_model(w0)
        metrics = train_local(model, x, y, plan, torch.Generator().manual_seed(7))
        runs.append((model.state_dict(), metrics))
    (a, ma), (b, mb) = runs
    assert not torch.equal(a["fc2.weight"], b["fc2.weight"])
    with torch.no_grad():
        before = F.nll_loss(build_model(w0)(x[:2000]), y[:2000]).item()
        after = F.nll_loss(build_model(a)(x[:2000]), y[:2000]).item()
    assert after < before  # noisy, but it learns
    # Poisson batches of expected size 32: 640 expected, a sum of 20 Binomial(17181, 32/17181)
    assert 400 < ma.samples < 900 and ma.steps == 20


@pytest.fixture
def bob(mnist_dir: Path):
    s = WorkerSession(
        WorkerLaunch("bob", str(mnist_dir), ShardSpec.by_labels([4, 5, 6]), threads=1),
        LocalTransport(),
    )
    s.start()
    yield s
    s.close()


def test_a_dp_plan_trains_through_a_worker_process(bob: WorkerSession) -> None:
    bob.hello(timeout=120)
    w0 = initial_weights(1)
    plain = TrainPlan(steps=3, batch_size=16, lr=0.1)
    u_plain = bob.train(TrainRequest(1, plain, 123, w0), timeout=60)
    u_dp = bob.train(TrainRequest(1, DP, 123, w0), timeout=120)
    u_dp2 = bob.train(TrainRequest(1, DP, 123, w0), timeout=120)
    assert u_dp.metrics.steps == 3 and u_dp.num_examples == 17181
    for k in ("conv1.weight", "fc2.bias"):
        assert not torch.equal(u_dp.weights[k], w0[k])  # it trained
        assert not torch.equal(u_dp.weights[k], u_plain.weights[k])  # not the private way
        assert not torch.equal(u_dp.weights[k], u_dp2.weights[k])  # same request, fresh noise
    delta = torch.cat([(u_dp.weights[k] - w0[k]).reshape(-1) for k in w0])
    assert torch.isfinite(delta).all()
