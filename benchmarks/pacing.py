"""How well a paced worker keeps its pace: measured seconds per training step against the target.

The tests check what pacing does that cannot depend on the clock (the mode a hello reports, every
step paced, the window each is paced to, weights bit-identical to an unpaced worker's); the time it
takes is this benchmark's figure. For real worker processes (bob's shard, batches of 16, one torch
thread, a local subprocess each), it trains `--rounds` rounds of `--steps` steps per pace and
prints the median seconds per step (the worker's own `seconds` over its steps; a fresh worker's
first `--warmup` rounds not counted) against the target:

- `steady` N x S (`--step-seconds` S): the target is N x S a step, whatever the step computes;
  a step that computes longer than that is not made up for, so the figure is max(N x S, compute);
- `slowdown` N alone: N x an unpaced worker's step, measured here first. The mode is the one the
  worker chooses (its hello's `pacing`): a CPU limit where this user may create a cgroup, which
  is a ceiling and falls short of N on a busy host (fedcore.cpu_limit), else sleeping.

Measure on a quiet machine (no `nice`): the figures are times. Needs the MNIST files
(`fedmnist data`).

Usage: python benchmarks/pacing.py [--rounds 3] [--warmup 1] [--steps 20] [--step-seconds 0.05]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcore.model import initial_weights  # noqa: E402
from fedcore.protocol import TrainRequest  # noqa: E402
from fedcore.session import WorkerSession  # noqa: E402
from fedcore.shards import ShardSpec  # noqa: E402
from fedcore.training import TrainPlan  # noqa: E402
from fedcore.transport.base import WorkerLaunch  # noqa: E402
from fedcore.transport.local import LocalTransport  # noqa: E402

MNIST = ROOT / ".fedmnist" / "data" / "mnist"
BOB = ShardSpec.by_labels([4, 5, 6])


def seconds_per_step(
    slowdown: float, step_seconds: float | None, rounds: int, steps: int, warmup: int
) -> tuple[str, list[float]]:
    """(the worker's pacing mode, seconds per step of each round after `warmup` rounds) for one
    pace. The first round of a fresh worker pays torch's one-time costs: not a step's time."""
    launch = WorkerLaunch("bob", str(MNIST), BOB, 1, "cpu", slowdown, step_seconds)
    session = WorkerSession(launch, LocalTransport())
    session.start()
    try:
        mode = session.hello(timeout=120).pacing
        plan = TrainPlan(steps=steps, batch_size=16, lr=0.1)
        weights = initial_weights(1)
        per_step = []
        for r in range(1, warmup + rounds + 1):
            update = session.train(TrainRequest(r, plan, 1000 + r, weights), timeout=600)
            if r > warmup:
                per_step.append(update.metrics.seconds / update.metrics.steps)
        return mode, per_step
    finally:
        session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per pace (median taken)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds per pace not counted")
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument("--step-seconds", type=float, default=0.05, help="S of the steady paces")
    args = parser.parse_args()
    if not MNIST.is_dir():
        print(f"no MNIST files at {MNIST}: run `fedmnist data` first", file=sys.stderr)
        return 2
    s = args.step_seconds
    print(f"seconds per step, median of {args.rounds} rounds of {args.steps} steps (batch 16):")
    print(f"  {'pace':22s} {'mode':10s} {'target':>9s} {'measured':>9s} {'ratio':>6s}  all")
    _, plain = seconds_per_step(1.0, None, args.rounds, args.steps, args.warmup)
    compute = statistics.median(plain)
    rows: list[tuple[str, float, float | None, float]] = [
        ("unpaced", 1.0, None, compute),
        (f"steady 2 x {s:g}s", 2.0, s, 2.0 * s),
        (f"steady 4 x {s:g}s", 4.0, s, 4.0 * s),
        ("slowdown 2", 2.0, None, 2.0 * compute),
        ("slowdown 4", 4.0, None, 4.0 * compute),
    ]
    for name, slowdown, step_seconds, target in rows:
        if name == "unpaced":
            mode, measured = "none", plain
        else:
            mode, measured = seconds_per_step(
                slowdown, step_seconds, args.rounds, args.steps, args.warmup
            )
        med = statistics.median(measured)
        spread = ", ".join(f"{m * 1000:.1f}" for m in measured)
        print(
            f"  {name:22s} {mode:10s} {target * 1000:7.1f}ms {med * 1000:7.1f}ms "
            f"{med / target:6.2f}  ({spread} ms)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
