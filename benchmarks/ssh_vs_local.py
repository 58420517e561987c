"""What the ssh transport costs against the local one, on the loopback Jetson lab.

Measures, for the seed's workers (alice 0-3, bob 4-6, charlie 7-9; 10 batches of 32 each, one
torch thread, the three trained in parallel by threads, then the unweighted mean):

- one round over SSH and over local subprocesses: median of `--rounds` rounds, taken in turn
  (ssh, local, local-labpy, ssh, ...) after `--warmup` rounds each, so that a change in the
  machine's load hits all alike; and their ratio (target: SSH within 10% of local). Two things
  besides the transport differ between a lab device and a local worker: the devices run Debian's
  Python (the local workers this interpreter), and sshd starts every session in a session of its
  own, which Linux's autogroup scheduler (kernel.sched_autogroup_enabled) treats as its own
  scheduling group, so on a loaded machine three SSH workers get three shares of the CPU where
  three local workers share the coordinator's one. `local-same` runs local workers on the lab's
  Python, each in its own session (setsid), so ssh / local-same is the transport's cost alone;
- the cost of starting one worker (connect + bootstrap + hello) over SSH and locally: median of
  `--starts` starts; and one bootstrap that uploads the code against one that finds it there.

Usage: python benchmarks/ssh_vs_local.py [--rounds 9] [--warmup 2] [--starts 3]
Needs root for per-device users (else the lab runs as the current user) and sshd
(scripts/install-sshd.sh).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcore.model import initial_weights  # noqa: E402
from fedcore.protocol import TrainRequest  # noqa: E402
from fedcore.seeding import derive_seed  # noqa: E402
from fedcore.session import WorkerSession  # noqa: E402
from fedcore.shards import ShardSpec  # noqa: E402
from fedcore.strategies import build_strategy  # noqa: E402
from fedcore.training import TrainPlan  # noqa: E402
from fedcore.transport.base import Transport, WorkerLaunch  # noqa: E402
from fedcore.transport.local import LocalTransport  # noqa: E402
from fedcore.transport.ssh import SSHConfig, SSHTransport  # noqa: E402
from fedlab import LabInfo, lab_down, lab_up  # noqa: E402

MNIST = ROOT / ".fedmnist" / "data" / "mnist"
SHARDS = {
    "alice": ShardSpec.by_labels(range(0, 4)),
    "bob": ShardSpec.by_labels(range(4, 7)),
    "charlie": ShardSpec.by_labels(range(7, 10)),
}


class Loop:
    """The seed's loop over one set of sessions, one round at a time."""

    def __init__(self, sessions: list[WorkerSession], pool: ThreadPoolExecutor) -> None:
        self.sessions = sessions
        self.pool = pool
        self.strategy = build_strategy("mean")
        self.weights = initial_weights(1)
        self.round = 0

    def step(self) -> float:
        self.round += 1
        r, w = self.round, self.weights
        plan = TrainPlan(steps=10, batch_size=32, lr=max(0.1 * 0.98 ** (r - 1), 0.001))
        start = time.perf_counter()
        updates = list(
            self.pool.map(
                lambda s: s.train(TrainRequest(r, plan, derive_seed(1, s.name, r), w), timeout=300),
                self.sessions,
            )
        )
        self.weights = self.strategy.aggregate(r, w, updates, [])
        return time.perf_counter() - start


def ssh_sessions(lab: LabInfo) -> list[WorkerSession]:
    return [
        WorkerSession(
            WorkerLaunch(n, lab.hosts[n].data_dir, lab.hosts[n].shard, threads=1),
            SSHTransport(SSHConfig(**lab.hosts[n].ssh)),
        )
        for n in SHARDS
    ]


def setsid_python(python: str, folder: Path) -> str:
    """An interpreter wrapper that starts python in a session of its own (same pid: exec)."""
    wrapper = folder / "python-setsid"
    wrapper.write_text(f'#!/bin/sh\nexec setsid {python} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def local_sessions(python: str | None = None) -> list[WorkerSession]:
    local = LocalTransport(python)
    return [
        WorkerSession(WorkerLaunch(n, str(MNIST), s, threads=1), local) for n, s in SHARDS.items()
    ]


def start_cost(launch: WorkerLaunch, transport: Transport) -> float:
    session = WorkerSession(launch, transport)
    start = time.perf_counter()
    session.hello(timeout=300)
    seconds = time.perf_counter() - start
    session.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per transport (9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (2)")
    parser.add_argument("--starts", type=int, default=3, help="timed worker starts each (3)")
    args = parser.parse_args()

    lab_dir = Path(tempfile.mkdtemp(prefix="fedmnist-bench-lab-"))
    lab_dir.chmod(0o755)
    t0 = time.perf_counter()
    lab = lab_up(lab_dir, SHARDS, MNIST)
    print(
        f"lab up: {len(lab.hosts)} sshd on loopback in {time.perf_counter() - t0:.1f}s "
        f"({'one user per device' if lab.per_user else 'current user'})"
    )
    try:
        groups = {
            "ssh": ssh_sessions(lab),
            "local": local_sessions(),
            "local-same": local_sessions(setsid_python(lab.python, lab_dir)),
        }
        everyone = [s for group in groups.values() for s in group]
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda s: s.hello(timeout=300), everyone))
            loops = {kind: Loop(group, pool) for kind, group in groups.items()}
            for _ in range(args.warmup):
                for loop in loops.values():
                    loop.step()
            times: dict[str, list[float]] = {kind: [] for kind in loops}
            for _ in range(args.rounds):
                for kind, loop in loops.items():
                    times[kind].append(loop.step())
        for s in everyone:
            s.close()
        same = all(
            bool((loops["ssh"].weights[k] == loop.weights[k]).all())
            for loop in loops.values()
            for k in loop.weights
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\none round (3 workers x 10 batches of 32, parallel), median of {args.rounds}:")
        for kind in loops:
            spread = ", ".join(f"{t * 1000:.0f}" for t in times[kind])
            print(f"  {kind:11s} {med[kind] * 1000:7.0f} ms   (all: {spread})")
        for base in ("local", "local-same"):
            ratio = med["ssh"] / med[base]
            verdict = "within" if ratio <= 1.10 else "NOT within"
            print(f"  ratio ssh/{base} {ratio:.3f}: {verdict} 10%")
        print(f"  global weights identical across the three: {same}")

        alice = lab.hosts["alice"]
        ssh_launch = WorkerLaunch("alice", alice.data_dir, alice.shard, threads=1)
        local_launch = WorkerLaunch("alice", str(MNIST), alice.shard, threads=1)
        ssh_t = [
            start_cost(ssh_launch, SSHTransport(SSHConfig(**alice.ssh))) for _ in range(args.starts)
        ]
        local_t = [start_cost(local_launch, LocalTransport()) for _ in range(args.starts)]
        print(f"\nstarting one worker (until its hello), median of {args.starts}:")
        print(f"  ssh   {statistics.median(ssh_t):6.2f} s  (connect + bootstrap + start + hello)")
        print(f"  local {statistics.median(local_t):6.2f} s  (spawn + hello)")
        fresh = SSHConfig(**{**alice.ssh, "remote_dir": "~/.fedmnist-bench-fresh"})
        first = SSHTransport(fresh, "alice").bootstrap()
        second = SSHTransport(fresh, "alice").bootstrap()
        print(
            f"  ssh bootstrap alone: {first.seconds * 1000:.0f} ms with upload "
            f"({first.uploaded}), {second.seconds * 1000:.0f} ms when already there "
            f"({not second.uploaded})"
        )
    finally:
        lab_down(lab_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
