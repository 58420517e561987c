"""Where the seed run's time goes: the product's phases next to the plain loop's, with ratios.

Runs `fedmnist run configs/seed.yaml` (Prefect's temporary server, 4 local worker processes, the
MLflow SQLite store) and the plain in-process loop of benchmarks/seed_overhead.py alternately,
`--runs` times each after one warm-up run of each (not counted), and reports medians. Each version
keeps one FEDMNIST_HOME and PREFECT_HOME for the sitting, as a user's machine does, so the
databases are created and migrated in the warm-up; `--cold` gives every run fresh ones (a first
run ever: about 12 s more of Prefect's and MLflow's migrations). With
`--before DIR` (a copy of an earlier checkout, e.g. `git archive HEAD | tar -x -C DIR`) that
version's product runs in the same rotation, so a change is measured against what it changed.

The product's phases come from what it writes anyway, nothing is added to the run: the log's
timestamps (temporary server up, each worker's start task done, each round's training tasks,
its aggregation and evaluation tasks, the round's line, the final line), the workers' own
training seconds (their "round N: ..., 0.48s" lines) and, where the version writes them, the
phases on each timeline.jsonl line (the seconds writing each round's state, off the critical
path since issue 14). Definitions:

- start-up: process start to round 1 (Prefect: to the flow run's first line; workers: their
  start tasks; MLflow: the store open and migrated, until round 1 starts);
- per round: train (round line to the last training task done), of which the slowest worker's
  own compute (the rest is submission, wire, decoding and checking), aggregate, evaluate (rounds
  with an evaluation), record (the rest until the round's line: writing and queueing the
  record when done in the flow's thread);
- round loop: round 1's start to the last model recorded (the final accuracy line);
- shutdown: the final line to the process's exit (workers stopped, MLflow run ended, Prefect
  flow run finished, temporary server stopped).

    nice -n 0 .venv/bin/python benchmarks/seed_phases.py [--runs 3] [--rounds N] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcore import timeline  # noqa: E402
from fedcore.config import default_data_dir  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \| \w+\s*\| (.*)$")
TASK_DONE = re.compile(r"Task run '([\w-]+)' - Finished in state Completed")
WORKER_ROUND = re.compile(r"\[(\w+)\] round (\d+): \d+ steps, loss [0-9.]+, ([0-9.]+)s")


def stamped(output: str, day: datetime) -> list[tuple[float, str]]:
    """(epoch seconds, message) of every timestamped log line (the log shows local time)."""
    out = []
    for line in output.splitlines():
        m = STAMP.match(line)
        if m:
            h, mi, s, ms, text = m.groups()
            t = day.replace(hour=int(h), minute=int(mi), second=int(s), microsecond=int(ms) * 1000)
            out.append((t.timestamp(), text))
    return out


def product_phases(output: str, started: float, ended: float, run_dir: Path) -> dict[str, Any]:
    """The phases of one product run from its log (see the module's docstring)."""
    lines = stamped(output, datetime.fromtimestamp(started))
    first: dict[str, float] = {}
    tasks: dict[str, float] = {}
    compute: dict[int, float] = {}
    for t, text in lines:
        for key, needle in (
            ("flow", "Beginning flow run"),
            ("round1", "Training round 1/"),
            ("final", "Final federated model"),
        ):
            if needle in text and key not in first:
                first[key] = t
        m = TASK_DONE.search(text)
        if m:
            tasks[m.group(1)] = t
        m = WORKER_ROUND.search(text)
        if m:
            rnd = int(m.group(2))
            compute[rnd] = max(compute.get(rnd, 0.0), float(m.group(3)))
    round_start = {
        int(m.group(1)): t
        for t, text in lines
        if (m := re.search(r"Training round (\d+)/\d+$", text))
    }
    round_done = {
        int(m.group(1)): t for t, text in lines if (m := re.search(r"Round (\d+)/\d+ done", text))
    }
    written = {
        int(r["round"]): float(r.get("phases", {}).get("write", "nan"))
        for r in timeline.read(run_dir)
    }
    rounds = []
    for rnd, start in sorted(round_start.items()):
        tag = f"r{rnd:02d}"
        trained = max(t for name, t in tasks.items() if name.startswith("train-") and tag in name)
        aggregated = tasks[f"aggregate-{tag}"]
        evaluated = tasks.get(f"evaluate-{tag}")
        rounds.append(
            {
                "round": rnd,
                "train": trained - start,
                "compute": compute.get(rnd, 0.0),
                "aggregate": aggregated - trained,
                "evaluate": (evaluated - aggregated) if evaluated else None,
                "record": round_done[rnd] - (evaluated or aggregated),
                "write_off_path": written.get(rnd),
                "seconds": round_done[rnd] - start,
            }
        )
    starts = [t for name, t in tasks.items() if name.startswith("start-")]
    first.setdefault("final", max(round_done.values()))  # no evaluator: the last round's line
    return {
        "total": ended - started,
        "prefect": first["flow"] - started,
        "workers": max(starts) - first["flow"],
        "mlflow_ready": first["round1"] - max(starts),
        "startup": first["round1"] - started,
        "loop": first["final"] - first["round1"],
        "shutdown": ended - first["final"],
        "rounds": rounds,
    }


def run_product(
    root: Path,
    rounds: int | None,
    keep: Path | None,
    config: str = "configs/seed.yaml",
    homes: Path | None = None,
) -> dict[str, Any]:
    """One `fedmnist run CONFIG` of the checkout at `root`; its phases. Its FEDMNIST_HOME and
    PREFECT_HOME are fresh, or those under `homes` (kept from run to run, as a user's are)."""
    with tempfile.TemporaryDirectory(prefix="fedmnist-phases-") as tmp:
        base = Path(keep or tmp)
        base.mkdir(parents=True, exist_ok=True)
        at = homes or base
        at.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, FEDMNIST_HOME=str(at / "home"), PREFECT_HOME=str(at / "pf"))
        env.pop("PREFECT_API_URL", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        env["PYTHONPATH"] = str(root)
        cmd = [
            sys.executable,
            "-c",
            "import sys; from flows.cli import main; sys.exit(main())",
            "run",
            "-v",  # Prefect's task state lines, which `product_phases` reads
            config,
            "--set",
            f"data_dir={default_data_dir()}",
            "--summary-json",
            str(base / "summary.json"),
        ]
        if rounds:
            cmd += ["--rounds", str(rounds)]
        started = time.time()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        ended = time.time()
        output = proc.stdout + proc.stderr
        (base / "out.txt").write_text(output)
        if proc.returncode != 0:
            raise RuntimeError(f"fedmnist run failed in {root}:\n{output[-3000:]}")
        summary = json.loads((base / "summary.json").read_text())
        phases = product_phases(output, started, ended, Path(summary["checkpoint_dir"]))
        phases["final_accuracy"] = summary["final_accuracy"]
        return phases


def run_bare(rounds: int | None) -> dict[str, Any]:
    """One plain loop in a fresh process (imports counted, like the product's)."""
    code = (
        "import json, sys, time; t = time.perf_counter(); "
        "sys.path.insert(0, sys.argv[1]); "
        "from benchmarks.seed_overhead import bare_loop; p = {}; "
        "s, acc = bare_loop('configs/seed.yaml', int(sys.argv[2]) or None, p, "
        "{'data_dir': sys.argv[3]}); "
        "print(json.dumps({'total': time.perf_counter() - t, 'acc': acc, 'phases': p}))"
    )
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(rounds or 0), str(default_data_dir())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    ended = time.time()
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    p = got["phases"]
    evaluated = [e for e in p["evaluate"] if e > 1e-3]
    return {
        "total": ended - started,
        "startup": (ended - started) - sum(p["round"]),
        "loop": sum(p["round"]),
        "train": statistics.median(p["train"]),
        "aggregate": statistics.median(p["aggregate"]),
        "evaluate": statistics.median(evaluated) if evaluated else None,
        "round_plain": med([r for r, e in zip(p["round"], p["evaluate"], strict=True) if e < 1e-3]),
        "final_accuracy": got["acc"],
    }


def summarize(run: dict[str, Any]) -> dict[str, float | None]:
    """One product run's per-round medians."""
    rs = run["rounds"]
    plain = [r for r in rs if r["evaluate"] is None]
    evals = [r["evaluate"] for r in rs if r["evaluate"] is not None]
    writes = [r["write_off_path"] for r in rs if r["write_off_path"] == r["write_off_path"]]
    return {
        "train": statistics.median(r["train"] for r in rs),
        "compute": statistics.median(r["compute"] for r in rs),
        "wire": statistics.median(r["train"] - r["compute"] for r in rs),
        "aggregate": statistics.median(r["aggregate"] for r in rs),
        "evaluate": statistics.median(evals) if evals else None,
        "record": statistics.median(r["record"] for r in rs),
        "write_off_path": statistics.median(writes) if writes else None,
        "round_plain": statistics.median(r["seconds"] for r in plain) if plain else None,
    }


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs of each, alternating (3)")
    p.add_argument("--rounds", type=int, help="override the rounds (default: the config's)")
    p.add_argument("--before", type=Path, help="a copy of an earlier checkout to run alongside")
    p.add_argument("--keep", type=Path, help="keep each product run's homes and log here")
    p.add_argument("--out", type=Path, default=RESULTS / "seed_phases", help="results stem")
    p.add_argument("--cold", action="store_true", help="fresh homes for every product run")
    args = p.parse_args()
    variants = {"product": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], **{k: [] for k in variants}}
    sitting = Path(tempfile.mkdtemp(prefix="fedmnist-sitting-"))
    homes = {name: None if args.cold else sitting / name for name in variants}
    for name, root in variants.items():  # warm-up: imports cached, databases made
        run_product(root, args.rounds, None, homes=homes[name])
        print(f"{name} warm-up done", flush=True)
    run_bare(args.rounds)
    for i in range(args.runs):
        for name, root in variants.items():
            keep = args.keep / f"{name}-{i}" if args.keep else None
            runs[name].append(run_product(root, args.rounds, keep, homes=homes[name]))
            print(f"{name} {i}: {runs[name][-1]['total']:.1f}s", flush=True)
        runs["bare"].append(run_bare(args.rounds))
        print(f"bare {i}: {runs['bare'][-1]['total']:.1f}s", flush=True)
    bare = runs["bare"]
    table: dict[str, dict[str, float | None]] = {
        "bare": {
            "total": med([b["total"] for b in bare]),
            "startup": med([b["startup"] for b in bare]),
            "loop": med([b["loop"] for b in bare]),
            "train": med([b["train"] for b in bare]),
            "aggregate": med([b["aggregate"] for b in bare]),
            "evaluate": med([b["evaluate"] for b in bare]),
            "round_plain": med([b["round_plain"] for b in bare]),
        }
    }
    ratios: dict[str, dict[str, float]] = {}
    for name in variants:
        rs = runs[name]
        per = [summarize(r) for r in rs]
        row: dict[str, float | None] = {
            k: med([r[k] for r in rs])
            for k in ("total", "startup", "prefect", "workers", "mlflow_ready", "loop", "shutdown")
        }
        row |= {k: med([x[k] for x in per]) for k in per[0]}
        table[name] = row
        # ratios per pair of alternating runs, then their median
        ratios[name] = {
            key: statistics.median(r[key] / b[key] for r, b in zip(rs, bare, strict=False))
            for key in ("total", "loop")
        }
    result = {
        "config": "configs/seed.yaml",
        "rounds": args.rounds or 40,
        "runs": args.runs,
        "homes": "fresh per run" if args.cold else "one per version for the sitting, warmed",
        "medians": table,
        "ratios": ratios,
        "raw": runs,
        "load_average": os.getloadavg(),
    }
    shutil.rmtree(sitting, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    t, ratios = result["medians"], result["ratios"]
    names = [n for n in t if n != "bare"]

    def cell(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    rows = [
        ("whole run", "total"),
        ("start-up (to round 1)", "startup"),
        ("- Prefect (process start to flow run)", "prefect"),
        ("- workers started (start tasks)", "workers"),
        ("- MLflow open, after the workers", "mlflow_ready"),
        ("round loop (round 1 to last model recorded)", "loop"),
        ("per round: train (all trainers)", "train"),
        ("- of which the slowest worker's compute", "compute"),
        ("- submission, wire, decode, checks", "wire"),
        ("per round: aggregate", "aggregate"),
        ("per evaluated round: evaluate", "evaluate"),
        ("per round: record in the flow's thread", "record"),
        ("per round: state written (off the critical path)", "write_off_path"),
        ("round without evaluation", "round_plain"),
        ("shutdown (final line to exit)", "shutdown"),
    ]
    head = "| phase (median s) | plain loop | " + " | ".join(names) + " |"
    lines = [
        f"# Seed run by phase: {result['rounds']} rounds, median of {result['runs']} "
        "alternating runs",
        "",
        f"Each after a warm-up run; the product's homes: {result.get('homes', 'fresh per run')}.",
        "",
        head,
        "|---|---|" + "---|" * len(names),
    ]
    for label, key in rows:
        lines.append(
            f"| {label} | {cell(t['bare'].get(key))} | "
            + " | ".join(cell(t[n].get(key)) for n in names)
            + " |"
        )
    lines += ["", "Ratios to the plain loop (median over the alternating pairs):", ""]
    for n in names:
        lines.append(
            f"- {n}: whole run {ratios[n]['total']:.2f}x, round loop {ratios[n]['loop']:.2f}x"
        )
    lines += [
        "",
        f"Load average at the end: {', '.join(f'{x:.1f}' for x in result['load_average'])} "
        "(a shared 2-core machine: absolute seconds vary run to run, ratios less).",
        "",
        "The plain loop trains the three workers one after the other in one process; its "
        "start-up is its imports and shards. Reproduce: `.venv/bin/python "
        "benchmarks/seed_phases.py --runs 3 [--before DIR]`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
