"""A CPU limit a worker puts itself under: a cgroup of its own, removed however the worker ends.

The mechanism behind a slowed worker's `cpu.max` (cgroup v2) and `cfs_quota` (cgroup v1) modes
(fedcore.pacing chooses the mode): a child cgroup `fedmnist-<worker>-<pid>` of the worker's own
cgroup, allowing threads / N CPUs, which the worker moves into and removes again at exit.

Its limit: a quota is a ceiling, not a factor. It slows a CPU-bound step N times only where the
worker would otherwise get a full core per thread: alone on an idle host a quarter-core quota
made 50 steps 4.0-4.5 times slower, but next to three busy processes on two cores (each getting
half a core) only 1.9 times (measured). In a fleet that is mostly fine, since the peers of a slow
worker wait for it and leave it the CPU; where the pace must be exact whatever the host does,
fedcore.pacing's steady mode is the answer. Under a limit nothing sleeps on top: topping each
step up to N times its unthrottled time (wall time less the group's `cpu.stat` throttled time)
was tried and over-slowed, 8.8 instead of 4 times: the throttled time covers only part of the
hold-back (wall less throttled time came to twice a step's CPU time). The CFS period is short
(10 ms, longer only where the quota would fall under the kernel's 1 ms minimum), so that a round
of a few steps is throttled evenly: with the default 100 ms, 4 steps of ~12 ms were slowed 1.9
times, not 4.

A worker killed with SIGKILL cannot remove its group, so a reaper process started outside the
group removes it when the worker's end of a pipe closes, and the next worker to start sweeps the
empty groups of workers that no longer run. Runs on the device (Python 3.8, standard library
only); every failure is an OSError the caller turns into the sleeping fallback.
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

log = logging.getLogger("fedcore.pacing")

GROUP_PREFIX = "fedmnist-"
PERIOD_US = 10_000  # CFS period: short, so that a round of a few steps is throttled evenly
MIN_QUOTA_US = 1_000  # the kernel refuses a smaller quota
MAX_PERIOD_US = 1_000_000  # ... and a longer period
_PROC_CGROUP = "/proc/self/cgroup"
_PROC_MOUNTINFO = "/proc/self/mountinfo"


@dataclass
class CpuLimit:
    """A cgroup this process created and moved itself into; `release` moves it out and removes it.

    Attributes:
        mode: `cpu.max` (cgroup v2) or `cfs_quota` (cgroup v1).
        group: the group's folder.
        parent: the folder of the cgroup the process came from (where it returns).
        quota_us, period_us: the limit, threads / slowdown CPUs.
    """

    mode: str
    group: str
    parent: str
    quota_us: int
    period_us: int
    released: bool = False
    reaper: Optional[int] = None  # our end of the reaper's pipe (see `_start_reaper`)

    def throttled_seconds(self) -> Optional[float]:
        """How long the kernel has held the group back so far, or None when unreadable."""
        key, scale = (
            ("throttled_usec", 1e-6) if self.mode == "cpu.max" else ("throttled_time", 1e-9)
        )
        try:
            with open(os.path.join(self.group, "cpu.stat")) as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return int(value) * scale
        except (OSError, ValueError):
            pass
        return None

    def release(self) -> bool:
        """Move this process back to its parent cgroup and remove the group; never raises.

        Returns:
            Whether the group is gone (True also when it was released before).
        """
        if self.released:
            return True
        try:
            _write(os.path.join(self.parent, "cgroup.procs"), str(os.getpid()))
        except OSError as exc:
            log.warning("cannot leave cgroup %s: %s", self.group, exc)
        self.released = _rmdir(self.group)
        if not self.released:
            log.warning("cannot remove cgroup %s yet: its reaper will at exit", self.group)
        elif self.reaper is not None:
            fd, self.reaper = self.reaper, None
            try:
                os.close(fd)  # the reaper finds the group gone and ends
            except OSError:
                pass
        return self.released


def limit_cpu(name: str, slowdown: float, threads: int) -> Optional[CpuLimit]:
    """Put this process under a CPU limit of `threads / slowdown` CPUs, if the kernel lets it.

    Tries cgroup v2 (a child of the process's own cgroup, where that cgroup already hands the
    `cpu` controller to its children: the worker never changes its parent's settings), then
    cgroup v1's `cpu` hierarchy. Before creating its group it removes the empty groups of workers
    that died without removing theirs (killed with SIGKILL).

    Args:
        name: the worker's name (part of the group's name).
        slowdown: N > 1.
        threads: the torch threads the worker computes with (>= 1).

    Returns:
        The limit in force, or None (no cgroup it may use; any OSError): then pace by sleeping.
    """
    quota, period = quota_period(slowdown, threads)
    group_name = f"{GROUP_PREFIX}{_safe(name)}-{os.getpid()}"
    for setup in (_limit_v2, _limit_v1):
        try:
            limit = setup(group_name, quota, period)
        except (OSError, ValueError) as exc:  # a file that says what we did not expect
            log.info("no CPU limit via %s: %s", setup.__name__, exc)
            continue
        if limit is not None:
            return limit
    return None


def quota_period(slowdown: float, threads: int) -> Tuple[int, int]:
    """(quota, period) in microseconds for threads / slowdown CPUs, within the kernel's bounds."""
    threads = max(1, threads)
    period = PERIOD_US
    if period * threads / slowdown < MIN_QUOTA_US:
        period = min(MAX_PERIOD_US, int(MIN_QUOTA_US * slowdown / threads + 0.5))
    return max(MIN_QUOTA_US, int(period * threads / slowdown)), period


def _limit_v2(group_name: str, quota: int, period: int) -> Optional[CpuLimit]:
    parent = cgroup_dir(v2=True)
    if parent is None:
        return None
    if "cpu" not in _read(os.path.join(parent, "cgroup.subtree_control")).split():
        return None  # its children get no cpu.max; enabling it is the parent's owner's choice
    return _enter("cpu.max", parent, group_name, [("cpu.max", f"{quota} {period}")], quota, period)


def _limit_v1(group_name: str, quota: int, period: int) -> Optional[CpuLimit]:
    parent = cgroup_dir(v2=False)
    if parent is None or not os.path.exists(os.path.join(parent, "cpu.cfs_quota_us")):
        return None
    settings = [("cpu.cfs_period_us", str(period)), ("cpu.cfs_quota_us", str(quota))]
    return _enter("cfs_quota", parent, group_name, settings, quota, period)


def _enter(
    mode: str,
    parent: str,
    group_name: str,
    settings: List[Tuple[str, str]],
    quota: int,
    period: int,
) -> CpuLimit:
    """Create the group, set its limit, move this process in; undo all of it on any OSError."""
    sweep(parent)
    group = os.path.join(parent, group_name)
    os.mkdir(group)  # an OSError here (EACCES for a device's own user) leaves nothing behind
    limit = CpuLimit(mode, group, parent, quota, period)
    try:
        for file, value in settings:
            _write(os.path.join(group, file), value)
        limit.reaper = _start_reaper(group)  # before moving in: it stays in the parent group
        _write(os.path.join(group, "cgroup.procs"), str(os.getpid()))
        if cgroup_dir(v2=mode == "cpu.max") != group:
            raise OSError(errno.EIO, f"this process did not arrive in {group}")
    except OSError:
        limit.release()
        raise
    return limit


# A worker killed with SIGKILL (a coordinator giving up on it) cannot remove its group. So a small
# process, started outside the group, waits for the end of file on a pipe only the worker holds
# (the kernel closes it however the worker ends), then removes the group (an exiting process
# leaves its group a moment after its files close, hence the retries).
_REAPER = """import os, sys, time
while os.read(0, 64):
    pass
for _ in range(200):
    try:
        os.rmdir(sys.argv[1])
        break
    except FileNotFoundError:
        break
    except OSError:
        time.sleep(0.05)
"""


_REAPERS: List[subprocess.Popen] = []  # held, so that none is reported as a lost child


def _start_reaper(group: str) -> Optional[int]:
    """Start the reaper of `group`; returns the pipe end to keep open, or None if it failed
    (then `sweep`, at the next worker's start, is what removes a group left behind)."""
    read, write = os.pipe()
    try:
        _REAPERS.append(
            subprocess.Popen(
                [sys.executable, "-S", "-c", _REAPER, group],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a signal to the worker's process group spares it
            )
        )
    except OSError as exc:
        log.warning("no reaper for cgroup %s: %s", group, exc)
        os.close(write)
        return None
    finally:
        os.close(read)
    return write


def sweep(parent: str) -> List[str]:
    """Remove the groups under `parent` left by workers that are gone; returns their names.

    Only `fedmnist-<worker>-<pid>` folders whose pid no longer runs, and only empty ones (the
    kernel refuses to remove a cgroup that holds a process).
    """
    removed: List[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for entry in names:
        match = re.fullmatch(re.escape(GROUP_PREFIX) + r".*-([0-9]{1,10})", entry)
        if match is None or _running(int(match.group(1))):
            continue
        if _rmdir(os.path.join(parent, entry), tries=1):
            removed.append(entry)
    return removed


def cgroup_dir(v2: bool) -> Optional[str]:
    """The folder of this process's cgroup in the v2 hierarchy or v1's `cpu` one, or None."""
    path = None
    for line in _read(_PROC_CGROUP).splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, cgroup = rest.partition(":")
        if v2 and hierarchy == "0" and controllers == "":
            path = cgroup
        elif not v2 and hierarchy != "0" and "cpu" in controllers.split(","):
            path = cgroup
    if path is None or not path.startswith("/"):
        return None
    for line in _read(_PROC_MOUNTINFO).splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) < sep + 4 or len(fields) < 5:
            continue
        fstype, options = fields[sep + 1], fields[sep + 3].split(",")
        if (v2 and fstype == "cgroup2") or (not v2 and fstype == "cgroup" and "cpu" in options):
            root, mount = _unescape(fields[3]), _unescape(fields[4])
            if root == "/":
                inner = path
            elif path == root or path.startswith(root + "/"):
                inner = path[len(root) :]
            else:
                continue  # this mount shows another part of the hierarchy
            return os.path.normpath(mount + inner) if inner not in ("", "/") else mount
    return None


def _unescape(text: str) -> str:
    """A mountinfo path: octal escapes (`\\040` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40] or "worker"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _rmdir(path: str, tries: int = 5) -> bool:
    for attempt in range(tries):
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or attempt == tries - 1:
                return False
            time.sleep(0.01)  # the kernel may take a moment to see the group empty
    return False
