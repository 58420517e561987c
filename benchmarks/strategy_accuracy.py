"""Test accuracy by round of each aggregation strategy on the seed's split and budget, through the
product: the `federated-mnist` flow, local worker processes, the wire, MLflow.

Every variant trains the seed's experiment (alice 0-3, bob 4-6, charlie 7-9; 10 batches of 32 per
worker-round; 40 rounds; lr 0.1 x0.98, floor 0.001) and differs only in its strategy (and, for
`best`, the workers' label smoothing: configs/best.yaml). The federated model is scored on the
10,000 test images after EVERY round (`evaluation.workers: false`: the workers' own models are not
scored, to keep it affordable); evaluating does not change training (the per-round sampling seeds
do not depend on it).

All runs happen in this one process, back to back: Prefect's temporary server starts once (started
before the first timed run) and a later flow starts in well under a second. FEDMNIST_HOME, the
MLflow store and PREFECT_HOME live in a temporary directory, so benchmark runs never reach the
user's store or Prefect server; only MNIST is read from the user's data directory.

Per strategy the table gives, over the seeds run: federated test accuracy at rounds 1/11/21/31/40
(mean and min), the first round reaching 95.9% (the seed's figure) and 98.0% (mean, min-max, or
"never"), bytes per worker-round (request + reply as sent, the flow's `wire_bytes/<worker>` MLflow
metric, mean over the run's worker-rounds) and wall time per run.

    .venv/bin/python benchmarks/strategy_accuracy.py [--strategies best,seed] [--seeds 1,2,3]
        [--rounds 40] [--data-dir D] [--out benchmarks/results/strategy_accuracy.md] [--reuse]
        2> strategy_accuracy.log    # the workers' log lines; progress and the table go to stdout

Raw results go to the `--out` file's `.json` twin, rewritten after every run, so an interrupted
benchmark keeps what it measured; `--reuse` keeps the runs already there and runs only the missing
(strategy, seed) pairs (with none missing it just rewrites the table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPORT_ROUNDS = (1, 11, 21, 31, 40)
THRESHOLDS = (0.959, 0.980)  # the seed's 95.9% at round 40, and 98.0%


@dataclass(frozen=True)
class Variant:
    """A named recipe: a config file plus the overrides that select its strategy."""

    config: str
    overrides: dict[str, Any] = field(default_factory=dict)
    about: str = ""


def _strategy(**section: Any) -> dict[str, Any]:
    return {"strategy": section}


VARIANTS: dict[str, Variant] = {
    "seed": Variant("configs/seed.yaml", {}, "unweighted mean of the models (the seed)"),
    "fedavg": Variant("configs/seed.yaml", _strategy(name="fedavg"), "sample-weighted FedAvg"),
    "fedavgm-0.7": Variant(
        "configs/seed.yaml",
        _strategy(name="fedavgm", weighting="unweighted", momentum=0.7),
        "unweighted mean + server momentum 0.7",
    ),
    "fedadam": Variant(
        "configs/seed.yaml",
        _strategy(name="fedadam", weighting="unweighted", server_lr=0.01),
        "unweighted mean + server Adam, server_lr 0.01, tau 1e-3 (Reddi et al.'s update)",
    ),
    "fedprox": Variant(
        "configs/seed.yaml",
        _strategy(name="fedprox", weighting="unweighted", mu=0.01),
        "proximal term mu 0.01 in the workers' loss, unweighted mean",
    ),
    "scaffold": Variant(
        "configs/seed.yaml",
        _strategy(name="scaffold", weighting="unweighted"),
        "SCAFFOLD control variates, unweighted mean, no server momentum",
    ),
    "scaffold+m0.7": Variant(
        "configs/seed.yaml",
        _strategy(name="scaffold", weighting="unweighted", momentum=0.7),
        "SCAFFOLD + server momentum 0.7",
    ),
    "best": Variant(
        "configs/best.yaml",
        {},
        "SCAFFOLD + Nesterov server momentum 0.8 + label smoothing 0.1 (configs/best.yaml)",
    ),
}


def isolate(home: Path) -> None:
    """Point FEDMNIST_HOME and Prefect at `home` (before Prefect is imported)."""
    os.environ["FEDMNIST_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ.pop("PREFECT_API_URL", None)  # never post benchmark runs to a running server
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # one line per run from here


def start_prefect() -> float:
    """Start Prefect's temporary server now, so no timed run pays for it; returns seconds."""
    from prefect.client.orchestration import get_client

    started = time.perf_counter()
    with get_client(sync_client=True) as client:
        client.hello()
    return time.perf_counter() - started


def wire_bytes(uri: str, run_id: str, workers: list[str]) -> dict[str, float]:
    """Mean bytes per round (request + reply) of each worker, from the run's MLflow metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    out = {}
    for w in workers:
        history = client.get_metric_history(run_id, f"wire_bytes/{w}")
        out[w] = statistics.fmean(m.value for m in history) if history else float("nan")
    return out


def run_once(name: str, seed: int, rounds: int, data_dir: str, uri: str) -> dict[str, Any]:
    """One training of variant `name` through the flow; its accuracies, bytes and wall time."""
    from fedcore.config import load_config
    from flows.cli import flow_arguments
    from flows.federated import federated_mnist

    variant = VARIANTS[name]
    overrides = {
        **variant.overrides,
        "seed": seed,
        "rounds": rounds,
        "evaluation.rounds": list(range(1, rounds + 1)),  # the federated model, every round
        "evaluation.workers": False,  # not each worker's model: 4x less evaluation
        "data_dir": data_dir,
        "tracking.uri": uri,
        "tracking.registered_model": None,  # log each round's model, register none
    }
    config = str(ROOT / variant.config)
    cfg = load_config(config, overrides)  # a bad override fails here, before Prefect
    started = time.perf_counter()
    state = federated_mnist(**flow_arguments(config, overrides, cfg), return_state=True)
    wall = time.perf_counter() - started
    if not state.is_completed():
        raise RuntimeError(f"{name} seed {seed}: {state.result(raise_on_failure=False)}")
    summary = state.result()
    acc = {int(r): float(m["federated"]) for r, m in summary["evaluations"].items()}
    trainers = [w.name for w in cfg.trainers]
    per_worker = wire_bytes(uri, summary["mlflow_run_id"], trainers)
    shutil.rmtree(summary["checkpoint_dir"], ignore_errors=True)  # 1.7 MB per round
    return {
        "strategy": name,
        "seed": seed,
        "rounds": rounds,
        "config_hash": cfg.config_hash(),
        "accuracy": [acc[r] for r in range(1, rounds + 1)],
        "wire_bytes": per_worker,
        "bytes_per_worker_round": statistics.fmean(per_worker.values()),
        "wall_seconds": wall,
    }


# -- the table --------------------------------------------------------------------------------


def first_round(accuracy: list[float], threshold: float) -> int | None:
    """1-based round whose accuracy first reaches `threshold` (compared in test images)."""
    need = round(threshold * 10000)
    for i, a in enumerate(accuracy):
        if round(a * 10000) >= need:
            return i + 1
    return None


def rounds_cell(firsts: list[int | None]) -> str:
    hit = [f for f in firsts if f is not None]
    never = len(firsts) - len(hit)
    if not hit:
        return "never"
    text = f"{statistics.fmean(hit):.1f}" if len(hit) > 1 else str(hit[0])
    if len(hit) > 1:
        text += f" ({min(hit)}-{max(hit)})"
    return text + (f", {never} never" if never else "")


def table(runs: list[dict[str, Any]], rounds: int) -> list[str]:
    """Markdown table lines, one row per strategy (in VARIANTS' order)."""
    shown = [r for r in REPORT_ROUNDS if r < rounds] + [rounds]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["rounds"] == rounds:
            by_name.setdefault(run["strategy"], []).append(run)
    base = by_name.get("seed")
    base_bytes = statistics.fmean(r["bytes_per_worker_round"] for r in base) if base else None
    head = ["strategy", "seeds"]
    head += [f"r{r} mean / min" for r in shown]
    head += [f"first >= {100 * t:.1f}%" for t in THRESHOLDS]
    head += ["MB per worker-round", "wall s per run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in [n for n in VARIANTS if n in by_name]:
        rs = sorted(by_name[name], key=lambda r: r["seed"])
        cells = [name, ",".join(str(r["seed"]) for r in rs)]
        for rnd in shown:
            accs = [100 * r["accuracy"][rnd - 1] for r in rs]
            cells.append(f"{statistics.fmean(accs):.2f} / {min(accs):.2f}")
        for t in THRESHOLDS:
            cells.append(rounds_cell([first_round(r["accuracy"], t) for r in rs]))
        nbytes = statistics.fmean(r["bytes_per_worker_round"] for r in rs)
        ratio = f" ({nbytes / base_bytes:.2f}x)" if base_bytes else ""
        cells.append(f"{nbytes / 1e6:.2f}{ratio}")
        walls = [r["wall_seconds"] for r in rs]
        spread = f" ({min(walls):.0f}-{max(walls):.0f})" if len(walls) > 1 else ""
        cells.append(f"{statistics.fmean(walls):.0f}{spread}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(out: Path, runs: list[dict[str, Any]], rounds: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=1))
    lines = [
        "# Accuracy by strategy on the seed's split and budget",
        "",
        "Federated test accuracy (%, 10,000 images) over the seeds listed; `first >= x%`: first",
        "round reaching it, mean (min-max) over the seeds that did. Bytes: request + reply per",
        "worker-round (x: relative to `seed`). `benchmarks/strategy_accuracy.py`.",
        "",
        *table(runs, rounds),
        "",
    ]
    out.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--strategies",
        default=",".join(VARIANTS),
        help=f"comma-separated variants to run (default: all: {','.join(VARIANTS)})",
    )
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default: 1,2,3)")
    p.add_argument("--rounds", type=int, default=40, help="rounds per run (default: 40)")
    p.add_argument(
        "--data-dir",
        default=str(ROOT / ".fedmnist" / "data" / "mnist"),
        help="MNIST directory (default: .fedmnist/data/mnist in this checkout)",
    )
    p.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results" / "strategy_accuracy.md"),
        help="markdown table; raw JSON beside it (default: benchmarks/results/"
        "strategy_accuracy.md)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the runs already in the JSON and run only missing pairs (default: off)",
    )
    args = p.parse_args()
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    data_dir = str(Path(args.data_dir).expanduser().resolve())
    if not Path(data_dir).is_dir():
        p.error(f"--data-dir {data_dir} does not exist (prepare it with `fedmnist data`)")
    out = Path(args.out)

    runs: list[dict[str, Any]] = []
    if args.reuse and out.with_suffix(".json").is_file():
        runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    done = {(r["strategy"], r["seed"], r["rounds"]) for r in runs}
    todo = [(n, s) for n in names for s in seeds if (n, s, args.rounds) not in done]

    home = Path(tempfile.mkdtemp(prefix="fedmnist-strategy-accuracy-"))
    isolate(home)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    try:
        if todo:
            print(f"Prefect temporary server started in {start_prefect():.1f} s", flush=True)
        for name, seed in todo:
            run = run_once(name, seed, args.rounds, data_dir, uri)
            runs.append(run)
            firsts = [first_round(run["accuracy"], t) for t in THRESHOLDS]
            print(
                f"{name} seed {seed}: {100 * run['accuracy'][-1]:.2f}% at round "
                f"{args.rounds}; first >= 95.9%/98.0%: {firsts[0]}/{firsts[1]}; "
                f"{run['bytes_per_worker_round'] / 1e6:.2f} MB per worker-round; "
                f"{run['wall_seconds']:.1f} s",
                flush=True,
            )
            write_results(out, runs, args.rounds)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    write_results(out, runs, args.rounds)
    print()
    print("\n".join(table(runs, args.rounds)))
    print(f"\nwritten: {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
