"""One emulated device's OpenSSH server: its keys, its config, starting and stopping it.

Each device is a real `/usr/sbin/sshd -f CONFIG -E LOG` on 127.0.0.1 with its own port and host
key, so the ssh transport meets what a Jetson gives it: key exchange, host key checks, public-key
logins, SFTP and ProxyJump. A listener is stopped by the pid it wrote, only after checking that
this pid still runs our config (pids get reused), and with every process of its sessions: an
sshd's session processes outlive their listener, and a stopped device must not keep a worker.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from .commands import LabError, run
from .procs import cmdline, descendants, kill, proc_alive, wait_gone

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
HOST_KEY = "ssh_host_ed25519_key"
START_ATTEMPTS = 3  # a free port can be taken by someone else before sshd binds it


def generate_key(path: Path, comment: str, what: str) -> None:
    """Write a new ed25519 key pair without passphrase: `path` and `path`.pub.

    Raises:
        LabError: ssh-keygen failed (`what` names the key in the message).
    """
    run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], what)


def known_hosts_line(host_dir: Path, port: int) -> str:
    """The known_hosts line of the device whose host key lies in `host_dir`, on `port`."""
    keytype, b64 = (host_dir / f"{HOST_KEY}.pub").read_text().split()[:2]
    return f"[127.0.0.1]:{port} {keytype} {b64}\n"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def sshd_version() -> tuple[int, int]:
    """OpenSSH's (major, minor) version, (0, 0) when sshd does not say."""
    done = subprocess.run([SSHD, "-V"], capture_output=True, text=True)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", done.stderr + done.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def sshd_config(host_dir: Path, port: int, user: str, authorized_keys: Path, strict: bool) -> str:
    """The sshd_config text of one device: loopback only, keys only, one allowed user.

    Args:
        host_dir: the device's folder (host key, pid file).
        port: the port to listen on.
        user: the only user that may log in.
        authorized_keys: the file of keys that may log in, in the device's home/.ssh.
        strict: sshd's StrictModes (only with root, when the keys file lies in the user's home).
    """
    lines = [
        "# An emulated Jetson of the fedmnist lab (written by fedlab).",
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_dir / HOST_KEY}",
        f"PidFile {host_dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized_keys}",
        f"AllowUsers {user}",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin no",
        # Without root the keys file lies outside the user's home, under world-writable /tmp,
        # which StrictModes refuses; with root it sits in the user's own home, checked.
        f"StrictModes {'yes' if strict else 'no'}",
        "AllowTcpForwarding yes",  # a lab device can be a ProxyJump bastion
        "X11Forwarding no",
        "PrintMotd no",
        "PrintLastLog no",
        "Subsystem sftp internal-sftp",
        # Scratch files (torch writes some on import) stay in the device's home, removed with it.
        f"SetEnv TMPDIR={authorized_keys.parent.parent / 'tmp'}",
        "LogLevel VERBOSE",
    ]
    if sshd_version() >= (9, 8):
        lines.append("PerSourcePenalties no")  # tests fail logins on purpose, from one address
    return "\n".join(lines) + "\n"


def owns(pid: int, config: str) -> bool:
    """Whether `pid` is the sshd we started with `config` (guards against pid reuse)."""
    return pid > 0 and proc_alive(pid) and config in cmdline(pid)


def start_sshd(host_dir: Path, config: Path) -> int:
    """Start a daemonised sshd with `config`; returns its pid once its port answers.

    Raises:
        LabError: sshd exited, or its port did not answer within 10 s (with sshd's log tail).
    """
    port = int(re.search(r"^Port (\d+)$", config.read_text(), re.M).group(1))  # type: ignore[union-attr]
    pid_file = host_dir / "sshd.pid"
    log_file = host_dir / "sshd.log"
    pid_file.unlink(missing_ok=True)
    done = subprocess.run(
        [SSHD, "-f", str(config), "-E", str(log_file)], capture_output=True, text=True, timeout=30
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if done.returncode == 0 and pid_file.is_file() and port_open(port):
            # sshd creates its pid file before it writes the pid: read again until it is there
            words = pid_file.read_text().split()
            pid = int(words[0]) if words and words[0].isdigit() else 0
            if owns(pid, str(config)):
                return pid
        if done.returncode != 0:
            break
        time.sleep(0.02)
    # An sshd that started but did not answer in time must not outlive this attempt.
    words = pid_file.read_text().split() if pid_file.is_file() else []
    if words and words[0].isdigit():
        stop_sshd(int(words[0]), str(config), hard=True)
    tail = log_file.read_text()[-1500:] if log_file.is_file() else ""
    raise LabError(
        f"sshd with {config} did not start on 127.0.0.1:{port} (exit status {done.returncode}): "
        f"{done.stderr.strip()} {tail.strip()}"
    )


def launch_sshd(
    host_dir: Path, user: str, authorized_keys: Path, strict: bool
) -> tuple[Path, int, int]:
    """Write `host_dir`/sshd_config on a free port and start sshd with it.

    Returns:
        (config path, port, pid).

    Raises:
        LabError: sshd did not start on any of `START_ATTEMPTS` free ports.
    """
    config = host_dir / "sshd_config"

    def attempt() -> tuple[Path, int, int]:
        port = free_port()
        config.write_text(sshd_config(host_dir, port, user, authorized_keys, strict=strict))
        return config, port, start_sshd(host_dir, config)

    for _ in range(START_ATTEMPTS - 1):
        with contextlib.suppress(LabError):
            return attempt()
    return attempt()


def stop_sshd(pid: int, config: str, hard: bool = False) -> None:
    """Stop our sshd listener and every process of its sessions (workers included).

    Args:
        pid: the listener's pid; nothing happens unless it still runs `config`.
        config: the listener's sshd_config path.
        hard: SIGKILL the listener too (a device dying) instead of SIGTERM.
    """
    if not owns(pid, config):
        return
    family = descendants(pid)
    kill(family, signal.SIGKILL)
    kill([pid], signal.SIGKILL if hard else signal.SIGTERM)
    left = wait_gone([pid, *family], 5.0)
    if left:
        kill(left, signal.SIGKILL)
        wait_gone(left, 2.0)
