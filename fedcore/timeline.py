"""A training's timeline: one JSON line per round or version, appended to `timeline.jsonl` in the
run folder as it is recorded.

Each line holds the round (or, under a non-sync schedule, the global version), the seconds since
the training's first job was given out, the wall-clock time, and which devices' updates made it
(with their staleness and weight). It is what accuracy-against-time comparisons of schedules are
drawn from (benchmarks/async_fleet.py scores the `global-r<k>` models it points at); the resume
state itself stays in `state.json`. Reading is tolerant of a torn last line (a crash while
appending) and of nothing else: a line that is not a JSON object is an error naming the line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TIMELINE_FILE = "timeline.jsonl"


def append(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Append one record (a JSON object) as a line, flushed to disk."""
    line = json.dumps(dict(record), separators=(",", ":"), default=float) + "\n"
    with open(run_dir / TIMELINE_FILE, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record, in order (a torn last line is left out).

    Raises:
        ValueError: a line other than the last is not a JSON object.
    """
    path = run_dir / TIMELINE_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines):
                break
            raise ValueError(f"{path}: line {i} is not JSON") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {i} is not a JSON object")
        out.append(record)
    return out
