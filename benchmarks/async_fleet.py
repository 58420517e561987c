"""Wall time to a target accuracy under the sync, semi-sync and async schedules, with one device
five times slower than the other two.

(One file of ~900 lines on purpose: a script run by path, whose runs, scoring, report and figure
stay together so that `--reuse` can regenerate every result from the .json alone.)

Three trainers (alice, bob, charlie), charlie with `slowdown: 5` (a CPU limit where the kernel
lets the worker take one, else it sleeps; the log's pacing line is kept with each run), on two
splits of the same devices: IID thirds of the training set (`iid: {index, count: 3, seed: 1}`)
and the seed's label split (alice 0-3, bob 4-6, charlie 7-9, configs/seed.yaml). The seed's
local training (10 batches of 32, plain SGD, lr 0.1 x0.98 by unit of work, at least 0.001) and
the seed's unweighted `mean`, under three schedules (`SCHEDULES`):

- `sync`: 40 rounds, every round waits for charlie (120 updates);
- `semi-sync`: a round closes 0.1 s after 2 updates; a late update joins a later round weighed by
  its staleness (polynomial, a = 0.5); 60 rounds;
- `async`: FedBuff, a server step every 2 arrivals, staleness weight (1 + tau)^-0.5; 60 versions
  (120 updates, sync's work).

Tuning variants for the seed split (`--schedules async-memory,async-const,async-b3-const`):
the same FedBuff with `memory: true` (MIFA: every step combines each device's latest update, so
charlie's digits count in every step), with constant staleness (stale updates at full weight), and
with constant staleness and a buffer of 3 (40 versions; defined, not yet run in the results).

Each run is `fedmnist run` on a derived config (the real flow: Prefect's temporary server, local
worker processes with one torch thread each, no MLflow record, no evaluator, so that evaluation
costs no wall time), in a FEDMNIST_HOME of the benchmark's own. Afterwards every k-th saved
version (k = versions / --points, rounded up, and always the last one) is scored offline on the
10,000 test images; its time is the run's `timeline.jsonl` seconds (since the first job was
given out: Prefect's and the workers' start-up are not counted). From those curves, per run and as
medians over seeds:

- time to target: the first scored version at or above the target (IID: the same seed's sync
  run's final accuracy; seed split: 95.9%, the seed's), so exact to k versions; also counted from
  each run's first version, since every worker's first job pays torch's warm-up (charlie's
  under its CPU limit: about 10 s, which sync waits for);
- accuracy at the budget: the last scored version within half the split's median sync time;
- best and final accuracy, and the accuracy per digit group (0-3, 4-6, 7-9) over time (every
  scored version's per-digit accuracy is in the .json).

Targets reported against (issue 13), met or not: async reaches the target in at most 0.5x sync's
median time on IID and 0.7x on the seed split, with its median best accuracy within 0.5 point of
sync's. The figure (`.png` next to the table) shows accuracy, and accuracy on digits 7-9, against
wall time: one colour per schedule, seed 1 bold, the other seeds thin, lab runs dashed.

`--lab` runs the same three schedules once more over the SSH lab (fedlab: one sshd and Linux
user per device on loopback, under `flock /tmp/fedmnist-lab.lock`), on --lab-split for
--lab-seeds (over the lab, charlie's slowdown is sleeping: a lab user may not make cgroups).
The machine is shared: wall times move with its other load (the 1-minute load average before and
after each run is in the .json), which is why each figure is a median over seeds.

    .venv/bin/python benchmarks/async_fleet.py [--seeds 3] [--splits iid,seed]
        [--schedules sync,semi-sync,async] [--points 20] [--data-dir D]
        [--home /tmp/fedmnist-async-fleet] [--out benchmarks/results/async_fleet.md]
        [--reuse]         # keep the runs (same settings) already in the .json
        [--lab] [--lab-split seed] [--lab-seeds 1]
        [--scale 0.1]     # every schedule's rounds x0.1: a quick check that it all runs
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcore import timeline  # noqa: E402
from fedcore.checkpoint import load_weights  # noqa: E402
from fedcore.evaluation import evaluate  # noqa: E402
from fedcore.mnist import load_shard  # noqa: E402
from fedcore.model import build_model  # noqa: E402
from fedcore.shards import ShardSpec  # noqa: E402

FEDMNIST = str(ROOT / ".venv" / "bin" / "fedmnist")
LAB_LOCK = "/tmp/fedmnist-lab.lock"
TRAINERS = ("alice", "bob", "charlie")
SLOW, SLOWDOWN = "charlie", 5.0
PACE: list[float | None] = [0.03]  # --pace: every trainer's step_seconds (None: --pace 0)
GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
SEED_TARGET = 0.959  # the seed's final accuracy on its split
BUDGET_SHARE = 0.5  # accuracy at this share of the split's median sync time
RUN_TIMEOUT = 1800.0
SPLITS: dict[str, dict[str, ShardSpec]] = {
    "iid": {n: ShardSpec.iid(i, len(TRAINERS), seed=1) for i, n in enumerate(TRAINERS)},
    "seed": {
        "alice": ShardSpec.by_labels(range(0, 4)),
        "bob": ShardSpec.by_labels(range(4, 7)),
        "charlie": ShardSpec.by_labels(range(7, 10)),
    },
}
STALENESS = {"name": "polynomial", "a": 0.5}
SCHEDULES: dict[str, dict[str, Any]] = {
    "sync": {"rounds": 40, "schedule": {"mode": "sync"}},
    "semi-sync": {
        "rounds": 60,
        "schedule": {
            "mode": "semi-sync",
            "min_updates": 2,
            "grace": 0.1,
            "staleness": STALENESS,
            "max_staleness": 20,
        },
    },
    "async": {
        "rounds": 60,
        "schedule": {
            "mode": "async",
            "buffer_size": 2,
            "staleness": STALENESS,
            "max_staleness": 20,
        },
    },
}
# Tried on the seed split, where charlie's rare, stale updates are all digits 7-9 get: stale
# updates at full weight (constant staleness); every step combining each device's latest update
# (`memory: true`, MIFA), so charlie's digits count in every step; a buffer of 3 (a server step per
# 3 arrivals, so fewer steps of alice's and bob's digits alone between two of charlie's updates).
VARIANTS: dict[str, dict[str, Any]] = {
    "async-const": {
        "rounds": 60,
        "schedule": {
            "mode": "async",
            "buffer_size": 2,
            "staleness": {"name": "constant"},
            "max_staleness": 20,
        },
    },
    "async-memory": {
        "rounds": 60,
        "schedule": {
            "mode": "async",
            "buffer_size": 2,
            "staleness": STALENESS,
            "max_staleness": 20,
            "memory": True,
        },
    },
    "async-mifa": {
        "rounds": 90,
        "schedule": {
            "mode": "async",
            "buffer_size": 2,
            "staleness": {"name": "constant"},
            "max_staleness": 20,
            "memory": True,
        },
    },
    "async-b3-const": {
        "rounds": 40,
        "schedule": {
            "mode": "async",
            "buffer_size": 3,
            "staleness": {"name": "constant"},
            "max_staleness": 20,
        },
    },
}
MAIN = tuple(SCHEDULES)
SCHEDULES.update(VARIANTS)
COLOURS = {
    "sync": "black",
    "semi-sync": "tab:orange",
    "async": "tab:blue",
    "async-const": "tab:olive",
    "async-b3-const": "tab:purple",
    "async-memory": "tab:green",
    "async-mifa": "tab:olive",
}


# -- one training --------------------------------------------------------------------------------


def worker_entry(name: str, shard: ShardSpec) -> dict[str, Any]:
    """A local trainer of the inventory: its shard, one torch thread, charlie slowed down."""
    entry: dict[str, Any] = {"name": name, "threads": 1}
    if shard.labels is not None:
        entry["labels"] = list(shard.labels)
    else:
        assert shard.iid_index is not None and shard.iid_count is not None
        entry["iid"] = {"index": shard.iid_index, "count": shard.iid_count, "seed": shard.iid_seed}
    if name == SLOW:
        entry["slowdown"] = SLOWDOWN
    if PACE[0]:
        entry["step_seconds"] = PACE[0]
    return entry


def settings(schedule: str, scale: float) -> dict[str, Any]:
    """A schedule's rounds (times `scale`, for a quick check) and `schedule:` section."""
    s = SCHEDULES[schedule]
    out = {"rounds": max(1, round(s["rounds"] * scale)), "schedule": s["schedule"]}
    if PACE[0]:
        out["pace"] = PACE[0]
    return out


def experiment(
    split: str,
    schedule: str,
    seed: int,
    workers: list[dict[str, Any]],
    data_dir: str | None,
    scale: float = 1.0,
) -> dict[str, Any]:
    """The experiment config of one run (the seed's training, the schedule's settings)."""
    cfg: dict[str, Any] = {
        "name": f"async-fleet-{split}-{schedule}-s{seed}",
        "seed": seed,
        "rounds": settings(schedule, scale)["rounds"],
        "train": {"steps": 10, "batch_size": 32, "lr": 0.1, "lr_decay": 0.98, "lr_min": 0.001},
        "strategy": {"name": "mean"},
        "schedule": SCHEDULES[schedule]["schedule"],
        "evaluation": {"workers": False},  # no evaluator: scored offline afterwards
        "tracking": {"enabled": False},
        "workers": workers,
    }
    if data_dir is not None:
        cfg["data_dir"] = data_dir
    return cfg


def train(cfg: dict[str, Any], home: Path) -> tuple[Path, dict[str, Any], str, float]:
    """Run `cfg` through `fedmnist run` in FEDMNIST_HOME `home`.

    Returns:
        (run folder, the flow's summary, charlie's pacing mode, wall seconds of the command).
    """
    folder = home / "configs"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)
    summary_path = home / "summaries" / f"{cfg['name']}.json"
    log_path = home / "logs" / f"{cfg['name']}.log"
    for p in (summary_path, log_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    summary_path.unlink(missing_ok=True)
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_HOME=str(home / "prefect"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [FEDMNIST, "run", str(path), "--summary-json", str(summary_path)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started
            proc.wait()
            rc = -1
    took = time.perf_counter() - started
    if rc != 0 or not summary_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cfg['name']}: fedmnist run exited {rc}; log {log_path}:\n{tail}")
    summary = json.loads(summary_path.read_text())
    return Path(summary["checkpoint_dir"]), summary, pacing_mode(log_path), took


def pacing_mode(log_path: Path) -> str:
    """How charlie was slowed down, from its start-up line (a CPU limit's mode, else sleep)."""
    for line in log_path.read_text(errors="replace").splitlines():
        if f"[{SLOW}] {SLOW} runs under a CPU limit" in line:
            return line.rpartition("(")[2].split()[0]  # "(cfs_quota in /sys/...)"
    return "sleep"


# -- scoring -------------------------------------------------------------------------------------


def score(
    run_dir: Path, points: int, test: tuple[torch.Tensor, torch.Tensor]
) -> tuple[int, list[dict[str, Any]]]:
    """Score every k-th version of a run (and its last) on the test set.

    Returns:
        (k, one point per scored version: version, seconds, updates so far, accuracy, per-digit
        accuracy).
    """
    records = timeline.read(run_dir)
    if not records:
        raise RuntimeError(f"{run_dir}: no timeline.jsonl records")
    k = max(1, math.ceil(len(records) / points))
    images, labels = test
    torch.set_num_threads(2)  # no training runs meanwhile: both cores score
    curve = []
    updates = 0
    for i, rec in enumerate(records):
        updates += len(rec["updates"])
        if (i + 1) % k and i != len(records) - 1:
            continue
        weights, _ = load_weights(run_dir / rec["model_file"])
        with torch.no_grad():
            res = evaluate(build_model(weights), images, labels, GROUPS)
        curve.append(
            {
                "version": rec["round"],
                "seconds": rec["seconds"],
                "updates": updates,
                "accuracy": res.accuracy,
                "per_digit": [round(a, 4) for a in res.per_digit_accuracy],
            }
        )
    torch.set_num_threads(1)
    return k, curve


# -- the runs ------------------------------------------------------------------------------------


def run_key(r: dict[str, Any]) -> tuple[str, str, str, int]:
    return (r["transport"], r["split"], r["schedule"], r["seed"])


def one_run(
    transport: str,
    split: str,
    schedule: str,
    seed: int,
    workers: list[dict[str, Any]],
    data_dir: str | None,
    home: Path,
    points: int,
    test: tuple[torch.Tensor, torch.Tensor],
    scale: float = 1.0,
) -> dict[str, Any]:
    """Train, then score: the run's record (settings, curve, per-device fleet statistics)."""
    cfg = experiment(split, schedule, seed, workers, data_dir, scale)
    if transport == "lab":
        cfg["name"] = cfg["name"].replace("async-fleet-", "async-fleet-lab-")
    load_before = os.getloadavg()[0]
    run_dir, summary, pacing, took = train(cfg, home)
    load_after = os.getloadavg()[0]  # the host's 1-minute load: other users move wall times
    records = timeline.read(run_dir)
    k, curve = score(run_dir, points, test)
    return {
        "transport": transport,
        "split": split,
        "schedule": schedule,
        "seed": seed,
        "settings": settings(schedule, scale),
        "run_dir": str(run_dir),
        "pacing": pacing,
        "command_seconds": round(took, 1),
        "load": [round(load_before, 2), round(load_after, 2)],
        "versions": len(records),
        "updates": sum(len(r["updates"]) for r in records),
        "seconds": records[-1]["seconds"],
        "first_seconds": records[0]["seconds"],
        "every": k,
        "devices": summary.get("devices"),
        "curve": curve,
    }


@contextmanager
def lab_fleet(split: str, data_dir: Path) -> Iterator[list[dict[str, Any]]]:
    """The SSH lab up (under the lab lock) for `split`'s trainers; yields their inventory with
    one thread each and charlie slowed down; the lab is torn down on leaving."""
    from fedlab import lab_down, lab_up

    done = subprocess.run(
        [str(ROOT / "scripts" / "install-sshd.sh")], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"sshd cannot be installed: {done.stderr.strip()[-300:]}")
    with open(LAB_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as `flock /tmp/fedmnist-lab.lock`: one lab at a time
        # in the temp folder, beside the shared device venv (fedlab.ensure_lab_python), which
        # is built once for every lab; 755: the lab users must enter it
        lab_dir = Path(tempfile.mkdtemp(prefix="fedmnist-async-fleet-lab-"))
        lab_dir.chmod(0o755)
        try:
            info = lab_up(lab_dir, SPLITS[split], data_dir)
            workers = yaml.safe_load(info.inventory.read_text())["workers"]
            for w in workers:
                w["threads"] = 1
                if w["name"] == SLOW:
                    w["slowdown"] = SLOWDOWN
                if PACE[0] and w.get("role", "trainer") == "trainer":
                    w["step_seconds"] = PACE[0]
            yield workers
        finally:
            lab_down(lab_dir)
            shutil.rmtree(lab_dir, ignore_errors=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- the report ----------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    """The median, counting None (never reached) as infinitely late; None when that is it."""
    xs = [math.inf if v is None else v for v in values]
    if not xs:
        return None
    m = statistics.median(xs)
    return None if math.isinf(m) else m


def time_to(curve: list[dict[str, Any]], target: float) -> float | None:
    for p in curve:
        if p["accuracy"] >= target - 1e-9:
            return float(p["seconds"])
    return None


def at_time(curve: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    """The last scored point at or before `budget` seconds."""
    within = [p for p in curve if p["seconds"] <= budget]
    return within[-1] if within else None


def group_acc(point: dict[str, Any], labels: list[int]) -> float:
    """Accuracy on a digit group (the mean of its digits' accuracies, digits about equally
    frequent in the test set)."""
    return sum(point["per_digit"][d] for d in labels) / len(labels)


def analyse(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per split: targets, budget and per-run figures; per schedule: medians over seeds."""
    out: dict[str, Any] = {}
    pairs = {(r["transport"], r["split"]) for r in runs}
    for transport, split in sorted(pairs, key=lambda p: (p[0] != "local", p[1])):
        mine = [r for r in runs if (r["transport"], r["split"]) == (transport, split)]
        syncs = {r["seed"]: r for r in mine if r["schedule"] == "sync"}
        if not syncs:
            continue
        sync_final = {s: r["curve"][-1]["accuracy"] for s, r in syncs.items()}
        sync_time = statistics.median(r["seconds"] for r in syncs.values())
        budget = BUDGET_SHARE * sync_time
        per_run = []
        for r in mine:
            if split == "iid":
                target = sync_final.get(r["seed"], statistics.median(sync_final.values()))
            else:
                target = SEED_TARGET
            at = at_time(r["curve"], budget)
            best = max(p["accuracy"] for p in r["curve"])
            per_run.append(
                {
                    "schedule": r["schedule"],
                    "seed": r["seed"],
                    "target": target,
                    "time_to_target": time_to(r["curve"], target),
                    "first_seconds": first_seconds(r),
                    "at_budget": at["accuracy"] if at else None,
                    "at_budget_groups": [group_acc(at, g) for g in GROUPS] if at else None,
                    "ended_before_budget": r["seconds"] <= budget,
                    "best": best,
                    "final": r["curve"][-1]["accuracy"],
                    "final_groups": [group_acc(r["curve"][-1], g) for g in GROUPS],
                    "seconds": r["seconds"],
                    "versions": r["versions"],
                    "updates": r["updates"],
                    "every": r["every"],
                    "pacing": r["pacing"],
                    "devices": r["devices"],
                }
            )
        schedules: dict[str, Any] = {}
        for sched in SCHEDULES:
            rows = [p for p in per_run if p["schedule"] == sched]
            if not rows:
                continue
            charlie = [d for p in rows for d in (p["devices"] or []) if d.get("device") == SLOW]
            schedules[sched] = {
                "seeds": sorted(p["seed"] for p in rows),
                "seconds": median([p["seconds"] for p in rows]),
                "updates": median([p["updates"] for p in rows]),
                "time_to_target": median([p["time_to_target"] for p in rows]),
                "reached": sum(p["time_to_target"] is not None for p in rows),
                # a run that never reached the target took longer than its whole training:
                # that time is a lower bound of its time to target (sync's denominator)
                "time_to_target_or_end": median(
                    [p["time_to_target"] or p["seconds"] for p in rows]
                ),
                # the same, less the first version's time: every worker's first job pays torch's
                # warm-up, charlie's under its CPU limit (about 10 s), which sync waits for
                "after_first": median(
                    [
                        None
                        if p["time_to_target"] is None
                        else p["time_to_target"] - p["first_seconds"]
                        for p in rows
                    ]
                ),
                "after_first_or_end": median(
                    [(p["time_to_target"] or p["seconds"]) - p["first_seconds"] for p in rows]
                ),
                "at_budget": median([p["at_budget"] for p in rows]),
                "at_budget_groups": [
                    median(
                        [p["at_budget_groups"][i] if p["at_budget_groups"] else None for p in rows]
                    )
                    for i in range(len(GROUPS))
                ],
                "best": median([p["best"] for p in rows]),
                "final": median([p["final"] for p in rows]),
                "final_groups": [
                    median([p["final_groups"][i] for p in rows]) for i in range(len(GROUPS))
                ],
                "charlie_updates": median([d["updates"] for d in charlie]) if charlie else None,
                "charlie_staleness": (
                    median([d["staleness mean"] for d in charlie]) if charlie else None
                ),
            }
        out[f"{transport}/{split}"] = {
            "transport": transport,
            "split": split,
            "sync_seconds": sync_time,
            "budget": budget,
            "target": (
                "the same seed's sync final accuracy" if split == "iid" else f"{SEED_TARGET:.1%}"
            ),
            "runs": per_run,
            "schedules": schedules,
            "checks": checks(split, schedules),
        }
    return out


def speedup(
    s: dict[str, Any], sync: dict[str, Any], key: str = "time_to_target"
) -> tuple[float | None, bool]:
    """(median time to target / sync's, whether that is an upper bound): where sync's median
    run never reached the target, its training time stands in (it would have needed longer).
    `key` "after_first": both times less their first version's."""
    if s[key] is None:
        return None, False
    if sync[key] is not None:
        return s[key] / sync[key], False
    return s[key] / sync[f"{key}_or_end"], True


def first_seconds(r: dict[str, Any]) -> float:
    """When a run's first version was made (older records: read from its timeline)."""
    if "first_seconds" in r:
        return float(r["first_seconds"])
    return float(timeline.read(Path(r["run_dir"]))[0]["seconds"])


def checks(split: str, schedules: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for async (and, for comparison, semi-sync) against sync."""
    sync = schedules.get("sync")
    out: list[dict[str, Any]] = []
    if sync is None:
        return out
    limit = 0.5 if split == "iid" else 0.7
    for sched in sorted([s for s in SCHEDULES if s != "sync"], key=lambda s: s != "async"):
        s = schedules.get(sched)
        if s is None:
            continue
        ratio, bound = speedup(s, sync)
        steady, _ = speedup(s, sync, "after_first")
        gap = 100 * (s["best"] - sync["best"])
        out.append(
            {
                "schedule": sched,
                "what": f"time to target <= {limit:g}x sync",
                "value": ratio,
                "upper_bound": bound,
                "after_first": steady,
                "met": ratio is not None and ratio <= limit,
                "target_for": "async" if sched == "async" else "(comparison only)",
            }
        )
        out.append(
            {
                "schedule": sched,
                "what": "best accuracy within 0.5 point of sync",
                "value": gap,
                "met": gap >= -0.5,
                "target_for": "async" if sched == "async" else "(comparison only)",
            }
        )
    return out


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def secs(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.1f}"


def groups_text(gs: Sequence[float | None] | None) -> str:
    if not gs or any(g is None for g in gs):
        return "-"
    return " / ".join(f"{100 * g:.1f}" for g in gs if g is not None)


def report(analysis: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for a in analysis.values():
        where = "over the SSH lab" if a["transport"] == "lab" else "local worker processes"
        split = (
            "IID thirds" if a["split"] == "iid" else "seed split (alice 0-3, bob 4-6, charlie 7-9)"
        )
        sync = a["schedules"].get("sync", {})
        lines += [
            f"### {split}, {where}",
            "",
            f"Target: {a['target']}; budget: {a['budget']:.1f} s (half the median sync time, "
            f"{a['sync_seconds']:.1f} s). Medians over seeds.",
            "",
            "| schedule | seeds | train s | updates | s to target (reached) | x sync | "
            "acc @ budget | best | best - sync | final | digits 0-3 / 4-6 / 7-9 @ budget | "
            "final | charlie's updates (mean staleness) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for sched, s in a["schedules"].items():
            ratio = "-"
            value, bound = speedup(s, sync) if sync else (None, False)
            if value is not None:
                ratio = f"{'< ' if bound else ''}{value:.2f}"
            gap = f"{100 * (s['best'] - sync['best']):+.2f}" if sync else "-"
            stale = "-" if s["charlie_staleness"] is None else f"{s['charlie_staleness']:.1f}"
            charlie = "-" if s["charlie_updates"] is None else f"{s['charlie_updates']:g} ({stale})"
            lines.append(
                f"| {sched} | {','.join(map(str, s['seeds']))} | {s['seconds']:.1f} | "
                f"{s['updates']:g} | {secs(s['time_to_target'])} ({s['reached']}/"
                f"{len(s['seeds'])}) | {ratio} | {pct(s['at_budget'])} | {pct(s['best'])} | "
                f"{gap} | {pct(s['final'])} | {groups_text(s['at_budget_groups'])} | "
                f"{groups_text(s['final_groups'])} | {charlie} |"
            )
        lines.append("")
        for c in a["checks"]:
            shown = (
                "-"
                if c["value"] is None
                else (f"{c['value']:.2f}x" if "time" in c["what"] else f"{c['value']:+.2f} point")
            )
            if c.get("after_first") is not None:
                shown += f" ({c['after_first']:.2f}x counted from each run's first version)"
            if c.get("upper_bound"):
                shown = f"< {shown} (sync never reached the target: its whole time used)"
            verdict = "met" if c["met"] else "NOT met"
            lines.append(
                f"- {c['schedule']}: {c['what']}: {shown}: **{verdict}** "
                f"{'' if c['target_for'] == 'async' else c['target_for']}".rstrip()
            )
        lines += ["", "<details><summary>per run</summary>", ""]
        lines += [
            "| schedule | seed | target | s to target | acc @ budget | best | final | train s | "
            "first version at s | versions (scored every) | updates | charlie paced by |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in sorted(a["runs"], key=lambda p: (list(SCHEDULES).index(p["schedule"]), p["seed"])):
            lines.append(
                f"| {p['schedule']} | {p['seed']} | {pct(p['target'])} | "
                f"{secs(p['time_to_target'])} | {pct(p['at_budget'])}"
                f"{' (ended)' if p['ended_before_budget'] else ''} | {pct(p['best'])} | "
                f"{pct(p['final'])} | {p['seconds']:.1f} | {p['first_seconds']:.1f} | "
                f"{p['versions']} ({p['every']}) | "
                f"{p['updates']} | {p['pacing']} |"
            )
        lines += ["", "</details>", ""]
        lines += device_lines(a["runs"])
    return lines


def load_range(runs: list[dict[str, Any]]) -> str:
    """The lowest and highest 1-minute load average recorded around the runs, e.g. "3-11"."""
    loads = [x for r in runs for x in r.get("load", [])]
    return f"{min(loads):.0f}-{max(loads):.0f}" if loads else "not recorded"


def device_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Per run and device, under a non-sync schedule: what the Prefect `devices` table shows
    (jobs, updates contributed, their staleness, idle seconds)."""
    rows = [
        (p, d)
        for p in sorted(runs, key=lambda p: (list(SCHEDULES).index(p["schedule"]), p["seed"]))
        for d in (p["devices"] or [])
    ]
    if not rows:
        return []
    lines = [
        "<details><summary>per device</summary>",
        "",
        "| schedule | seed | device | jobs | updates | staleness mean | staleness max | "
        "dropped (stale) | failed | idle s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, d in rows:
        lines.append(
            f"| {p['schedule']} | {p['seed']} | {d['device']} | {d['jobs']} | {d['updates']} | "
            f"{d['staleness mean']:.2f} | {d['staleness max']} | {d['dropped (stale)']} | "
            f"{d['failed']} | {d['idle s']:.1f} |"
        )
    return [*lines, "", "</details>", ""]


def draw(runs: list[dict[str, Any]], analysis: dict[str, Any], path: Path) -> None:
    """Accuracy, and accuracy on digits 7-9, against training seconds, one column per split."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = [s for s in SPLITS if any(r["split"] == s for r in runs)]
    fig = Figure(figsize=(6 * len(splits), 8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(splits), squeeze=False)
    for col, split in enumerate(splits):
        top, bottom = axes[0][col], axes[1][col]
        a = analysis.get(f"local/{split}")
        order = list(SCHEDULES)
        ranked = sorted(runs, key=lambda r: (r["transport"], order.index(r["schedule"]), r["seed"]))
        for r in ranked:
            if r["split"] != split:
                continue
            xs = [p["seconds"] for p in r["curve"]]
            bold = r["seed"] == 1 and r["transport"] == "local"
            style: dict[str, Any] = {
                "color": COLOURS[r["schedule"]],
                "linewidth": 2.2 if bold else 0.9,
                "alpha": 1.0 if bold or r["transport"] == "lab" else 0.4,
                "linestyle": "--" if r["transport"] == "lab" else "-",
            }
            label = None
            if bold:
                label = r["schedule"]
            elif r["transport"] == "lab":
                label = f"{r['schedule']} (lab, seed {r['seed']})"
            top.plot(xs, [100 * p["accuracy"] for p in r["curve"]], label=label, **style)
            ys = [100 * group_acc(p, GROUPS[2]) for p in r["curve"]]
            bottom.plot(xs, ys, **style)
        for ax in (top, bottom):
            if a is not None:
                ax.axvline(a["budget"], color="grey", linestyle=":", linewidth=1)
            ax.grid(alpha=0.3)
            ax.set_xlabel("training seconds (timeline; start-up not counted)")
        if split == "seed":
            top.axhline(100 * SEED_TARGET, color="red", linestyle="--", linewidth=1)
        elif a is not None:
            targets = [p["target"] for p in a["runs"] if p["schedule"] == "sync"]
            top.axhline(100 * statistics.median(targets), color="red", linestyle="--", lw=1)
        name = "IID thirds" if split == "iid" else "seed split (only charlie holds 7-9)"
        top.set_title(f"{name}: test accuracy")
        bottom.set_title(f"{'IID' if split == 'iid' else 'seed split'}: accuracy on digits 7-9")
        top.set_ylim(85, 100)
        bottom.set_ylim(50, 100)
        top.set_ylabel("accuracy (%)")
        bottom.set_ylabel("accuracy on 7, 8, 9 (%)")
        top.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        "charlie 5x slower. Red: target; dotted: budget (half of sync's median time).\n"
        "Seed 1 bold, other seeds thin, lab runs dashed; every k-th version scored.",
        fontsize=10,
    )
    fig.savefig(path)


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N per run (default: 3)")
    parser.add_argument(
        "--splits", default="iid,seed", help="comma-separated, of iid, seed (default: both)"
    )
    parser.add_argument(
        "--schedules",
        default=",".join(MAIN),
        help="comma-separated, of these and the tuning variants async-memory, async-const, "
        "async-b3-const "
        "(default: sync,semi-sync,async)",
    )
    parser.add_argument(
        "--points",
        type=int,
        default=20,
        help="scored versions per run, about: every k-th, k = versions/points (default: 20)",
    )
    parser.add_argument(
        "--data-dir",
        default=str(ROOT / ".fedmnist" / "data" / "mnist"),
        help="MNIST directory (default: .fedmnist/data/mnist)",
    )
    parser.add_argument(
        "--home",
        default="/tmp/fedmnist-async-fleet",
        help="the runs' FEDMNIST_HOME (default: /tmp/fedmnist-async-fleet)",
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / "benchmarks/results/async_fleet.md"),
        help="the table (default: benchmarks/results/async_fleet.md, its .json and .png)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the runs (same settings) the .json already has (default: run all again)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every schedule's rounds, for a quick check (default: 1)",
    )
    parser.add_argument("--lab", action="store_true", help="also run over the SSH lab")
    parser.add_argument("--lab-split", default="seed", help="the lab runs' split (default: seed)")
    parser.add_argument(
        "--lab-seeds", type=int, default=1, help="seeds 1..N over the lab (default: 1)"
    )
    parser.add_argument(
        "--pace",
        type=float,
        default=0.03,
        help="every trainer's step_seconds, charlie's times 5: a steady fleet whatever else the "
        "host runs; 0: charlie's slowdown alone (a CPU limit, which a loaded host blurs) "
        "(default: 0.03)",
    )
    args = parser.parse_args(argv)
    PACE[0] = args.pace or None
    torch.set_num_threads(1)
    home = Path(args.home).absolute()
    (home / "data").mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    json_path = out.with_suffix(".json")
    kept: list[dict[str, Any]] = []
    if args.reuse and json_path.is_file():
        kept = [
            r
            for r in json.loads(json_path.read_text())["runs"]
            if r["schedule"] in SCHEDULES and r["settings"] == settings(r["schedule"], args.scale)
        ]
    done = {run_key(r): r for r in kept}
    test = load_shard(args.data_dir, ShardSpec(split="test"))
    splits = [s for s in args.splits.split(",") if s]
    schedules = [s for s in args.schedules.split(",") if s]
    for name in [*splits, args.lab_split]:
        if name not in SPLITS:
            parser.error(f"unknown split {name!r}: choose from {', '.join(SPLITS)}")
    for name in schedules:
        if name not in SCHEDULES:
            parser.error(f"unknown schedule {name!r}: choose from {', '.join(SCHEDULES)}")

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        runs = sorted(done.values(), key=run_key)
        analysis = analyse(runs)
        json_path.write_text(
            json.dumps({"schedules": SCHEDULES, "analysis": analysis, "runs": runs}, indent=1)
        )
        lines = report(analysis, runs)
        out.write_text(
            "# Schedules with a slow device: time to a target accuracy\n\n"
            "Three trainers, charlie 5x slower; the seed's training (10 batches of 32, lr 0.1 "
            "x0.98 per unit of work) and `mean`; sync 40 rounds, semi-sync 60 rounds (closes "
            "0.1 s after 2 updates), async FedBuff 60 versions (buffer 2); staleness "
            "(1 + tau)^-0.5. Accuracy (%) on the 10,000 test images, of every k-th saved version "
            "scored offline; seconds from the run's timeline (start-up not counted). Tuning "
            "variants: `async-memory` (the same FedBuff with `memory: true`, MIFA), "
            "`async-const` (constant staleness). A not-reached run counts as infinitely late in "
            "a median. The host (2 cores) was shared with other work: its 1-minute load "
            f"average was {load_range(runs)} during these runs (before and after each), which "
            f"moves every wall time. `benchmarks/async_fleet.py`; figure: "
            f"`{out.with_suffix('.png').name}`.\n\n" + "\n".join(lines)
        )
        if runs:
            draw(runs, analysis, out.with_suffix(".png"))
        print("\n".join(lines), flush=True)

    def go(transport: str, split: str, seed: int, workers: list[dict[str, Any]]) -> None:
        for sched in schedules:
            if (transport, split, sched, seed) in done:
                continue
            print(f"{transport} {split} {sched} seed {seed} ...", flush=True)
            data_dir = None if transport == "lab" else args.data_dir
            r = one_run(
                transport,
                split,
                sched,
                seed,
                workers,
                data_dir,
                home,
                args.points,
                test,
                args.scale,
            )
            done[run_key(r)] = r
            best = max(p["accuracy"] for p in r["curve"])
            print(
                f"  {r['seconds']:.1f} s, {r['versions']} versions, {r['updates']} updates, "
                f"best {100 * best:.2f}%, final {100 * r['curve'][-1]['accuracy']:.2f}% "
                f"(charlie: {r['pacing']})",
                flush=True,
            )
            save()

    for seed in range(1, args.seeds + 1):
        for split in splits:
            go("local", split, seed, [worker_entry(n, s) for n, s in SPLITS[split].items()])
    if args.lab:
        with lab_fleet(args.lab_split, Path(args.data_dir)) as workers:
            for seed in range(1, args.lab_seeds + 1):
                go("lab", args.lab_split, seed, workers)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
