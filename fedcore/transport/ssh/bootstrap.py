"""Bootstrap a device: check its Python and torch, and ship the worker's code over SFTP.

The bundle lands in `<remote_dir>/code/<version>/`: an unchanged version is never uploaded twice,
and an upload goes to a temporary folder renamed into place, marked by a `.complete` file, so a
half-upload never looks complete.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import shlex
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from .bundle import code_bundle
from .config import SSHConfig
from .connection import Connection
from .errors import RemoteSetupError

log = logging.getLogger("fedcore.transport.ssh")

MIN_PYTHON = (3, 8)

# Runs on the device's Python (any 3.x): reports versions without importing torch (fast).
_CHECK = r"""
import json, os, platform, sys
try:
    import importlib.util as u
    found = u.find_spec("torch") is not None
except Exception:
    found = False
tv = None
if found:
    try:
        import importlib.metadata as md
        tv = md.version("torch")
    except Exception:
        tv = "unknown"
root = os.path.abspath(os.path.expanduser(sys.argv[1]))
print(json.dumps({"python": platform.python_version(), "executable": sys.executable,
    "torch": tv, "home": os.path.expanduser("~"), "remote_dir": root,
    "complete": os.path.isfile(os.path.join(root, "code", sys.argv[2], ".complete"))}))
"""

_FIX_PYTHON = (
    "install Python >= 3.8 with torch there (JetPack ships one), or set `python:` in the "
    "worker's ssh settings to the full path of an interpreter that has torch"
)


@dataclass(frozen=True)
class BootstrapInfo:
    """What `bootstrap` found and did on the device."""

    version: str
    code_dir: str  # absolute, on the device
    uploaded: bool  # False when that version was already complete there
    python: str
    torch: str
    home: str
    seconds: float


def bootstrap_device(conn: Connection, cfg: SSHConfig, name: str) -> BootstrapInfo:
    """Check the device's Python and torch, then upload the code bundle unless already there.

    Args:
        conn: an open connection to the device.
        cfg: the worker's ssh settings (python, remote_dir, command_timeout).
        name: the worker's name, for errors and log lines.

    Returns:
        What was found and done.

    Raises:
        RemoteSetupError: no usable Python or torch, or the upload failed.
        paramiko.SSHException, OSError: the check command could not run.
    """
    start = time.monotonic()
    version, files = code_bundle()
    ep = conn.endpoint
    cmd = shlex.join([cfg.python, "-c", _CHECK, cfg.remote_dir, version])
    status, out, err = conn.run(cmd, cfg.command_timeout)
    if status in (126, 127):
        raise RemoteSetupError(
            name,
            f"remote python {cfg.python!r} was not found or not executable on {ep} "
            f"({err.strip() or f'exit status {status}'}): {_FIX_PYTHON}",
        )
    try:
        found = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RemoteSetupError(
            name,
            f"remote python {cfg.python!r} on {ep} failed the version check (exit status "
            f"{status}: {err.strip()[-500:] or out.strip()[-500:]}): {_FIX_PYTHON}",
        ) from None
    pyver = tuple(int(p) for p in found["python"].split(".")[:2])
    if pyver < MIN_PYTHON:
        raise RemoteSetupError(
            name,
            f"remote python {cfg.python!r} on {ep} is Python {found['python']}; the worker "
            f"needs >= {'.'.join(map(str, MIN_PYTHON))}: {_FIX_PYTHON}",
        )
    if not found["torch"]:
        raise RemoteSetupError(
            name,
            f"remote python {cfg.python!r} ({found['executable']}, Python {found['python']}) "
            f"on {ep} has no torch: install torch into it (on a Jetson: NVIDIA's wheel for its "
            "JetPack), or set `python:` in the worker's ssh settings to an interpreter that has it",
        )
    code_dir = f"{found['remote_dir']}/code/{version}"
    uploaded = False
    if not found["complete"]:
        _upload(conn, cfg, name, found["remote_dir"], version, files)
        uploaded = True
    info = BootstrapInfo(
        version=version,
        code_dir=code_dir,
        uploaded=uploaded,
        python=found["python"],
        torch=found["torch"],
        home=found["home"],
        seconds=time.monotonic() - start,
    )
    log.info(
        "%s: Python %s, torch %s, code %s %s (%.2fs)",
        name,
        info.python,
        info.torch,
        version,
        "uploaded" if uploaded else "already there",
        info.seconds,
    )
    return info


def _upload(
    conn: Connection,
    cfg: SSHConfig,
    name: str,
    remote_dir: str,
    version: str,
    files: dict[str, bytes],
) -> None:
    root = f"{remote_dir}/code"
    final = f"{root}/{version}"
    tmp = f"{root}/.tmp-{version}-{secrets.token_hex(4)}"
    try:
        sftp = conn.client.open_sftp()
    except (paramiko.SSHException, OSError) as exc:
        raise RemoteSetupError(
            name,
            f"cannot open SFTP on {conn.endpoint} ({exc}): enable the sftp Subsystem in the "
            "device's sshd_config",
        ) from None
    try:
        sftp.get_channel().settimeout(cfg.command_timeout)
        _makedirs(sftp, root)
        sftp.mkdir(tmp, 0o755)
        for d in sorted({str(Path(rel).parent) for rel in files}):
            sftp.mkdir(f"{tmp}/{d}", 0o755)
        for rel, data in sorted(files.items()):
            sftp.putfo(io.BytesIO(data), f"{tmp}/{rel}", file_size=len(data))
        manifest = {"version": version, "files": sorted(files), "uploaded": time.time()}
        sftp.putfo(io.BytesIO(json.dumps(manifest).encode()), f"{tmp}/.complete")
        try:
            sftp.posix_rename(tmp, final)
        except OSError:
            if _exists(sftp, f"{final}/.complete"):
                _rmtree(sftp, tmp)  # another session uploaded the same version first
            else:  # a folder without .complete, not made by us: replace it
                _rmtree(sftp, final)
                sftp.posix_rename(tmp, final)
        log.info("%s: uploaded %d modules to %s:%s", name, len(files), conn.endpoint, final)
    except (OSError, paramiko.SSHException) as exc:
        try:
            _rmtree(sftp, tmp)
        except (OSError, paramiko.SSHException):
            pass
        raise RemoteSetupError(
            name,
            f"uploading the worker code to {conn.endpoint}:{final} failed ({exc!r}): check "
            f"that remote_dir {cfg.remote_dir!r} is writable by {conn.endpoint.user} and the disk "
            "has room",
        ) from None
    finally:
        sftp.close()


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
        return True
    except OSError:
        return False


def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        sub = "/".join(parts[:i])
        if sub and not _exists(sftp, sub):
            sftp.mkdir(sub, 0o755)


def _rmtree(sftp: paramiko.SFTPClient, path: str) -> None:
    for entry in sftp.listdir_attr(path):
        child = f"{path}/{entry.filename}"
        if stat.S_ISDIR(entry.st_mode or 0):
            _rmtree(sftp, child)
        else:
            sftp.remove(child)
    sftp.rmdir(path)
