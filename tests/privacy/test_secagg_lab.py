"""Secure aggregation with three lab devices over real sshd (issue 17): each device runs the
shipped worker bundle on the lab's own Python (with `cryptography`, as JetPack's system Python
has it). Round 1: the sum the coordinator unmasks equals the plain sum of the same three updates
within the quantisation bound. Round 2: charlie's connection drops after alice and bob masked
with it (its worker starts again, without the round's state): the sum of the other two is
recovered (threshold 2 of 3). Run one lab module at a time: the lab creates system users."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from labkit import SEED_SHARDS, start_lab

from fedcore import wire
from fedcore.config import ExperimentConfig, load_config
from fedcore.model import initial_weights, weight_spec
from fedcore.privacy.fixedpoint import error_bound, flatten
from fedcore.privacy_config import secagg_setup
from fedcore.protocol import TrainRequest
from fedcore.seeding import derive_seed
from fedcore.session import WorkerSession
from fedcore.training import TrainPlan
from fedlab import LabInfo
from flows.secure_round import exchange

pytestmark = pytest.mark.slow

NAMES = ["alice", "bob", "charlie"]
SPEC = weight_spec()


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, mnist_dir: Path) -> LabInfo:
    shards = {n: SEED_SHARDS[n] for n in NAMES}
    info = start_lab(request, "fedmnist-lab-secagg-", shards, mnist_dir)
    # the lab's device Python carries `cryptography`, as JetPack's does (fedlab.python)
    has = subprocess.run([info.python, "-c", "import cryptography"], capture_output=True)
    assert has.returncode == 0, has.stderr.decode()[-500:]
    return info


@pytest.fixture(scope="module")
def config(lab: LabInfo, tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    path = tmp_path_factory.mktemp("secagg-lab") / "secagg-lab.yaml"
    raw = {
        "name": "secagg-lab",
        "rounds": 2,
        "inventory": str(lab.inventory),
        "secure_aggregation": {"enabled": True},
    }
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.fixture(scope="module")
def sessions(config: ExperimentConfig) -> Iterator[dict[str, WorkerSession]]:
    from flows.federated import make_session

    opened = {w.name: make_session(config, w) for w in config.trainers}
    try:
        with ThreadPoolExecutor(len(opened)) as pool:
            list(pool.map(lambda s: s.hello(timeout=300), opened.values()))
        yield opened
    finally:
        for s in opened.values():
            s.close()


def deltas(
    sessions: dict[str, WorkerSession], reqs: dict[str, TrainRequest]
) -> dict[str, torch.Tensor]:
    """Each device's update in clear (the same request as a plain train request), as a delta."""
    out = {}
    for n, req in reqs.items():
        update = sessions[n].train(req, timeout=300)
        d = {k: update.weights[k].double() - req.weights[k].double() for k in SPEC}
        out[n] = flatten(d, list(SPEC))
    return out


def test_secure_rounds_on_three_lab_devices(
    config: ExperimentConfig, sessions: dict[str, WorkerSession]
) -> None:
    plan = TrainPlan(steps=3, batch_size=16, lr=0.1)
    w0 = initial_weights(config.seed)
    assert all(s.hello_info and s.hello_info.python for s in sessions.values())
    for rnd in (1, 2):
        reqs = {n: TrainRequest(rnd, plan, derive_seed(config.seed, n, rnd), w0) for n in NAMES}
        plain = deltas(sessions, reqs)
        setup = secagg_setup(config, rnd, NAMES, SPEC)
        block = setup.blocks[0]
        assert all(float(x.norm()) < block.clip_norm for x in plain.values())  # not clipped

        def drop_charlie(direction: str, name: str, frame: bytes, rnd: int = rnd) -> None:
            kind = wire.decode_frame(frame, 1 << 30)[0]["type"]
            if rnd == 2 and direction == "down" and name == "charlie" and kind == "secagg_train":
                sessions["charlie"].kill()  # its SSH channel closes; the next call starts anew

        done = exchange(sessions, setup, reqs, config.timeouts.train, observe=drop_charlie)
        survivors = NAMES if rnd == 1 else ["alice", "bob"]
        assert list(done.result.survivors) == survivors and done.result.count == len(survivors)
        expected = sum(plain[n] for n in survivors)
        err = float((done.result.sums["delta"] - expected).abs().max())
        assert err <= error_bound(block, 3, len(survivors)) + 1e-12, (rnd, err)
        if rnd == 2:
            assert [f.worker for f in done.failures] == ["charlie"]
            assert "without a secure-aggregation round in progress" in done.failures[0].message
