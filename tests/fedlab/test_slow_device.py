"""Slower and steady devices in the loopback lab, against real sshd: the inventory carries each
device's speed, a training config built on it launches paced workers over SSH, and a device's own
Linux user (which may not create cgroups) falls back to sleeping, with weights bit-identical to an
unpaced local worker's. Run one lab module at a time: the lab creates system users."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from labkit import IS_ROOT, ROOT, fresh_lab_dir
from waiting import LogWatch

from fedcore import pacing
from fedcore.config import ExperimentConfig, load_config
from fedcore.model import initial_weights
from fedcore.protocol import TrainRequest, Update
from fedcore.session import WorkerSession
from fedcore.shards import ShardSpec
from fedcore.training import TrainPlan
from fedcore.transport.base import WorkerLaunch
from fedcore.transport.local import LocalTransport
from fedlab import DeviceSpeed, LabError, LabInfo, lab_down, lab_up

pytestmark = pytest.mark.slow

SHARDS = {"dora": ShardSpec.by_labels([0, 1]), "erin": ShardSpec.by_labels([2, 3])}
SPEEDS = {"dora": DeviceSpeed(slowdown=4.0), "erin": DeviceSpeed(2.0, 0.05)}
REQUEST = TrainRequest(1, TrainPlan(steps=4, batch_size=16, lr=0.1), 99, initial_weights(5))


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, mnist_dir: Path) -> LabInfo:
    done = subprocess.run(
        [str(ROOT / "scripts" / "install-sshd.sh")], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"sshd cannot be installed: {done.stderr.strip()[-300:]}")
    lab_dir = fresh_lab_dir("fedmnist-lab-slow-")
    request.addfinalizer(lambda: shutil.rmtree(lab_dir, ignore_errors=True))
    request.addfinalizer(lambda: lab_down(lab_dir))
    try:
        return lab_up(lab_dir, SHARDS, mnist_dir, speeds=SPEEDS)
    except LabError as exc:
        pytest.skip(f"the loopback lab cannot start: {exc}")


@pytest.fixture(scope="module")
def config(lab: LabInfo, tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    path = tmp_path_factory.mktemp("slow-lab") / "slow-lab.yaml"
    path.write_text(
        yaml.safe_dump({"name": "slow-lab", "rounds": 1, "inventory": str(lab.inventory)})
    )
    return load_config(path)


@pytest.fixture
def sessions() -> Iterator[list[WorkerSession]]:
    opened: list[WorkerSession] = []
    yield opened
    for s in opened:
        s.close()


def local_update(mnist_dir: Path, name: str) -> Update:
    s = WorkerSession(WorkerLaunch(name, str(mnist_dir), SHARDS[name], threads=1), LocalTransport())
    s.start()
    try:
        return s.train(REQUEST, timeout=120)
    finally:
        s.close()


def test_the_inventory_carries_each_devices_speed(lab: LabInfo, config: ExperimentConfig) -> None:
    entries = {e["name"]: e for e in yaml.safe_load(lab.inventory.read_text())["workers"]}
    assert entries["dora"]["slowdown"] == 4.0 and "step_seconds" not in entries["dora"]
    assert (entries["erin"]["slowdown"], entries["erin"]["step_seconds"]) == (2.0, 0.05)
    workers = {w.name: w for w in config.workers}
    assert (workers["dora"].slowdown, workers["dora"].step_seconds) == (4.0, None)
    assert (workers["erin"].slowdown, workers["erin"].step_seconds) == (2.0, 0.05)
    assert (lab.hosts["dora"].slowdown, lab.hosts["erin"].step_seconds) == (4.0, 0.05)


def test_a_speed_the_loader_would_refuse_stops_the_lab(lab: LabInfo, mnist_dir: Path) -> None:
    with pytest.raises(LabError, match="speeds for \\['frank'\\], which are not among"):
        lab_up(lab.lab_dir / "never", SHARDS, mnist_dir, speeds={"frank": DeviceSpeed(2.0)})
    from fedlab.inventory import worker_config

    with pytest.raises(LabError, match="invalid inventory entry for 'dora'"):
        worker_config("dora", "trainer", SHARDS["dora"], lab.hosts["dora"].ssh, DeviceSpeed(0.5))


def test_lab_devices_pace_themselves_over_ssh(
    config: ExperimentConfig,
    lab: LabInfo,
    mnist_dir: Path,
    sessions: list[WorkerSession],
) -> None:
    from flows.federated import make_session

    for worker in config.workers:
        sessions.append(make_session(config, worker))
    watch = LogWatch("fedcore.worker.dora", "fedcore.worker.erin")
    with watch as log, ThreadPoolExecutor(len(SHARDS) + len(sessions)) as pool:
        # The unpaced local workers every device's weights must equal (their log lines are unpaced:
        # none matches the paced lines looked for below).
        references = {name: pool.submit(local_update, mnist_dir, name) for name in SHARDS}
        hellos = {
            s.name: h for s, h in zip(sessions, pool.map(lambda s: s.hello(timeout=600), sessions))
        }
        # A device's own user may not create a cgroup: the slowed device sleeps its pace instead.
        if lab.per_user:
            assert hellos["dora"].pacing == "sleep"
        else:
            assert hellos["dora"].pacing in ("sleep", "cpu.max", "cfs_quota")
        assert hellos["dora"].slowdown == 4.0
        assert (hellos["erin"].pacing, hellos["erin"].slowdown) == ("steady", 2.0)
        # deadlines far past the work: dora sleeps 4x her steps, and a loaded 2-core machine
        # (CI at load 20-30) once took more than 180 s for this round
        trained = pool.map(lambda s: s.train(REQUEST, timeout=600), sessions)
        updates = {s.name: u for s, u in zip(sessions, trained)}
        # Each device's round line (its stderr over SSH): its pacer saw all 4 steps, erin's each
        # paced to 2 x 0.05 s and dora's, sleeping, to 4 x its own time. The seconds that takes are
        # a figure of benchmarks/pacing.py, not a test's.
        assert {u.metrics.steps for u in updates.values()} == {4}
        paced = r"round 1: 4 steps, .*\(4 steps paced {}, [0-9.]+s asleep, {}\)$"
        log.wait_for("fedcore.worker.erin", paced.format(r"to 0\.100s each", "steady"))
        if hellos["dora"].pacing == "sleep":
            log.wait_for("fedcore.worker.dora", paced.format("at 4x", "sleep"))
    for name, update in updates.items():
        here = references[name].result()
        assert all(torch.equal(update.weights[k], here.weights[k]) for k in here.weights), name
        assert update.metrics.loss == here.metrics.loss
    # No cgroup of a device's worker, in either hierarchy.
    for v2 in (True, False):
        parent = pacing.cgroup_dir(v2)
        if parent is not None and IS_ROOT:
            left = [p.name for p in Path(parent).glob("fedmnist-*")]
            assert not [n for n in left if n.endswith(f"-{hellos['dora'].pid}")], left
