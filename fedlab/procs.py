"""Processes as the lab sees them through /proc: alive or not, their command line, their children.

The lab stops only what it started: an sshd by the pid it recorded (checked against its command
line, in case the pid was reused) together with every process of its sessions, and the processes
of a lab user before that user is deleted. A zombie counts as gone, because a container's init
may never reap it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def proc_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, which a non-reaping init may leave, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def cmdline(pid: int) -> str:
    """The command line of `pid`, arguments joined by spaces ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: its children, their children, and so on."""
    tree, out, todo = _children_map(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pids_of_uid(uid: int) -> list[int]:
    """The live processes owned by `uid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid and proc_alive(int(entry.name)):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def kill(pids: list[int], sig: int) -> None:
    """Send `sig` to each of `pids`; those already gone (or not ours to signal) are skipped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` seconds for `pids` to end; returns those still alive."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if proc_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if proc_alive(p)]
    return left
