"""A training's timeline: one JSON line per round or version, appended to `timeline.jsonl` in the
run folder as it is recorded; and beside it `devices.jsonl`, one line per worker process's hello.

Each timeline line holds the round (or, under a non-sync schedule, the global version), the
seconds since the training's first job was given out, the wall-clock time, and which devices'
updates made it (with their staleness and weight). It is what accuracy-against-time comparisons
of schedules are drawn from (benchmarks/async_fleet.py scores the `global-r<k>` models it points
at); the resume state itself stays in `state.json`. A devices line is a hello as the coordinator
received it (Python, torch, device, shard, label counts, the machine's facts: see
fedcore.device_facts), written when a worker process first says it, so `fedmnist report` can
show what each device was from the run folder alone, tracking on or off.

Reading is bounded (a file past `MAX_BYTES` is refused before it is read: a run folder may come
from someone else) and tolerant of a torn last line (a crash while appending) and of nothing
else: a line that is not a JSON object is a ValueError naming the file and the line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the report reads run folders without importing torch
    from .messages import Hello

TIMELINE_FILE = "timeline.jsonl"
DEVICES_FILE = "devices.jsonl"
MAX_BYTES = 64 * 1024 * 1024  # far past any training's record; a larger file is not one


def append(run_dir: Path, record: Mapping[str, Any], file: str = TIMELINE_FILE) -> None:
    """Append one record (a JSON object) as a line of `file`, flushed to disk."""
    line = json.dumps(dict(record), separators=(",", ":"), default=float) + "\n"
    with open(run_dir / file, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read(
    run_dir: Path, file: str = TIMELINE_FILE, max_bytes: int = MAX_BYTES
) -> list[dict[str, Any]]:
    """Every complete record of `file` in `run_dir`, in order ([] when absent; a torn last line
    is left out).

    Raises:
        ValueError: the file is larger than `max_bytes`, or a line other than the last is not a
            JSON object.
    """
    path = run_dir / file
    if not path.is_file():
        return []
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(
            f"{path} is {size} bytes, more than the {max_bytes} a training's record takes; "
            "it is not one"
        )
    with open(path, "rb") as fh:
        lines = fh.read(max_bytes).decode("utf-8", "replace").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines):
                break
            raise ValueError(f"{path}: line {i} is not JSON; the file is damaged") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {i} is not a JSON object")
        out.append(record)
    return out


def hello_record(worker: str, hello: Hello) -> dict[str, Any]:
    """The devices line of `worker`'s hello (label counts keyed by digit as text, as JSON has)."""
    fields = dataclasses.asdict(hello)
    fields["label_counts"] = {str(k): v for k, v in sorted(hello.label_counts.items())}
    return {"worker": worker, **fields}


def record_devices(run_dir: Path, hellos: Mapping[str, Hello]) -> dict[str, Hello]:
    """Append the hellos of `hellos` that `devices.jsonl` does not end with for their worker (a
    worker's first hello of the training, or a restarted worker's new one); returns those.

    Raises:
        ValueError: `devices.jsonl` is damaged (see `read`).
        OSError: the run folder cannot be written.
    """
    last: dict[str, dict[str, Any]] = {}
    for line in read(run_dir, DEVICES_FILE):
        last[str(line.get("worker"))] = {k: v for k, v in line.items() if k != "wall"}
    new = {w: h for w, h in hellos.items() if last.get(w) != hello_record(w, h)}
    for worker, hello in new.items():
        append(run_dir, {**hello_record(worker, hello), "wall": time.time()}, DEVICES_FILE)
    return new
