"""The stack's PostgreSQL cluster: found, created, started, stopped, with its two databases.

Debian's server binaries live in /usr/lib/postgresql/<version>/bin (not on PATH); the newest
version there is used, else `initdb` on PATH. PostgreSQL refuses to run as root, so as root the
cluster belongs to a dedicated unprivileged system user, `fedmnist-pg` (created here, no login
shell, no home), as the lab's devices have users of their own (fedlab/users.py); otherwise it
belongs to the current user. The database superuser has the owner's name, so the owner manages
databases over the unix socket (`peer`); servers connect over TCP on 127.0.0.1 with a password
(`scram-sha-256`), since any user of the host can reach a loopback port.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fedlab.procs import cmdline, proc_alive

from .layout import HOST, StackError, StackLayout

DATABASES = ("prefect", "mlflow")
SYSTEM_USER = "fedmnist-pg"
BIN_GLOB = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = "install PostgreSQL's server (`make system-deps`, or apt-get install postgresql)"


@dataclass(frozen=True)
class Owner:
    """The OS user that runs initdb, pg_ctl and the server (and the database superuser)."""

    name: str
    uid: int
    gid: int

    @property
    def is_other(self) -> bool:
        return self.uid != os.geteuid()


def find_bin_dir(pattern: str = BIN_GLOB) -> Path | None:
    """The newest PostgreSQL server's bin folder, or None when no initdb is installed."""
    found = [Path(p) for p in Path("/").glob(pattern.lstrip("/")) if (Path(p) / "initdb").is_file()]
    found.sort(key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0])
    if found:
        return found[-1]
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def require_bin_dir() -> Path:
    bin_dir = find_bin_dir()
    if bin_dir is None or not (bin_dir / "pg_ctl").is_file():
        raise StackError(
            f"PostgreSQL's initdb/pg_ctl not found in {BIN_GLOB} nor on PATH: " + INSTALL_HINT
        )
    return bin_dir


def owner() -> Owner:
    """The cluster's owner: the current user, or (as root) `fedmnist-pg`, created when missing.

    Raises:
        StackError: useradd failed.
    """
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid)
    if not _user_exists(SYSTEM_USER):
        done = subprocess.run(
            [
                "useradd",
                "--system",
                "-M",
                "-d",
                "/nonexistent",
                "-s",
                "/usr/sbin/nologin",
                "-c",
                "fedmnist stack PostgreSQL",
                SYSTEM_USER,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode not in (0, 9):  # 9: created meanwhile
            raise StackError(f"useradd {SYSTEM_USER} failed: {done.stderr.strip()}")
    entry = pwd.getpwnam(SYSTEM_USER)
    return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _run(who: Owner, argv: list[str], what: str, cwd: Path) -> str:
    """Run `argv` as `who` (dropping root's rights when it is another user); stdout."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    other = who.is_other
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            user=who.uid if other else None,
            group=who.gid if other else None,
            extra_groups=[] if other else None,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StackError(f"{what}: {exc}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise StackError(f"{what} failed (exit {done.returncode}): {tail}")
    return done.stdout


def _check_reachable(path: Path, who: Owner) -> None:
    """Another owner must be able to enter every folder above the cluster."""
    if not who.is_other:
        return
    for parent in reversed(path.parents):
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise StackError(
                f"the cluster's user {who.name} cannot enter {parent} (mode "
                f"{oct(parent.stat().st_mode & 0o777)}): set FEDMNIST_HOME to a folder others "
                "may enter (e.g. under /opt or /srv), or `chmod o+x` that folder"
            )


def init_cluster(layout: StackLayout, who: Owner, bin_dir: Path, password: str) -> bool:
    """Create the cluster unless it exists; True when it was created now."""
    if (layout.pg_data / "PG_VERSION").is_file():
        return False
    _check_reachable(layout.pg_dir, who)
    for folder in (layout.pg_dir, layout.pg_socket):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chown(folder, who.uid, who.gid)
    pwfile = layout.pg_dir / "initdb-password"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    os.chown(pwfile, who.uid, who.gid)
    try:
        _run(
            who,
            [
                str(bin_dir / "initdb"),
                "-D",
                str(layout.pg_data),
                "-U",
                who.name,
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            "initdb",
            layout.pg_dir,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    return True


def running_pid(layout: StackLayout) -> int | None:
    """The postmaster's pid when this cluster runs (its postmaster.pid, checked against /proc)."""
    try:
        pid = int((layout.pg_data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    alive = proc_alive(pid) and str(layout.pg_data) in cmdline(pid)
    return pid if alive else None


def start(layout: StackLayout, who: Owner, bin_dir: Path, port: int) -> int:
    """Start the cluster on 127.0.0.1:`port` (socket in postgres/socket) and wait until it
    accepts connections; returns the postmaster's pid (also written to pids/postgres.pid)."""
    options = f"-c listen_addresses={HOST} -p {port} -k {layout.pg_socket}"
    _run(
        who,
        [
            str(bin_dir / "pg_ctl"),
            "start",
            "-D",
            str(layout.pg_data),
            "-l",
            str(layout.pg_log),
            "-w",
            "-t",
            "60",
            "-o",
            options,
        ],
        f"pg_ctl start (log: {layout.pg_log})",
        layout.pg_dir,
    )
    pid = running_pid(layout)
    if pid is None:
        raise StackError(f"PostgreSQL did not stay up; see {layout.pg_log}")
    layout.pid_file("postgres").write_text(f"{pid}\n")
    return pid


def ensure_databases(layout: StackLayout, who: Owner, bin_dir: Path, port: int) -> None:
    """Create the prefect and mlflow databases when missing."""
    sock = ["-h", str(layout.pg_socket), "-p", str(port)]
    listed = _run(
        who,
        [str(bin_dir / "psql"), *sock, "-d", "postgres", "-tAc", "SELECT datname FROM pg_database"],
        "psql (list databases)",
        layout.pg_dir,
    )
    have = set(listed.split())
    for name in DATABASES:
        if name not in have:
            _run(who, [str(bin_dir / "createdb"), *sock, name], f"createdb {name}", layout.pg_dir)


def stop(layout: StackLayout, who: Owner, bin_dir: Path) -> bool:
    """Stop the cluster when it is the one `up` started (the pid it recorded is the running
    postmaster of this data folder); True when it was stopped now."""
    recorded = _recorded_pid(layout)
    pid = running_pid(layout)
    if pid is None or recorded != pid:
        layout.pid_file("postgres").unlink(missing_ok=True)
        return False
    _run(
        who,
        [str(bin_dir / "pg_ctl"), "stop", "-D", str(layout.pg_data), "-m", "fast", "-w"],
        "pg_ctl stop",
        layout.pg_dir,
    )
    layout.pid_file("postgres").unlink(missing_ok=True)
    return True


def _recorded_pid(layout: StackLayout) -> int | None:
    try:
        return int(layout.pid_file("postgres").read_text().strip())
    except (OSError, ValueError):
        return None


def database_url(driver: str, user: str, password: str, port: int, database: str) -> str:
    """A SQLAlchemy URL of one of the stack's databases over TCP on 127.0.0.1."""
    return f"postgresql+{driver}://{quote(user, safe='')}:{password}@{HOST}:{port}/{database}"
