"""Pacing a worker: N times slower than it is, or a steady pace per training step.

A heterogeneous fleet to test schedules on (a slow Jetson among fast ones, a device whose rounds
take a known time) from one machine. Two knobs of a worker (fedcore.config.WorkerConfig):
`slowdown` N (each training step takes N times as long) and `step_seconds` S (each step takes
N x S seconds, whatever its computation took). Which mechanism is in force is one of `MODES`,
reported in the worker's hello:

- `none`: no pacing (N = 1, no S).
- `steady`: S given; after each step the worker sleeps until N x S seconds have passed since the
  step's window opened. The next window opens at that deadline, so a late wake-up is absorbed by
  the next step instead of drifting; a step whose computation alone overruns is not made up for.
- `cpu.max` (cgroup v2) or `cfs_quota` (cgroup v1): N > 1 and no S on a CPU worker that may put
  itself under a CPU limit: a child cgroup of its own (`fedmnist-<worker>-<pid>`) allowing
  threads / N CPUs, which the worker moves into and removes again at exit.
- `sleep`: the fallback of the two above (no cgroup it may use, a CUDA worker, any OSError):
  after each step the worker sleeps (N - 1) times the step's measured time.

Why a real CPU limit is preferred for `slowdown` (as the issue asks) and sleeping is only its
fallback: a CPU limit slows everything a slow device is slow at (loading its shard, decoding,
evaluating, not only the training steps) and throttles in the kernel, as a slower chip would;
sleeping slows only the steps. A quota is a ceiling, not a factor, though (fedcore.cpu_limit,
which holds the limit itself, says when it falls short): where the pace must be exact whatever
the host does, give `step_seconds` (steady).

Pacing only sleeps: it never touches a tensor, a generator or the order of operations, so a paced
worker's weights are bit-identical to an unpaced one's. Runs on the device (Python 3.8, standard
library only); nothing here may crash a worker: every OSError falls back to sleeping.
"""

# Device-side: annotations stay 3.8-compatible (pyproject's per-file ignores do this for the rest).
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

# The CPU limit is its own module (the cgroup's life); its names stay importable from here.
from .cpu_limit import CpuLimit as CpuLimit
from .cpu_limit import cgroup_dir as cgroup_dir
from .cpu_limit import limit_cpu as limit_cpu
from .cpu_limit import quota_period as quota_period
from .cpu_limit import sweep as sweep

log = logging.getLogger("fedcore.pacing")

MODES = ("none", "cpu.max", "cfs_quota", "sleep", "steady")
MAX_SLOWDOWN = 1000.0  # as fedcore.config.WorkerConfig.slowdown
MAX_STEP_SECONDS = 60.0  # as fedcore.config.WorkerConfig.step_seconds


class Pacer:
    """Paces a round's training steps: call `begin()` before the first, `step()` after each.

    Args:
        slowdown: N >= 1, how many times as long each step takes.
        step_seconds: S, a steady step of N x S seconds; None paces N x the step's own time.
        clock, sleep: time.perf_counter and time.sleep (replaceable for a unit test).
    """

    def __init__(
        self,
        slowdown: float = 1.0,
        step_seconds: Optional[float] = None,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        check_pace(slowdown, step_seconds)
        self.slowdown = float(slowdown)
        self.step_seconds = step_seconds
        self._clock = clock
        self._sleep = sleep
        self._opened = clock()
        self.slept = 0.0  # seconds slept since `begin`
        self.steps = 0

    def begin(self) -> None:
        """A round starts: the first step's window opens now."""
        self._opened = self._clock()
        self.slept = 0.0
        self.steps = 0

    def plan(self) -> str:
        """What each step is paced to, as set (no clock in it): `to 0.200s each` (steady) or
        `at 4x` (its own time, N times)."""
        if self.step_seconds is not None:
            return f"to {self.slowdown * self.step_seconds:.3f}s each"
        return f"at {self.slowdown:g}x"

    def step(self) -> float:
        """A step's computation is done: sleep what its target leaves; returns the seconds slept."""
        now = self._clock()
        elapsed = now - self._opened
        step = self.step_seconds
        target = self.slowdown * (step if step is not None else elapsed)
        self.steps += 1
        wait = target - elapsed
        if wait <= 0:
            self._opened = now
            return 0.0
        self._sleep(wait)
        woke = self._clock()
        self.slept += woke - now
        # Steady: the next window opens at the deadline (a late wake-up is not carried forward as
        # drift). Relative: it opens when this one really ended (the next step is measured clean).
        self._opened = self._opened + target if step is not None else woke
        return woke - now


def check_pace(slowdown: float, step_seconds: Optional[float]) -> None:
    """Raise ValueError unless 1 <= slowdown <= 1000 and step_seconds is None or in (0, 60]."""
    if not 1.0 <= slowdown <= MAX_SLOWDOWN:  # also refuses NaN
        raise ValueError(f"slowdown must be in 1..{MAX_SLOWDOWN:g}, got {slowdown!r}")
    if step_seconds is not None and not 0.0 < step_seconds <= MAX_STEP_SECONDS:
        raise ValueError(
            f"step_seconds must be in (0, {MAX_STEP_SECONDS:g}] or absent, got {step_seconds!r}"
        )


# -- what a worker sets up -----------------------------------------------------------------------


@dataclass
class Pacing:
    """A worker's pacing: the mode its hello reports, the pacer of its steps (steady, sleep) or
    its CPU limit (cpu.max, cfs_quota)."""

    mode: str = "none"
    slowdown: float = 1.0
    pacer: Optional[Pacer] = None
    limit: Optional[CpuLimit] = None

    def mark(self) -> Optional[float]:
        """Before a round: the CPU limit's throttled seconds so far (for `note`)."""
        return self.limit.throttled_seconds() if self.limit is not None else None

    def note(self, mark: Optional[float]) -> str:
        """After a round: what pacing did in it, as a suffix for the worker's log line."""
        if self.pacer is not None:
            p = self.pacer
            return f" ({p.steps} steps paced {p.plan()}, {p.slept:.2f}s asleep, {self.mode})"
        if self.limit is not None:
            now = self.limit.throttled_seconds()
            held = "?" if now is None or mark is None else f"{now - mark:.2f}s"
            return f" ({held} of it throttled, {self.mode})"
        return ""

    def close(self) -> None:
        """Leave and remove the CPU limit's cgroup, if any (idempotent, never raises)."""
        if self.limit is not None:
            self.limit.release()


def setup(
    name: str,
    slowdown: float = 1.0,
    step_seconds: Optional[float] = None,
    threads: int = 1,
    cpu: bool = True,
) -> Pacing:
    """Choose and put in force a worker's pacing (see the module's docstring).

    Args:
        name: the worker's name.
        slowdown, step_seconds: the worker's knobs (ValueError outside their bounds).
        threads: the torch threads it computes with.
        cpu: whether it trains on the CPU (a CPU limit does not slow a GPU's kernels).
    """
    check_pace(slowdown, step_seconds)
    if step_seconds is not None:
        return Pacing("steady", slowdown, Pacer(slowdown, step_seconds))
    if slowdown == 1.0:
        return Pacing()
    limit = limit_cpu(name, slowdown, threads) if cpu else None
    if limit is not None:
        log.info(
            "%s runs under a CPU limit of %d/%d us (%s in %s)",
            name,
            limit.quota_us,
            limit.period_us,
            limit.mode,
            limit.group,
        )
        return Pacing(limit.mode, slowdown, None, limit)
    return Pacing("sleep", slowdown, Pacer(slowdown))
