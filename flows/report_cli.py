"""`fedmnist report [RUN] [--out FILE]`: one self-contained HTML page of a training, for sharing.

RUN is a run folder, its name under $FEDMNIST_HOME/runs, or its MLflow run id; without it, the
newest run folder. The page is built from the run folder alone (tasks/report.py): no MLflow
store, no Prefect server and no model is needed, so it works for a training made with tracking
off and for a folder copied from another machine. Exit status 1 when the folder cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
MAX_STATE_BYTES = 16 * 1024 * 1024  # tasks.report.MAX_STATE_BYTES, kept import-free


def add_parsers(sub: Any) -> None:
    """Add the `report` subcommand to `fedmnist`'s subparsers."""
    from flows.cli_help import doc

    p = sub.add_parser(
        "report",
        help="write one HTML page of a training (figures, devices, config) to share",
        **doc(
            "Write a self-contained HTML page of a training from its run folder: a summary, the "
            "figures (accuracy of every model by round, confusion matrix, group shares) embedded "
            "as images, the accuracy table, a per-device table and the config. Works with "
            "tracking off; the page needs no other file.",
            "fedmnist report                      # the newest run",
            "fedmnist report 20261202-042625-seed-40875531 --out seed.html",
            "fedmnist report f6bdd8d87cd24885b41d7e2f6df91e78   # by MLflow run id",
        ),
    )
    p.add_argument(
        "run",
        nargs="?",
        metavar="RUN",
        help="run folder, its name under $FEDMNIST_HOME/runs, or its MLflow run id "
        "(default: the newest run folder)",
    )
    p.add_argument("--out", help="HTML file to write (default: RUN_FOLDER/report.html)")
    p.set_defaults(func=cmd_report)


def _runs_root() -> Path:
    from fedcore.config import fedmnist_home

    return fedmnist_home() / "runs"


def _mlflow_run_id(state: Path) -> str | None:
    try:
        if state.stat().st_size > MAX_STATE_BYTES:
            return None
        value = json.loads(state.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return None
    run_id = value.get("mlflow_run_id") if isinstance(value, dict) else None
    return run_id if isinstance(run_id, str) else None


def find_run(ref: str | None, runs_root: Path) -> Path:
    """The run folder `ref` names (a path, a folder name under `runs_root`, an MLflow run id),
    or the newest under `runs_root` when `ref` is None.

    Raises:
        LookupError: nothing matches (the message says where it looked and what exists).
    """
    states = sorted(runs_root.glob(f"*/{STATE_FILE}")) if runs_root.is_dir() else []
    if ref is None:
        if not states:
            raise LookupError(f"no run folder under {runs_root}: train with `fedmnist run` first")
        return max(states, key=lambda s: (s.stat().st_mtime, s.parent.name)).parent
    for candidate in (Path(ref).expanduser(), runs_root / ref):
        if (candidate / STATE_FILE).is_file():
            return candidate
    for state in states:
        if _mlflow_run_id(state) == ref:
            return state.parent
    recent = ", ".join(s.parent.name for s in states[-3:]) or "none"
    raise LookupError(
        f"no run {ref!r}: give a run folder (it holds {STATE_FILE}), its name under {runs_root} "
        f"(latest: {recent}), or its MLflow run id"
    )


def cmd_report(args: argparse.Namespace) -> int:
    from tasks.figures import RunFolderError
    from tasks.report import write_report

    try:
        run_dir = find_run(args.run, _runs_root())
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        out = write_report(run_dir, Path(args.out) if args.out else None)
    except RunFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB): the report of {run_dir.name}")
    return 0
