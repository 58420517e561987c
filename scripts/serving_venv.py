"""Build (once) the fresh venv a registered model is served from: MLflow and torch only.

`mlflow models serve --env-manager local` must work on a machine that has MLflow and torch and
not this project, so the test that proves it needs such a venv. Building it is set-up, not test
time (`make test` runs this first): wheels are downloaded once into `<home>/wheels`, the venv is
installed from there with `--no-index` into `<home>/serving-venv/<hash>`, where the hash covers the
Python version and the pins (MLflow: the version this checkout runs; torch: the Makefile's pin).
An older hash is removed, so the disk holds one. Prints the venv's path; exit 1 with the reason
when it cannot be built (no registry and missing wheels).

    .venv/bin/python scripts/serving_venv.py [--home .fedmnist]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "venv; pip download -d wheels; pip install --no-index --find-links wheels"


def torch_pin() -> str:
    """The torch build the project's set-up installs (the Makefile's pin)."""
    found = re.search(r"\btorch==([\w.+]+)", (ROOT / "Makefile").read_text())
    if found:
        return found.group(1)
    import torch

    return torch.__version__.split("+")[0]


def serving_pins() -> list[str]:
    """What the serving venv holds: this checkout's MLflow and the pinned torch."""
    from importlib.metadata import version

    return [f"mlflow=={version('mlflow')}", f"torch=={torch_pin()}"]


def _pip(python: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=3600,
    )


def build(home: Path) -> Path:
    """The ready venv's folder, built if missing.

    Raises:
        RuntimeError: the wheels could not be fetched or installed (the message says which).
    """
    pins = serving_pins()
    key = f"{sys.version_info[0]}.{sys.version_info[1]}|{'|'.join(pins)}|{RECIPE}"
    venvs = home / "serving-venv"
    venv = venvs / hashlib.sha256(key.encode()).hexdigest()[:12]
    python = venv / "bin" / "python"
    venvs.mkdir(parents=True, exist_ok=True)
    with (venvs / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the next caller reuses it
        if (venv / ".ready").is_file() and python.exists():
            return venv
        for old in venvs.iterdir():  # an older hash or a half-built venv: the disk is bounded
            if old.is_dir():
                shutil.rmtree(old)
        wheels = home / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"building the serving venv ({' '.join(pins)}) in {venv} ...", file=sys.stderr)
        fetched = _pip(sys.executable, "download", "--quiet", "-d", str(wheels), *pins)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        installed = _pip(
            python, "install", "--quiet", "--no-index", "--find-links", str(wheels), *pins
        )
        if installed.returncode != 0:
            shutil.rmtree(venv)
            raise RuntimeError(
                f"cannot build the serving venv ({' '.join(pins)}): no registry to fetch wheels "
                f"from and {wheels} lacks some ({fetched.stderr.strip()[-300:]} / "
                f"{installed.stderr.strip()[-300:]})"
            )
        (venv / ".ready").write_text(key + "\n")
        return venv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = os.environ.get("FEDMNIST_HOME", str(ROOT / ".fedmnist"))
    p.add_argument("--home", type=Path, default=Path(default), help="where wheels and venv live")
    args = p.parse_args()
    try:
        print(build(args.home.resolve()))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
