"""Slower and steady workers (fedcore.pacing), run for real: the pace a worker keeps, the mode its
hello reports, weights bit-identical to an unpaced worker's, and no cgroup left behind however a
worker ends. Where this machine lets a worker put itself under a CPU limit (root, a writable
`cpu` hierarchy) the tests check the limit itself; elsewhere they check the sleeping fallback.
The Pacer's own arithmetic is checked with a fake clock, never with wall-clock upper bounds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from waiting import LogWatch, wait_until

from fedcore import pacing, protocol, wire, worker
from fedcore.errors import WireError
from fedcore.model import initial_weights
from fedcore.protocol import Hello, TrainRequest, Update
from fedcore.session import WorkerSession
from fedcore.shards import ShardSpec
from fedcore.training import TrainPlan
from fedcore.transport.base import WorkerLaunch
from fedcore.transport.local import LocalTransport

BOB = ShardSpec.by_labels([4, 5, 6])
REQUEST = TrainRequest(1, TrainPlan(steps=4, batch_size=16, lr=0.1), 4242, initial_weights(3))
LIMITS = ("cpu.max", "cfs_quota")
# A worker's log line after a round of REQUEST (fedcore.pacing.Pacing.note): its pacer's plan.
STEADY_LINE = r"round 1: 4 steps, .*\(4 steps paced to 0\.200s each, [0-9.]+s asleep, steady\)$"
SLEEP_LINE = r"round 1: 4 steps, .*\(4 steps paced at 4x, [0-9.]+s asleep, sleep\)$"


def expected_limit() -> str | None:
    """The CPU limit a worker of this machine can put itself under (as pacing tries them)."""
    v2 = pacing.cgroup_dir(v2=True)
    if v2 and os.access(v2, os.W_OK):
        try:
            if "cpu" in Path(v2, "cgroup.subtree_control").read_text().split():
                return "cpu.max"
        except OSError:
            pass
    v1 = pacing.cgroup_dir(v2=False)
    if v1 and os.access(v1, os.W_OK) and Path(v1, "cpu.cfs_quota_us").exists():
        return "cfs_quota"
    return None


LIMIT = expected_limit()
needs_limit = pytest.mark.skipif(LIMIT is None, reason="no cgroup this user may limit CPU with")


def group_of(name: str, pid: int) -> Path:
    parent = pacing.cgroup_dir(v2=LIMIT == "cpu.max")
    assert parent is not None
    return Path(parent, f"fedmnist-{name}-{pid}")


def wait_gone(path: Path) -> None:
    """Wait for a process (the worker, its reaper) to remove `path`; fail if it never does."""
    wait_until(lambda: not path.exists(), 30, f"{path} removed")


@pytest.fixture
def session(mnist_dir: Path) -> Iterator[Callable[..., WorkerSession]]:
    opened: list[WorkerSession] = []

    def start(slowdown: float = 1.0, step_seconds: float | None = None) -> WorkerSession:
        launch = WorkerLaunch("bob", str(mnist_dir), BOB, 1, "cpu", slowdown, step_seconds)
        s = WorkerSession(launch, LocalTransport())
        opened.append(s)
        s.start()
        return s

    yield start
    for s in opened:
        s.close()


@pytest.fixture(scope="module")
def unpaced(mnist_dir: Path) -> Update:
    """What an unpaced worker returns for REQUEST: the numbers every paced one must equal."""
    s = WorkerSession(WorkerLaunch("bob", str(mnist_dir), BOB, threads=1), LocalTransport())
    s.start()
    try:
        hello = s.hello(timeout=120)
        assert (hello.pacing, hello.slowdown) == ("none", 1.0)
        return s.train(REQUEST, timeout=120)
    finally:
        s.close()


def assert_same_weights(a: Update, b: Update) -> None:
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert a.metrics.loss == b.metrics.loss and a.metrics.samples == b.metrics.samples


# -- the worker program ---------------------------------------------------------------------


def test_a_steady_worker_paces_every_step_to_slowdown_times_step_seconds(session, unpaced) -> None:
    s = session(slowdown=4, step_seconds=0.05)
    hello = s.hello(timeout=120)
    assert (hello.pacing, hello.slowdown) == ("steady", 4.0)
    with LogWatch("fedcore.worker.bob") as log:
        update = s.train(REQUEST, timeout=120)
        # The worker's round line: its pacer saw each of the 4 steps, each paced to a window of
        # 4 x 0.05 s. What that costs in seconds is a figure of benchmarks/pacing.py, not a test's.
        log.wait_for("fedcore.worker.bob", STEADY_LINE)
    assert update.metrics.steps == 4
    assert_same_weights(update, unpaced)


def test_a_slowed_worker_runs_under_a_cpu_limit_or_sleeps(session, unpaced) -> None:
    s = session(slowdown=4)
    hello = s.hello(timeout=120)
    assert hello.slowdown == 4.0
    assert hello.pacing == (LIMIT or "sleep")
    with LogWatch("fedcore.worker.bob") as log:
        update = s.train(REQUEST, timeout=120)
        if LIMIT is None:  # every step paced at 4 x its own time, by sleeping
            log.wait_for("fedcore.worker.bob", SLEEP_LINE)
    assert_same_weights(update, unpaced)
    if LIMIT is None:
        return
    group = group_of("bob", hello.pid)
    assert (group / "cgroup.procs").read_text().split() == [str(hello.pid)]
    if LIMIT == "cfs_quota":
        limit = (
            (group / "cpu.cfs_quota_us").read_text(),
            (group / "cpu.cfs_period_us").read_text(),
        )
        assert tuple(map(int, limit)) == (2500, 10_000)  # a quarter of one core
    else:
        assert (group / "cpu.max").read_text().split() == ["2500", "10000"]
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    assert int(stat["nr_throttled"]) > 0  # the kernel held it back
    s.close()
    assert not group.exists()  # it left its group and removed it


@needs_limit
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_no_cgroup_is_left_behind_however_the_worker_ends(mnist_dir: Path, sig: int) -> None:
    launch = WorkerLaunch("eve", str(mnist_dir), ShardSpec.by_labels([9]), 1, "cpu", 4.0)
    proc = subprocess.Popen(
        [sys.executable, *launch.argv()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(protocol.encode_hello_request())
        proc.stdin.flush()
        meta, _ = wire.read_frame(proc.stdout.read, 0)
        assert meta["pacing"] == LIMIT
        group = group_of("eve", proc.pid)
        assert group.is_dir()
        os.kill(proc.pid, sig)
        # SIGTERM and SIGHUP unwind through the worker's own cleanup; SIGKILL leaves it to the
        # reaper process the worker started outside its group.
        assert proc.wait(60) == (-sig if sig == signal.SIGKILL else 128 + sig)
        wait_gone(group)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_limit
def test_a_worker_removes_the_group_a_dead_worker_left(session) -> None:
    parent = group_of("x", 1).parent
    probe = subprocess.Popen(["true"])  # a pid that no longer runs
    probe.wait()
    ghost = parent / f"fedmnist-ghost-{probe.pid}"
    ghost.mkdir()
    try:
        s = session(slowdown=2)
        assert s.hello(timeout=120).pacing == LIMIT
        assert not ghost.exists()
    finally:
        if ghost.exists():
            ghost.rmdir()


def test_the_worker_refuses_a_pace_outside_its_bounds(
    mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The worker program's own entry point, in this process: it parses its arguments before it
    # loads data or starts anything, so refusing them needs no process (and no torch start-up).
    base = WorkerLaunch("bob", str(mnist_dir), BOB).argv()
    assert base[:2] == ["-m", "fedcore.worker"]
    for flags, message in [
        (["--slowdown", "0.5"], "--slowdown: must be a number in 1..1000, got '0.5'"),
        (["--slowdown", "nan"], "--slowdown: must be a number in 1..1000, got 'nan'"),
        (["--step-seconds", "0"], "--step-seconds: must be a number in (0, 60], got '0'"),
    ]:
        with pytest.raises(SystemExit) as done:
            worker.main([*base[2:], *flags])
        err = capsys.readouterr().err
        assert done.value.code == 2 and message in err, err


# -- the launch ------------------------------------------------------------------------------


def test_argv_is_unchanged_for_an_unpaced_worker() -> None:
    shard = ShardSpec.by_labels([0, 1])
    assert WorkerLaunch("alice", "/d", shard, 1, "cpu").argv() == [
        "-m",
        "fedcore.worker",
        "--name",
        "alice",
        "--data-dir",
        "/d",
        "--shard",
        shard.to_json(),
        "--threads",
        "1",
        "--device",
        "cpu",
    ]
    assert WorkerLaunch("alice", "/d", shard, 1, "cpu", 1.0, None).argv() == (
        WorkerLaunch("alice", "/d", shard, 1, "cpu").argv()
    )
    assert WorkerLaunch("alice", "/d", shard, 1, "cpu", 4, 0.05).argv()[-4:] == [
        "--slowdown",
        "4.0",
        "--step-seconds",
        "0.05",
    ]
    assert WorkerLaunch("alice", "/d", shard, step_seconds=2).argv()[-2:] == [
        "--step-seconds",
        "2.0",
    ]


# -- the hello -------------------------------------------------------------------------------

HELLO = Hello("bob", "labels 4-6", {4: 5}, "3.8", "2.1", "cpu", 1, 7)


def hello_meta(**fields: object) -> dict:
    meta, _ = wire.decode_frame(protocol.encode_hello(HELLO))
    meta.update(fields)
    return meta


def test_the_hello_carries_slowdown_and_pacing() -> None:
    paced = Hello(
        "bob", "labels 4-6", {4: 5}, "3.8", "2.1", "cpu", 1, 7, slowdown=4.0, pacing="sleep"
    )
    meta, _ = wire.decode_frame(protocol.encode_hello(paced))
    assert (meta["slowdown"], meta["pacing"]) == (4, "sleep")
    assert protocol.decode_hello(meta) == paced
    # An older worker's hello has neither field: it reads as unpaced.
    old = {k: v for k, v in hello_meta().items() if k not in ("slowdown", "pacing")}
    assert (protocol.decode_hello(old).slowdown, protocol.decode_hello(old).pacing) == (1.0, "none")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pacing": "turbo"}, "hello pacing must be one of"),
        ({"pacing": 3}, "hello pacing must be a string"),
        ({"pacing": "x" * 10_000}, "hello pacing must be a string of at most 16 characters"),
        (
            {"slowdown": 0.5, "pacing": "sleep"},
            "hello slowdown must be a finite number in 1.0..1000",
        ),
        ({"slowdown": 10**9, "pacing": "sleep"}, "hello slowdown must be a finite number"),
        ({"slowdown": True, "pacing": "sleep"}, "hello slowdown must be a finite number"),
        ({"slowdown": "4", "pacing": "sleep"}, "hello slowdown must be a finite number"),
        ({"slowdown": 4, "pacing": "none"}, "hello pacing 'none' disagrees with its slowdown 4"),
        (
            {"slowdown": 1, "pacing": "cfs_quota"},
            "pacing 'cfs_quota' disagrees with its slowdown 1",
        ),
    ],
)
def test_a_hostile_hello_pace_is_a_wire_error(fields: dict, message: str) -> None:
    with pytest.raises(WireError, match=re.escape(message)):
        protocol.decode_hello(hello_meta(**fields))


def test_a_steady_hello_may_have_any_slowdown() -> None:
    assert protocol.decode_hello(hello_meta(slowdown=1, pacing="steady")).pacing == "steady"
    assert protocol.decode_hello(hello_meta(slowdown=3.5, pacing="steady")).slowdown == 3.5


# -- the pacer -------------------------------------------------------------------------------


class FakeTime:
    """A clock that moves only when the code sleeps or a step 'computes'."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + 0.001  # every wake-up is a millisecond late


def test_a_steady_pacer_keeps_its_cadence_without_drift() -> None:
    t = FakeTime()
    pacer = pacing.Pacer(2.0, 0.1, clock=t.clock, sleep=t.sleep)
    pacer.begin()
    start = t.now
    for compute in (0.05, 0.12, 0.25, 0.01):
        t.now += compute
        pacer.step()
    # Windows of 0.2 s: a late wake-up is absorbed by the next step (0.079 s, not 0.08); the
    # 0.25 s step overruns its window and is not made up for; only the last wake-up is late.
    assert pacer.steps == 4
    assert t.sleeps == pytest.approx([0.15, 0.079, 0.19])
    assert t.now - start == pytest.approx(0.2 + 0.2 + (0.25 + 0.001) + 0.2 + 0.001)
    # What the worker's round line says of it: every step seen, the window it was paced to.
    note = pacing.Pacing("steady", 2.0, pacer).note(None)
    assert note == " (4 steps paced to 0.200s each, 0.42s asleep, steady)"


def test_a_relative_pacer_sleeps_slowdown_minus_one_times_each_step() -> None:
    t = FakeTime()
    pacer = pacing.Pacer(4.0, clock=t.clock, sleep=t.sleep)
    pacer.begin()
    for compute in (0.01, 0.02, 0.03):
        t.now += compute
        pacer.step()
    assert t.sleeps == pytest.approx([0.03, 0.06, 0.09])
    assert pacer.slept == pytest.approx(0.183)
    assert (
        pacing.Pacing("sleep", 4.0, pacer).note(None)
        == " (3 steps paced at 4x, 0.18s asleep, sleep)"
    )
    pacer.begin()
    assert pacer.slept == 0.0 and pacer.steps == 0


def test_an_unpaced_pacer_never_sleeps() -> None:
    t = FakeTime()
    pacer = pacing.Pacer(1.0, clock=t.clock, sleep=t.sleep)
    pacer.begin()
    t.now += 0.5
    assert pacer.step() == 0.0 and t.sleeps == []


def test_pace_bounds_and_quota_sizes() -> None:
    for slowdown, step in [(0.5, None), (1001, None), (float("nan"), None), (2, 0.0), (2, 61)]:
        with pytest.raises(ValueError, match="must be in"):
            pacing.Pacer(slowdown, step)
    assert pacing.quota_period(4, 1) == (2500, 10_000)
    assert pacing.quota_period(2, 4) == (20_000, 10_000)  # 2 of 4 threads' cores
    assert pacing.quota_period(1000, 1) == (1000, 1_000_000)  # the kernel's 1 ms minimum quota
    assert pacing.quota_period(50, 1) == (1000, 50_000)


def test_setup_picks_the_mode() -> None:
    assert pacing.setup("t", 1.0).mode == "none" and pacing.setup("t", 1.0).pacer is None
    steady = pacing.setup("t", 3.0, 0.5)
    assert steady.mode == "steady" and steady.limit is None and steady.pacer is not None
    on_gpu = pacing.setup("t", 3.0, cpu=False)  # a CPU limit would not slow a GPU's kernels
    assert on_gpu.mode == "sleep" and on_gpu.limit is None
