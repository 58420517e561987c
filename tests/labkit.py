"""Starting and stopping the loopback Jetson lab from tests (fedlab), shared by the test modules
that need real sshd devices. Each module starts its own lab and tears it down (lab_down stops only
what it started), so two modules never hold the lab's Linux users at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fedcore.shards import ShardSpec
from fedlab import LabError, LabInfo, lab_down, lab_up

ROOT = Path(__file__).resolve().parents[1]
SEED_SHARDS = {
    "alice": ShardSpec.by_labels(range(0, 4)),
    "bob": ShardSpec.by_labels(range(4, 7)),
    "charlie": ShardSpec.by_labels(range(7, 10)),
    "testing": ShardSpec(split="test"),
}
IS_ROOT = os.geteuid() == 0


def fresh_lab_dir(prefix: str) -> Path:
    """A fresh folder other users can enter (mkdtemp makes it 700; pytest's tmp_path is too)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


def start_lab(
    request: pytest.FixtureRequest,
    prefix: str,
    shards: dict[str, ShardSpec],
    mnist: Path,
    evaluator: str | None = None,
) -> LabInfo:
    """Start a lab torn down when `request`'s scope ends; skip (with the reason) without sshd."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "install-sshd.sh")], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"sshd cannot be installed: {done.stderr.strip()[-300:]}")
    lab_dir = fresh_lab_dir(prefix)
    # Finalizers run last-in first-out: lab_down (sshd, users, folder), then the folder anyway.
    request.addfinalizer(lambda: shutil.rmtree(lab_dir, ignore_errors=True))
    request.addfinalizer(lambda: lab_down(lab_dir))
    try:
        return lab_up(lab_dir, shards, mnist, evaluator)
    except LabError as exc:
        pytest.skip(f"the loopback lab cannot start: {exc}")


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"
