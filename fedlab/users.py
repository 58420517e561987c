"""The lab devices' Linux users: `fedlab-<name>`, created, taken over, deleted; who may enter what.

As root, every device logs in as its own user whose home (mode 700) holds its work folder and its
shard, so one device cannot read another's data, as on separate Jetsons. Users are named in the
lab's own namespace (`fedlab-`) so that a leftover of a lab that died can be recognised and taken
over, and only users a lab created are ever deleted - after their processes (lab sessions only)
are killed, since userdel refuses a user that still runs something.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import signal
import subprocess
from pathlib import Path

from .commands import LabError, run
from .procs import kill, pids_of_uid, wait_gone

log = logging.getLogger("fedlab")

USER_PREFIX = "fedlab-"


def is_root() -> bool:
    """Whether the lab can create users (else every device logs in as the current user)."""
    return os.geteuid() == 0


def user_name(worker: str) -> str:
    """The Linux user of a lab device: `fedlab-<name>`, sanitised for useradd (32 chars)."""
    clean = re.sub(r"[^a-z0-9_-]", "-", worker.lower())
    return (USER_PREFIX + clean)[:32]


def ensure_user(user: str, home: Path, lab_dir: Path) -> None:
    """Create `user` with `home` (no password, key logins only), or take over a dead lab's.

    Raises:
        LabError: the user exists with a home outside `lab_dir` (another lab uses it), or
            useradd/usermod failed.
    """
    try:
        existing = pwd.getpwnam(user)
    except KeyError:
        run(
            [
                "useradd",
                "-M",
                "-d",
                str(home),
                "-s",
                "/bin/sh",
                "-p",
                "*",
                "-c",
                "fedmnist lab device",
                user,
            ],
            f"useradd {user}",
        )
        return
    other_home = Path(existing.pw_dir)
    if other_home.exists() and lab_dir not in other_home.parents:
        raise LabError(
            f"user {user} already exists with home {other_home}: another lab uses it; run lab_down "
            "for that lab, or give this lab's workers other names"
        )
    # A leftover of a lab that died: take it over (its name is in the lab's namespace).
    run(["usermod", "-d", str(home), "-s", "/bin/sh", "-p", "*", user], f"usermod {user}")


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give `path` and everything below it to `uid`:`gid`."""
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            os.chown(os.path.join(root, n), uid, gid)


def remove_user(user: str) -> None:
    """Kill `user`'s processes and delete the user; a user that is not there is fine."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return
    pids = pids_of_uid(uid)  # only lab sessions run as a lab user
    kill(pids, signal.SIGKILL)
    wait_gone(pids, 5.0)
    done = subprocess.run(["userdel", user], capture_output=True, text=True)
    if done.returncode not in (0, 6):  # 6: no such user
        log.warning("userdel %s failed: %s", user, done.stderr.strip())


def check_traversable(path: Path, what: str) -> None:
    """Make sure other users (the lab's) can enter every folder down to `path`.

    Raises:
        LabError: a folder on the way is closed to others (names it and where to go instead).
    """
    for parent in [*reversed(path.parents), path]:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise LabError(
                f"{what} {path} lies under {parent} (mode {oct(parent.stat().st_mode & 0o777)}), "
                "which other users cannot enter: put it elsewhere (e.g. under /tmp or /opt)"
            )
