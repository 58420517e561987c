"""The lab devices' Python: a venv of Debian's /usr/bin/python3 with torch, built once, shared.

A Jetson runs its own system Python with JetPack's torch, not the coordinator's venv; the lab
mirrors that with a venv of the system interpreter, with torch and `cryptography` (secure
aggregation's crypto, which JetPack's system Python carries too). It lies outside root's home
(mode 700, which the lab users could not enter), is built under a file lock so that labs started
at once build it only once, and is marked ready only after it imports torch, so a half-built
venv is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from .commands import LabError, run
from .users import check_traversable, is_root

log = logging.getLogger("fedlab")

SYSTEM_PYTHON = "/usr/bin/python3"
LAB_TORCH = "torch==2.14.1"  # the build this machine kind installs (see the Makefile)
# Secure aggregation's crypto on the devices, as JetPack's system Python carries it.
LAB_CRYPTO = "cryptography"
READY_MARK = ".fedmnist-lab-ready"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _imports_torch(python: Path, module: str = "torch") -> bool:
    try:
        done = subprocess.run(
            [str(python), "-c", f"import {module}"], capture_output=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def ensure_lab_python(venv: Path | str | None = None, lab_dir: Path | None = None) -> str:
    """The devices' Python interpreter: a venv of /usr/bin/python3 with torch, made once.

    `venv` (else $FEDMNIST_LAB_PYTHON, else `<lab_dir>/../fedmnist-lab-python`) names the venv
    folder, or an existing interpreter to use as it is. Reused when it already imports torch;
    otherwise built (`pip install torch==2.14.1` from the machine's index, about a minute).
    Without root, the current interpreter serves when it has torch.

    Returns:
        the interpreter's path.

    Raises:
        LabError: it cannot be built, or other users could not run it.
    """
    chosen = venv or os.environ.get("FEDMNIST_LAB_PYTHON")
    if chosen is None and not is_root() and importlib.util.find_spec("torch"):
        return sys.executable
    if chosen is None:
        if lab_dir is None:
            raise LabError("give the lab Python's folder (or set FEDMNIST_LAB_PYTHON)")
        chosen = Path(lab_dir).resolve().parent / "fedmnist-lab-python"
    target = Path(chosen).expanduser().absolute()
    if target.is_file():
        if not _imports_torch(target):
            raise LabError(f"{target} cannot import torch: install it there, or name a venv folder")
        return str(target)
    python = target / "bin" / "python"
    with _locked(target.parent / f".{target.name}.lock"):
        ready = (target / READY_MARK).is_file() and python.exists()
        if not ready and python.exists() and _imports_torch(python):
            (target / READY_MARK).write_text(LAB_TORCH + "\n")
            ready = True
        if not ready:
            _build(target, python)
        elif not _imports_torch(python, "cryptography"):  # a venv built before it was needed
            _install(target, python, LAB_CRYPTO)
    if is_root():
        check_traversable(target, "the lab Python")
    return str(python)


def _build(target: Path, python: Path) -> None:
    """Build the venv `target` afresh and install torch into it (holding the venv's lock)."""
    if target.exists():
        shutil.rmtree(target)
    if not Path(SYSTEM_PYTHON).exists():
        raise LabError(f"{SYSTEM_PYTHON} is missing: apt-get install -y python3 python3-venv")
    log.info("building the lab devices' Python in %s (%s, about a minute)", target, LAB_TORCH)
    run([SYSTEM_PYTHON, "-m", "venv", str(target)], f"creating the venv {target}")
    run(
        [str(python), "-m", "pip", "install", "-q", LAB_TORCH],
        f"pip install {LAB_TORCH} into {target}",
        timeout=1800,
    )
    if not _imports_torch(python):
        raise LabError(f"{python} still cannot import torch after installing {LAB_TORCH}")
    _install(target, python, LAB_CRYPTO)
    (target / READY_MARK).write_text(LAB_TORCH + "\n")


def _install(target: Path, python: Path, package: str) -> None:
    """pip install `package` into the venv `target` and leave it readable by the device users."""
    run(
        [str(python), "-m", "pip", "install", "-q", package], f"pip install {package} into {target}"
    )
    run(["chmod", "-R", "a+rX", str(target)], f"making {target} readable")
