"""Bytes per worker-round and final accuracy of each update compression scheme, through the product.

Each run is `fedmnist run CONFIG --set train.compression.name=<scheme> --set seed=<s> ...` as the
operator would type it (Prefect's temporary server, local worker processes, the wire, MLflow in
SQLite), with its own FEDMNIST_HOME in a temporary directory (MNIST linked from the checkout's
data directory, nothing else shared with the user's store). The recipes: configs/best.yaml
(SCAFFOLD with Nesterov server momentum 0.8 and label smoothing 0.1: the model and the control
variates travel, so 3.45 MB each way uncompressed) on seeds 1, 2, 3, and configs/seed.yaml (the
model only, 1.72 MB each way) on seed 1. Each run keeps its config's training; the federated
model is scored after every round, the workers' own models never (`evaluation.rounds` 1..40,
`evaluation.workers: false`, as benchmarks/strategy_accuracy.py does: evaluating does not change
the training), and no model is registered.

Two tables. Per (recipe, scheme): the final (round 40) federated test accuracy of each seed,
their median, the median's difference from `none` in points, and the bytes per worker-round each
way, from the run's own MLflow record: `wire_bytes_down/<worker>` (the train request as sent)
and `wire_bytes/<worker>` minus it (the reply), averaged over the run's worker-rounds. Then the
same runs as rows of the README's strategy table (benchmarks/strategy_accuracy.py's columns:
accuracy at rounds 1/11/21/31/40, mean / min over seeds, the first round reaching 95.9% and
98.0%, MB per worker-round both ways and its ratio to the uncompressed seed recipe).

    .venv/bin/python benchmarks/compression_accuracy.py [--schemes none,fp16,int8,topk,topk-0.1]
        [--recipes best,seed] [--best-seeds 1,2,3] [--seed-seeds 1] [--reuse]
        [--data-dir D] [--out benchmarks/results/compression_accuracy.md]

Runs happen one after another (the development machine has 2 cores). Raw results go to the
`--out` file's `.json` twin, rewritten after every run; `--reuse` keeps the runs already there
and runs only the missing (recipe, scheme, seed) triples.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.strategy_accuracy import THRESHOLDS, first_round, rounds_cell  # noqa: E402

RECIPES = {"best": "configs/best.yaml", "seed": "configs/seed.yaml"}
# scheme label -> train.compression overrides
SCHEMES: dict[str, dict[str, Any]] = {
    "none": {"name": "none"},
    "fp16": {"name": "fp16"},
    "int8": {"name": "int8"},
    "topk": {"name": "topk"},  # fraction 0.01, the default
    "topk-0.1": {"name": "topk", "fraction": 0.1},
}


def make_home(data_dir: Path) -> Path:
    """A temporary FEDMNIST_HOME whose data/mnist is a link to `data_dir`."""
    home = Path(tempfile.mkdtemp(prefix="fedmnist-compression-"))
    (home / "data").mkdir()
    (home / "data" / "mnist").symlink_to(data_dir)
    return home


def command(
    recipe: str, scheme: str, seed: int, summary: Path, rounds: int | None = None
) -> list[str]:
    """The `fedmnist run` command line of one run (`rounds`: the config's when None)."""
    sets = {f"train.compression.{k}": v for k, v in SCHEMES[scheme].items()}
    every = "[" + ",".join(str(r) for r in range(1, (rounds or 40) + 1)) + "]"
    sets.update(
        {
            "seed": seed,
            "evaluation.rounds": every,
            "evaluation.workers": "false",
            "tracking.registered_model": "null",
        }
    )
    argv = [str(ROOT / ".venv" / "bin" / "fedmnist"), "run", RECIPES[recipe]]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    if rounds is not None:
        argv += ["--rounds", str(rounds)]
    return argv + ["--summary-json", str(summary)]


def wire_bytes(uri: str, run_id: str) -> dict[str, float]:
    """Mean bytes per worker-round, down (request) and up (reply), over the run's workers."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    keys = client.get_run(run_id).data.metrics
    workers = sorted(k.split("/", 1)[1] for k in keys if k.startswith("wire_bytes_down/"))
    down, total = [], []
    for w in workers:
        down += [m.value for m in client.get_metric_history(run_id, f"wire_bytes_down/{w}")]
        total += [m.value for m in client.get_metric_history(run_id, f"wire_bytes/{w}")]
    if not down or len(down) != len(total):
        raise RuntimeError(f"run {run_id}: no wire_bytes_down metrics (an older fedcore?)")
    return {
        "down": statistics.fmean(down),
        "up": statistics.fmean(total) - statistics.fmean(down),
        "worker_rounds": len(down),
    }


def run_once(
    home: Path, recipe: str, scheme: str, seed: int, rounds: int | None = None
) -> dict[str, Any]:
    """One training through `fedmnist run`; its accuracies, bytes and wall time."""
    summary = home / f"summary-{recipe}-{scheme}-{seed}.json"
    log = home / f"run-{recipe}-{scheme}-{seed}.log"
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(key, None)
    env.update(
        {
            "FEDMNIST_HOME": str(home),
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
    )
    argv = command(recipe, scheme, seed, summary, rounds)
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{recipe} {scheme} seed {seed}: exit {proc.returncode}\n{tail}")
    result = json.loads(summary.read_text())
    evaluations = {int(r): float(m["federated"]) for r, m in result["evaluations"].items()}
    accuracy = [evaluations[r] for r in range(1, int(result["rounds"]) + 1)]
    nbytes = wire_bytes(f"sqlite:///{home / 'mlflow.db'}", result["mlflow_run_id"])
    shutil.rmtree(result["checkpoint_dir"], ignore_errors=True)
    return {
        "recipe": recipe,
        "scheme": scheme,
        "compression": SCHEMES[scheme],
        "seed": seed,
        "rounds": int(result["rounds"]),
        "command": "fedmnist " + " ".join(argv[1:-2]),
        "final_accuracy": float(result["final_accuracy"]),
        "accuracy": accuracy,
        "bytes_down": nbytes["down"],
        "bytes_up": nbytes["up"],
        "worker_rounds": nbytes["worker_rounds"],
        "wall_seconds": wall,
    }


# -- the table ----------------------------------------------------------------------------------


def table(runs: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per (recipe, scheme), in RECIPES' then SCHEMES' order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["recipe"], run["scheme"]), []).append(run)
    head = [
        "recipe",
        "compression",
        "seeds",
        "final accuracy % by seed",
        "median",
        "vs none (points)",
        "MB down / up per worker-round",
        "bytes vs none",
        "wall s per run",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe in RECIPES:
        base = groups.get((recipe, "none"))
        for scheme in SCHEMES:
            rs = sorted(groups.get((recipe, scheme), []), key=lambda r: r["seed"])
            if not rs:
                continue
            accs = [100 * r["final_accuracy"] for r in rs]
            med = statistics.median(accs)
            cells = [recipe, scheme, ",".join(str(r["seed"]) for r in rs)]
            cells += [" / ".join(f"{a:.2f}" for a in accs), f"{med:.2f}"]
            if base and scheme != "none":
                seeds = {r["seed"] for r in rs}
                same = [r for r in base if r["seed"] in seeds]
                base_med = statistics.median(100 * r["final_accuracy"] for r in same)
                cells.append(f"{med - base_med:+.2f}")
            else:
                cells.append("")
            down = statistics.fmean(r["bytes_down"] for r in rs)
            up = statistics.fmean(r["bytes_up"] for r in rs)
            cells.append(f"{down / 1e6:.2f} / {up / 1e6:.3f}")
            if base:
                ref = statistics.fmean(r["bytes_down"] + r["bytes_up"] for r in base)
                cells.append(f"{(down + up) / ref:.3f}x")
            else:
                cells.append("")
            walls = [r["wall_seconds"] for r in rs]
            spread = f" ({min(walls):.0f}-{max(walls):.0f})" if len(walls) > 1 else ""
            cells.append(f"{statistics.fmean(walls):.0f}{spread}")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def readme_rows(runs: list[dict[str, Any]]) -> list[str]:
    """The runs as rows of the README's strategy table (`<recipe>+<scheme>`), bytes relative
    to the uncompressed seed recipe."""
    rounds = min(len(r["accuracy"]) for r in runs)
    shown = [r for r in (1, 11, 21, 31) if r < rounds] + [rounds]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["recipe"], run["scheme"]), []).append(run)
    base = groups.get(("seed", "none"))
    base_bytes = statistics.fmean(r["bytes_down"] + r["bytes_up"] for r in base) if base else None
    head = ["strategy", "seeds"] + [f"r{r} mean / min" for r in shown]
    head += [f"first >= {100 * t:.1f}%" for t in THRESHOLDS]
    head += ["MB per worker-round", "wall s per run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe in RECIPES:
        for scheme in SCHEMES:
            rs = sorted(groups.get((recipe, scheme), []), key=lambda r: r["seed"])
            if not rs:
                continue
            cells = [f"{recipe}+{scheme}", ",".join(str(r["seed"]) for r in rs)]
            for rnd in shown:
                accs = [100 * r["accuracy"][rnd - 1] for r in rs]
                cells.append(f"{statistics.fmean(accs):.2f} / {min(accs):.2f}")
            for t in THRESHOLDS:
                cells.append(rounds_cell([first_round(r["accuracy"], t) for r in rs]))
            nbytes = statistics.fmean(r["bytes_down"] + r["bytes_up"] for r in rs)
            ratio = f" ({nbytes / base_bytes:.2f}x)" if base_bytes else ""
            cells.append(f"{nbytes / 1e6:.2f}{ratio}")
            walls = [r["wall_seconds"] for r in rs]
            spread = f" ({min(walls):.0f}-{max(walls):.0f})" if len(walls) > 1 else ""
            cells.append(f"{statistics.fmean(walls):.0f}{spread}")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(out: Path, runs: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=1))
    lines = [
        "# Update compression: bytes per worker-round and final accuracy",
        "",
        "Final federated test accuracy (%, 10,000 images, round 40) per seed and their median;",
        "`vs none`: the median's difference from the uncompressed runs of the same seeds.",
        "Bytes: the train request (down) and the update (up) as sent, per worker-round, mean",
        "over the run's worker-rounds, from its MLflow `wire_bytes_down/<worker>` and",
        "`wire_bytes/<worker>` metrics; `bytes vs none`: both ways together. Wall times are of",
        "a 2-core machine shared with other work (they varied 2-3x between identical runs).",
        "`benchmarks/compression_accuracy.py`; each run is `fedmnist run <recipe's config>",
        "--set train.compression.name=<scheme> --set seed=<s> --set evaluation.rounds=[1,...,40]",
        "--set evaluation.workers=false --set tracking.registered_model=null` (topk-0.1 adds",
        "`--set train.compression.fraction=0.1`).",
        "",
        *table(runs),
        "",
        "As rows of the README's strategy table (accuracy at rounds 1/11/21/31/40, mean / min",
        "over the seeds; first round reaching 95.9% / 98.0%, mean (min-max); MB per",
        "worker-round both ways, x: relative to the uncompressed seed recipe):",
        "",
        *readme_rows(runs),
        "",
    ]
    out.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--schemes",
        default=",".join(SCHEMES),
        help=f"comma-separated schemes (default: {','.join(SCHEMES)})",
    )
    p.add_argument("--recipes", default="best,seed", help="best and/or seed (default: both)")
    p.add_argument("--best-seeds", default="1,2,3", help="seeds of best (default: 1,2,3)")
    p.add_argument("--seed-seeds", default="1", help="seeds of seed (default: 1)")
    p.add_argument(
        "--rounds", type=int, default=None, help="rounds per run (default: the config's, 40)"
    )
    p.add_argument(
        "--data-dir",
        default=str(ROOT / ".fedmnist" / "data" / "mnist"),
        help="MNIST directory (default: .fedmnist/data/mnist in this checkout)",
    )
    p.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results" / "compression_accuracy.md"),
        help="markdown table; raw JSON beside it (default: benchmarks/results/"
        "compression_accuracy.md)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the runs already in the JSON, run only the missing ones (default: off)",
    )
    args = p.parse_args()
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [s for s in schemes if s not in SCHEMES] + [r for r in recipes if r not in RECIPES]
    if bad:
        p.error(f"unknown {bad}; schemes: {list(SCHEMES)}, recipes: {list(RECIPES)}")
    seeds = {
        "best": [int(s) for s in args.best_seeds.split(",") if s.strip()],
        "seed": [int(s) for s in args.seed_seeds.split(",") if s.strip()],
    }
    data_dir = Path(args.data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        p.error(f"--data-dir {data_dir} does not exist (prepare it with `fedmnist data`)")
    out = Path(args.out)

    runs: list[dict[str, Any]] = []
    if args.reuse and out.with_suffix(".json").is_file():
        runs = json.loads(out.with_suffix(".json").read_text())["runs"]
        if args.rounds is not None:
            runs = [r for r in runs if r["rounds"] == args.rounds]
    done = {(r["recipe"], r["scheme"], r["seed"]) for r in runs}
    todo = [
        (recipe, scheme, seed)
        for recipe in recipes
        for seed in seeds[recipe]
        for scheme in schemes
        if (recipe, scheme, seed) not in done
    ]
    home = make_home(data_dir)
    try:
        for recipe, scheme, seed in todo:
            run = run_once(home, recipe, scheme, seed, args.rounds)
            runs.append(run)
            print(
                f"{recipe} {scheme} seed {seed}: {100 * run['final_accuracy']:.2f}%; "
                f"{run['bytes_down'] / 1e6:.3f} MB down, {run['bytes_up'] / 1e6:.3f} MB up "
                f"per worker-round; {run['wall_seconds']:.0f} s",
                flush=True,
            )
            write_results(out, runs)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    write_results(out, runs)
    print()
    print("\n".join(table(runs)))
    print(f"\nwritten: {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
