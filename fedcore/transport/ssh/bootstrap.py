"""Bootstrap a device: check its Python and torch, and ship the worker's code over SFTP.

The bundle lands in `<remote_dir>/code/<version>/`: an unchanged version is never uploaded twice,
and an upload goes to a temporary folder renamed into place, marked by a `.complete` file (the
manifest: a sha256 per file), so a half-upload never looks complete. The version check sends the
coordinator's own sha256 of every file, and the device recomputes them: a folder whose files were
changed since is uploaded again (a bad copy replaced, never trusted for its marker).

Every remote step is bounded: the check command has a total deadline and a byte cap
(`Connection.run`), and the upload, from opening SFTP to the rename, has one deadline
(`command_timeout`), each SFTP operation a timeout within it. What the check prints is validated
field by field before use.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import secrets
import shlex
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from .bundle import code_bundle
from .commands import open_sftp
from .config import SSHConfig
from .connection import Connection
from .errors import RemoteSetupError

log = logging.getLogger("fedcore.transport.ssh")

MIN_PYTHON = (3, 8)

# Runs on the device's Python (any 3.x): reports versions without importing torch (fast), and
# which files of the code folder differ from the sha256 the coordinator sent (argv[3], JSON).
_CHECK = r"""
import hashlib, json, os, platform, sys
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
code = os.path.join(root, "code", sys.argv[2])
def digest(path):
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(65536), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()
complete = os.path.isfile(os.path.join(code, ".complete"))
stale = sorted(r for r, h in json.loads(sys.argv[3]).items()
    if complete and digest(os.path.join(code, r)) != h)
print(json.dumps({"python": platform.python_version(), "executable": sys.executable,
    "torch": tv, "home": os.path.expanduser("~"), "remote_dir": root,
    "complete": complete, "stale": stale}))
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
    hashes = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    ep = conn.endpoint
    cmd = shlex.join([cfg.python, "-c", _CHECK, cfg.remote_dir, version, json.dumps(hashes)])
    status, out, err = conn.run(cmd, cfg.command_timeout)
    if status in (126, 127):
        raise RemoteSetupError(
            name,
            f"remote python {cfg.python!r} was not found or not executable on {ep} "
            f"({err.strip() or f'exit status {status}'}): {_FIX_PYTHON}",
        )
    found = _parse_check(out, hashes)
    if found is None:
        raise RemoteSetupError(
            name,
            f"remote python {cfg.python!r} on {ep} failed the version check (exit status "
            f"{status}: {err.strip()[-500:] or out.strip()[-500:]!r}): {_FIX_PYTHON}",
        )
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
    if found["stale"]:
        log.warning(
            "%s: code %s on %s differs from this coordinator's in %s: uploading it again",
            name,
            version,
            ep,
            ", ".join(found["stale"]),
        )
    if not found["complete"] or found["stale"]:
        _upload(conn, cfg, name, found["remote_dir"], version, files, hashes)
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


def _parse_check(out: str, hashes: dict[str, str]) -> dict[str, Any] | None:
    """The version check's report, every field checked (None: not a valid report)."""
    lines = out.strip().splitlines()
    try:
        found = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    fields = {"python": str, "executable": str, "home": str, "remote_dir": str, "complete": bool}
    if not isinstance(found, dict) or any(
        not isinstance(found.get(k), t) for k, t in fields.items()
    ):
        return None
    stale = found.get("stale")
    if (
        not re.fullmatch(r"[0-9]{1,3}\.[0-9]{1,3}(\.[0-9a-z+]{1,16})?", found["python"])
        or not isinstance(found.get("torch"), (str, type(None)))
        or not isinstance(stale, list)
        or any(s not in hashes for s in stale)  # only names we sent
    ):
        return None
    return found


class _Deadline:
    """The upload's one deadline: each SFTP operation's timeout is what is left of it."""

    def __init__(self, sftp: paramiko.SFTPClient, seconds: float) -> None:
        self.sftp, self.seconds = sftp, seconds
        self.end = time.monotonic() + seconds

    def __call__(self) -> paramiko.SFTPClient:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the upload took more than {self.seconds:g}s")
        self.sftp.get_channel().settimeout(left)  # type: ignore[union-attr]
        return self.sftp


def _upload(
    conn: Connection,
    cfg: SSHConfig,
    name: str,
    remote_dir: str,
    version: str,
    files: dict[str, bytes],
    hashes: dict[str, str],
) -> None:
    root = f"{remote_dir}/code"
    final = f"{root}/{version}"
    tmp = f"{root}/.tmp-{version}-{secrets.token_hex(4)}"
    try:
        sftp = open_sftp(conn.transport, cfg.command_timeout)
    except (paramiko.SSHException, OSError) as exc:
        raise RemoteSetupError(
            name,
            f"cannot open SFTP on {conn.endpoint} ({exc!r}): enable the sftp Subsystem in the "
            "device's sshd_config",
        ) from None
    op = _Deadline(sftp, cfg.command_timeout)
    try:
        _makedirs(op, root)
        op().mkdir(tmp, 0o755)
        for d in sorted({str(Path(rel).parent) for rel in files}):
            op().mkdir(f"{tmp}/{d}", 0o755)
        for rel, data in sorted(files.items()):
            op().putfo(io.BytesIO(data), f"{tmp}/{rel}", file_size=len(data))
        manifest = {"version": version, "files": hashes, "uploaded": time.time()}
        op().putfo(io.BytesIO(json.dumps(manifest).encode()), f"{tmp}/.complete")
        try:
            op().posix_rename(tmp, final)
        except OSError:
            if _same_files(op, final, files):
                _rmtree(op, tmp)  # another session uploaded the same version first
            else:  # a folder not made by us, or changed since: move it aside, then replace it
                old = f"{root}/.old-{version}-{secrets.token_hex(4)}"
                op().posix_rename(final, old)
                op().posix_rename(tmp, final)
                try:
                    _rmtree(op, old)
                except (OSError, paramiko.SSHException) as exc:  # in place already: go on
                    log.warning("%s: could not remove %s on %s: %r", name, old, conn.endpoint, exc)
        log.info("%s: uploaded %d modules to %s:%s", name, len(files), conn.endpoint, final)
    except (OSError, paramiko.SSHException) as exc:
        try:
            _rmtree(op, tmp)
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


def _exists(op: _Deadline, path: str) -> bool:
    try:
        op().stat(path)
        return True
    except FileNotFoundError:
        return False


def _same_files(op: _Deadline, folder: str, files: dict[str, bytes]) -> bool:
    """Whether `folder` is complete and holds exactly `files` (each read up to its size + 1)."""
    if not _exists(op, f"{folder}/.complete"):
        return False
    for rel, data in files.items():
        try:
            with op().open(f"{folder}/{rel}", "rb") as f:
                if f.read(len(data) + 1) != data:
                    return False
        except FileNotFoundError:
            return False
    return True


def _makedirs(op: _Deadline, path: str) -> None:
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        sub = "/".join(parts[:i])
        if sub and not _exists(op, sub):
            op().mkdir(sub, 0o755)


def _rmtree(op: _Deadline, path: str, depth: int = 0) -> None:
    """Remove a folder this bootstrap made (the bundle is 2 levels deep; deeper is refused)."""
    if depth > 4:
        raise OSError(f"{path}: deeper than any folder the upload makes; not removed")
    for entry in op().listdir_attr(path):
        child = f"{path}/{entry.filename}"
        if stat.S_ISDIR(entry.st_mode or 0):
            _rmtree(op, child, depth + 1)
        else:
            op().remove(child)
    op().rmdir(path)
