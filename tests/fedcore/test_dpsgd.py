"""DP-SGD's step on the seed's Net: per-example gradients against single-example backward passes,
the clipping bound, and the noise's standard deviation (fixed seeds, statistical bounds)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedcore.model import Net
from fedcore.privacy.dpsgd import (
    add_noise,
    clip_and_sum,
    dp_backward,
    dpsgd_available,
    per_example_gradients,
    poisson_batches,
    secret_generator,
)


def test_secret_generators_differ() -> None:
    a, b = secret_generator(), secret_generator()
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


@pytest.fixture()
def batch() -> tuple[Net, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return Net(), torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)


def _loop_gradients(model: Net, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {k: [] for k, _ in model.named_parameters()}
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        F.nll_loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            assert p.grad is not None
            out[k].append(p.grad.clone())
    return {k: torch.stack(v) for k, v in out.items()}


def test_available() -> None:
    ok, message = dpsgd_available()
    assert ok and message.startswith("torch ")


def test_per_example_gradients_equal_single_example_backward_passes(batch) -> None:
    model, x, y = batch
    grads, losses = per_example_gradients(model, x, y, F.nll_loss)
    expected = _loop_gradients(model, x, y)
    assert set(grads) == set(expected)
    for k in expected:
        assert grads[k].shape == expected[k].shape
        torch.testing.assert_close(grads[k], expected[k], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        each = F.nll_loss(model(x), y, reduction="none")
    torch.testing.assert_close(losses, each, rtol=1e-5, atol=1e-6)


def test_each_example_is_clipped_to_the_bound(batch) -> None:
    model, x, y = batch
    grads, _ = per_example_gradients(model, x, y, F.nll_loss)
    norms = torch.linalg.vector_norm(
        torch.cat([g.reshape(8, -1) for g in grads.values()], 1), dim=1
    )
    c = float(norms.median())  # half the examples get clipped, half do not
    summed, before = clip_and_sum(grads, c)
    torch.testing.assert_close(before, norms)
    for i in range(8):  # clip one example at a time: its clipped norm is min(norm, C)
        one = {k: g[i : i + 1] for k, g in grads.items()}
        clipped, _ = clip_and_sum(one, c)
        norm = float(torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in clipped.values()])))
        assert norm <= c * (1 + 1e-6)
        assert norm == pytest.approx(min(float(norms[i]), c), rel=1e-5)
    total = float(torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in summed.values()])))
    assert total <= 8 * c * (1 + 1e-6)


def test_without_noise_dp_backward_is_the_mean_of_clipped_gradients(batch) -> None:
    model, x, y = batch
    grads, _ = per_example_gradients(model, x, y, F.nll_loss)
    summed, _ = clip_and_sum(grads, 1e6)  # nothing clipped: the plain mean gradient
    loss = dp_backward(model, x, y, F.nll_loss, 1e6, 0.0, torch.Generator().manual_seed(0))
    model2 = Net()
    model2.load_state_dict(model.state_dict())
    F.nll_loss(model2(x), y).backward()
    for (k, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.grad, summed[k] / 8, rtol=1e-4, atol=1e-6)
    assert float(loss) == pytest.approx(float(F.nll_loss(model2(x), y).detach()), rel=1e-5)


def test_noise_has_standard_deviation_sigma_c_over_the_batch() -> None:
    # 431,080 draws: the sample std's own std is about 0.1% of it, so 1% is 10 standard errors
    shapes = {"a": (500, 800), "b": (431_080 - 400_000,)}
    zeros = {k: torch.zeros(s) for k, s in shapes.items()}
    sigma, c, batch_size = 1.3, 0.7, 32
    noisy = add_noise(zeros, c, sigma, batch_size, torch.Generator().manual_seed(17))
    flat = torch.cat([t.reshape(-1) for t in noisy.values()]).double()
    expected = sigma * c / batch_size
    assert float(flat.std()) / expected == pytest.approx(1.0, abs=0.01)
    assert abs(float(flat.mean())) < 5 * expected / math.sqrt(flat.numel())
    # through dp_backward: the gradient minus the noiseless one is that noise
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    dp_backward(model, x, y, F.nll_loss, c, 0.0, torch.Generator().manual_seed(5))
    clean = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    dp_backward(model, x, y, F.nll_loss, c, sigma, torch.Generator().manual_seed(5))
    noisy_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    assert float((noisy_grad - clean).double().std()) / (sigma * c / 4) == pytest.approx(
        1.0, abs=0.01
    )


def test_an_empty_poisson_batch_still_adds_noise() -> None:
    model = Net()
    x, y = torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64)
    dp_backward(model, x, y, F.nll_loss, 1.0, 1.0, torch.Generator().manual_seed(0), 16.0)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    assert float(grads.std()) == pytest.approx(1.0 / 16.0, rel=0.01)


def test_poisson_batches_have_the_sample_rate() -> None:
    sizes = [len(b) for b in poisson_batches(6000, 0.01, 200, torch.Generator().manual_seed(0))]
    mean = sum(sizes) / len(sizes)
    assert mean == pytest.approx(60, abs=3 * math.sqrt(60 / 200) * 3)
    assert len(set(sizes)) > 5  # sizes vary, as Poisson sampling makes them


def test_a_dp_step_trains(batch) -> None:
    # a few DP-SGD steps of SGD on one batch lower its loss (moderate noise, fixed seed)
    model, x, y = batch
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(11)  # in a worker: secret_generator()
    with torch.no_grad():
        first = float(F.nll_loss(model(x), y))
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        dp_backward(model, x, y, F.nll_loss, 1.0, 0.1, g)
        opt.step()
    with torch.no_grad():
        assert float(F.nll_loss(model(x), y)) < first
