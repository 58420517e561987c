"""Secure aggregation over real worker processes (issue 17): three local workers, real sessions.

- the sum the coordinator unmasks equals the plain sum of the same three updates (the same
  requests sent as plain `train` requests) within the quantisation bound, and the next global
  model from it equals the strategy's from the single updates;
- a device that drops after the others masked with it (before its own masked input arrives) is
  left out: the sum of the other two is recovered (threshold 2 of 3); one that drops after
  sending its masked input is still in the sum;
- the coordinator's complete view of a round (every frame it sent and received, kept here): the
  best linear estimate of alice's update from it, even with her self-mask seed reconstructed as
  the coordinator does, has correlation ~0 with her real update; from a plain round's view it
  is her update, correlation 1.0;
- a device whose Python cannot import `cryptography` is refused, naming it and the fix.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from fedcore import wire
from fedcore.model import initial_weights, weight_spec
from fedcore.privacy import primitives, shamir
from fedcore.privacy import secagg_messages as messages
from fedcore.privacy.errors import SecAggAborted, SecAggUnavailable
from fedcore.privacy.fixedpoint import Block, error_bound, flatten
from fedcore.protocol import TrainRequest, Update
from fedcore.seeding import derive_seed
from fedcore.session import WorkerSession
from fedcore.shards import ShardSpec
from fedcore.strategies.fedopt import FedOpt
from fedcore.strategies_sum import aggregate_sum
from fedcore.training import TrainPlan
from fedcore.transport.base import WorkerLaunch
from fedcore.transport.local import LocalTransport
from flows.secure_round import check_devices, exchange, sum_tensors

pytestmark = pytest.mark.slow

NAMES = ("alice", "bob", "charlie")
SHARDS = {
    "alice": ShardSpec.by_labels([0, 1, 2, 3]),
    "bob": ShardSpec.by_labels([4, 5, 6]),
    "charlie": ShardSpec.by_labels([7, 8, 9]),
}
SPEC = weight_spec()
LENGTH = sum(t.numel() for t in initial_weights(1).values())
BLOCK = Block("delta", LENGTH, clip_norm=5.0, bound=1.0)
PLAN = TrainPlan(steps=3, batch_size=16, lr=0.1)


@pytest.fixture(scope="module")
def workers(mnist_dir: Path) -> Iterator[dict[str, WorkerSession]]:
    sessions = {
        n: WorkerSession(WorkerLaunch(n, str(mnist_dir), SHARDS[n], threads=1), LocalTransport())
        for n in NAMES
    }
    for s in sessions.values():
        s.start()
    try:
        for s in sessions.values():
            s.hello(timeout=120)
        yield sessions
    finally:
        for s in sessions.values():
            s.close()


def setup(rnd: int) -> messages.Setup:
    return messages.Setup(rnd, NAMES, 2, 2, 7, (BLOCK,))


def requests(rnd: int) -> dict[str, TrainRequest]:
    w0 = initial_weights(1)
    return {n: TrainRequest(rnd, PLAN, derive_seed(1, n, rnd), w0) for n in NAMES}


def delta(update: Update, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a device masks: its trained weights minus the global ones, flat, in float64."""
    d = {k: update.weights[k].double() - reference[k].double() for k in SPEC}
    return flatten(d, list(SPEC))


def plain_updates(workers: dict[str, WorkerSession], rnd: int) -> dict[str, Update]:
    """The same requests as plain train requests: each device's update in clear."""
    reqs = requests(rnd)
    return {n: workers[n].train(reqs[n], timeout=120) for n in NAMES}


def plain_deltas(workers: dict[str, WorkerSession], rnd: int) -> dict[str, torch.Tensor]:
    """Each device's delta in clear, as it masks it (within the stated range: not clipped)."""
    out = {}
    for n, update in plain_updates(workers, rnd).items():
        x = delta(update, initial_weights(1))
        assert float(x.norm()) < BLOCK.clip_norm and float(x.abs().max()) < BLOCK.bound
        out[n] = x
    return out


def test_the_secure_sum_is_the_plain_sum(workers: dict[str, WorkerSession]) -> None:
    updates = plain_updates(workers, 1)
    plain = {n: delta(u, initial_weights(1)) for n, u in updates.items()}
    done = exchange(workers, setup(1), requests(1), timeout=120)
    assert done.result.count == 3 and done.result.survivors == NAMES and done.failures == []
    expected = plain["alice"] + plain["bob"] + plain["charlie"]
    err = float((done.result.sums["delta"] - expected).abs().max())
    assert err <= error_bound(BLOCK, 3, 3) + 1e-12  # 7e-10: only the fixed point's rounding
    assert float(expected.abs().max()) > 1e-3  # a sum worth comparing
    # every device sent the global model once and got a masked vector back: 4 bytes an entry
    assert all(done.bytes_down[n] > 4 * LENGTH and done.bytes_up[n] > 4 * LENGTH for n in NAMES)
    # the next global model from the sum equals the mean strategy's from the single updates
    w0 = initial_weights(1)
    mean = FedOpt("mean", "unweighted")
    from_updates = mean.aggregate(1, w0, list(updates.values()), [])
    from_sum = aggregate_sum(mean, 1, w0, sum_tensors(done.result, "delta", SPEC), None, 3)
    for k in w0:
        assert torch.allclose(from_sum[k], from_updates[k], atol=1e-6, rtol=0), k


def _kill_on(kind: str, victim: str, workers: dict[str, WorkerSession]):
    """An observer that kills `victim`'s worker process as its `kind` request is about to go."""

    def observe(direction: str, name: str, frame: bytes) -> None:
        if (
            direction == "down"
            and name == victim
            and wire.decode_frame(frame, 1 << 30)[0]["type"] == kind
        ):
            hello = workers[victim].hello_info
            assert hello is not None
            os.kill(hello.pid, signal.SIGKILL)

    return observe


def test_a_device_dropped_after_the_others_masked_is_left_out(
    workers: dict[str, WorkerSession],
) -> None:
    plain = plain_deltas(workers, 2)
    killed = _kill_on("secagg_train", "charlie", workers)
    done = exchange(workers, setup(2), requests(2), timeout=120, observe=killed)
    # alice and bob masked with charlie's pairwise masks; its mask key was reconstructed from
    # their shares (threshold 2 of 3) and the sum of the two recovered
    assert done.result.count == 2 and done.result.survivors == ("alice", "bob")
    assert [(f.worker, f.cause) for f in done.failures] == [("charlie", "unreachable")]
    err = float((done.result.sums["delta"] - plain["alice"] - plain["bob"]).abs().max())
    assert err <= error_bound(BLOCK, 3, 2) + 1e-12
    # a device that drops after sending its masked input is still in the sum: its self-mask
    # seed comes from the other two's shares (charlie's session starts its worker again first)
    workers["charlie"].hello(timeout=120)
    killed = _kill_on("secagg_unmask", "charlie", workers)
    done = exchange(workers, setup(2), requests(2), timeout=120, observe=killed)
    assert done.result.count == 3 and [f.worker for f in done.failures] == ["charlie"]
    expected = plain["alice"] + plain["bob"] + plain["charlie"]
    assert float((done.result.sums["delta"] - expected).abs().max()) <= error_bound(BLOCK, 3, 3)
    # below the round's quorum nothing is unmasked: a round tried again must not reveal a
    # second sum over other devices (the difference of two sums is one device's update)
    workers["charlie"].hello(timeout=120)
    kinds: list[str] = []
    killed = _kill_on("secagg_train", "charlie", workers)

    def watch(direction: str, name: str, frame: bytes) -> None:
        kinds.append(wire.decode_frame(frame, 1 << 30)[0]["type"])
        killed(direction, name, frame)

    with pytest.raises(SecAggAborted, match="the quorum is 3; nothing was unmasked"):
        exchange(workers, setup(2), requests(2), timeout=120, observe=watch, quorum=3)
    assert "secagg_masked" in kinds and "secagg_unmask" not in kinds
    workers["charlie"].hello(timeout=120)


def _correlation_of_best_linear_estimate(
    target: torch.Tensor, columns: list[torch.Tensor]
) -> float:
    """corr(target, X beta) for the least-squares beta over the columns X (and a constant)."""
    x = torch.stack([torch.ones_like(target), *columns], dim=1)
    beta = torch.linalg.lstsq(x, target.unsqueeze(1)).solution
    fit = (x @ beta).squeeze(1)
    return float(torch.corrcoef(torch.stack([fit, target]))[0, 1])


def signed(vector: torch.Tensor) -> torch.Tensor:
    """A vector modulo 2^32 read as signed fixed point, in the block's units."""
    v = vector.to(torch.int64)
    v = torch.where(v >= 2**31, v - 2**32, v)
    return v.double() * BLOCK.bound / ((2**31 - 1) // 3)


def test_the_coordinators_view_hides_each_update(workers: dict[str, WorkerSession]) -> None:
    view: list[tuple[str, str, bytes]] = []
    s = setup(3)
    done = exchange(workers, s, requests(3), timeout=120, observe=lambda *f: view.append(f))
    assert done.result.count == 3
    alice = plain_deltas(workers, 3)["alice"]  # her real update (the same request, in clear)

    masked: dict[str, torch.Tensor] = {}
    seed_shares: dict[int, int] = {}
    for direction, name, frame in view:
        meta, payload = wire.decode_frame(frame, 1 << 30)
        if direction == "down" or meta["type"] not in ("secagg_masked", "secagg_reveal"):
            continue
        msg = messages.decode_meta(meta, payload, s.length)
        if isinstance(msg, messages.MaskedInput):
            masked[name] = msg.vector
        elif isinstance(msg, messages.UnmaskShares):
            seed_shares[s.index(name)] = shamir.share_value(msg.seed_shares["alice"], "share")
    assert sorted(masked) == list(NAMES) and len(seed_shares) == 3
    # The coordinator reconstructs alice's self-mask seed (it must, to unmask the sum); her
    # masked input without it is still hidden by her pairwise masks with bob and charlie.
    seed = shamir.reconstruct(seed_shares, s.threshold, "alice's seed")
    unseeded = (masked["alice"] - primitives.prg_uint32(seed, s.length)) & 0xFFFFFFFF
    columns = [signed(v) for v in masked.values()] + [signed(unseeded)]
    secure = _correlation_of_best_linear_estimate(alice, columns)
    assert abs(secure) < 0.02, secure  # ~0: 5 regressors over 431,080 entries

    # Without secure aggregation the coordinator receives her update itself.
    reqs = requests(3)
    update = workers["alice"].train(reqs["alice"], timeout=120)
    plain = _correlation_of_best_linear_estimate(alice, [delta(update, reqs["alice"].weights)])
    assert plain == pytest.approx(1.0, abs=1e-9)


def test_a_device_without_cryptography_is_refused(mnist_dir: Path, tmp_path: Path) -> None:
    # A worker Python that cannot import `cryptography`: the project's interpreter whose import
    # system finds no such package (a finder first on sys.meta_path, installed at start-up by a
    # sitecustomize module), as on a device without it.
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoCryptography:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'cryptography':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoCryptography())\n"
    )
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH="{blocker}:$PYTHONPATH" exec "{ROOT}/.venv/bin/python" "$@"\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    sessions = {
        n: WorkerSession(
            WorkerLaunch(n, str(mnist_dir), SHARDS[n], threads=1),
            LocalTransport(str(python)) if n == "bob" else LocalTransport(),
        )
        for n in NAMES
    }
    try:
        for session in sessions.values():
            session.hello(timeout=120)
        facts = getattr(sessions["bob"].hello_info, "facts", None)
        if facts is not None:  # the hello says so: refused before the round starts
            assert not facts.get("cryptography")
            with pytest.raises(SecAggUnavailable, match="device 'bob' cannot take part") as err:
                check_devices(sessions, NAMES)
            assert "python3 -m pip install --user cryptography" in str(err.value)
        # whatever its hello says, its answer to the round's setup stops the training
        with pytest.raises(SecAggUnavailable, match="device 'bob' cannot take part") as err:
            exchange(sessions, setup(1), requests(1), timeout=120)
        assert "cryptography" in str(err.value) and "pip install" in str(err.value)
    finally:
        for session in sessions.values():
            session.close()


def test_a_restarted_device_restarts_every_scaffold_control_variate(
    workers: dict[str, WorkerSession],
) -> None:
    """SCAFFOLD under secure aggregation: the server's c is a sum it never saw in parts, so when
    a device comes back as a new process (its c_i gone, still counted in c) it says so in its
    masked input, and c and every device's c_i start again at 0: from the next round c is the
    mean of the devices' new c_i again (the sum of their deltas over 3)."""
    from fedcore.strategies.scaffold import Scaffold

    strategy = Scaffold("unweighted")
    plan = TrainPlan(steps=3, batch_size=16, lr=0.1, scaffold=True)
    blocks = (BLOCK, Block("control_delta", LENGTH, clip_norm=50.0, bound=10.0))
    weights = initial_weights(1)

    def secure_round(rnd: int) -> list[str]:
        reqs = {
            n: TrainRequest(rnd, plan, derive_seed(1, n, rnd), weights, strategy.extras_for(n, rnd))
            for n in NAMES
        }
        done = exchange(workers, messages.Setup(rnd, NAMES, 2, 2, 7, blocks), reqs, timeout=120)
        assert done.result.count == 3
        control = sum_tensors(done.result, "control_delta", SPEC)
        delta_sum = sum_tensors(done.result, "delta", SPEC)
        survivors = done.result.survivors
        aggregate_sum(
            strategy, rnd, weights, delta_sum, control, 3, survivors, lost=done.control_lost
        )
        return done.control_lost

    assert secure_round(11) == [] and secure_round(12) == []
    assert strategy.control is not None and float(strategy.control["fc1.weight"].abs().sum()) > 0
    old = workers["charlie"].hello(timeout=120).pid
    workers["charlie"].kill()
    assert workers["charlie"].hello(timeout=120).pid != old  # a new process: its c_i is gone
    assert secure_round(13) == ["charlie"]
    assert strategy.control is None  # c = 0, and every device is told its c_i is 0 now
    assert {int(strategy.extras_for(n, 14)["control_base"]["round"]) for n in NAMES} == {0}
    assert secure_round(14) == []  # every device in step again, from 0
    assert {int(strategy.extras_for(n, 15)["control_base"]["round"]) for n in NAMES} == {14}
