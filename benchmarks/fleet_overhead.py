"""What one more worker costs a round: the coordinator's overhead per worker-round at 3, 10, 20.

A fleet of N local trainers (IID parts of MNIST's training set, one torch thread each) trains
`--rounds` rounds of 2 local steps of 32 images through the product (`fedmnist run`: Prefect's
temporary server, MLflow SQLite, no evaluator), so a worker's own compute is tiny and what is
left of a round is the framework: the `train-<w>-rNN` task per worker, the 1.7 MB global model
(encoded once a round) written to each worker, its update read, decoded and checked, screening,
aggregation, and the round's record. Screening is off, as in configs/fleet-10.yaml, so each
update is folded into a running sum as it arrives (an earlier checkout given with `--before`
holds every update and screens none: its `norm_factor: 0` keeps them all). From the run's log
and timeline (round 1, which also warms up every worker, left out), per N, medians over the
rounds:

- wall per round: the round's line (training to the round's line, record included);
- compute: the slowest worker's own training seconds (its "round N: ..., 0.02s" line);
- overhead per worker-round: (wall - compute) / N;
- marginal cost of a worker: the slope of wall per round between the fleet sizes, and the slope
  of (wall - compute): what one more worker adds beyond its own compute.

On a 2-core machine N worker processes share two cores, so part of what grows with N is the
workers' own Python (reading a frame, decoding, encoding the reply) competing with the
coordinator: the figure is the fleet's cost on one machine, an upper bound for devices that
compute elsewhere.

    .venv/bin/python benchmarks/fleet_overhead.py [--sizes 3,10,20] [--rounds 8] [--repeats 3]
        [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.seed_phases import run_product  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def fleet_config(n: int, rounds: int, folder: Path) -> Path:
    """A config of `n` IID trainers, 2 local steps, no evaluation, screening off (so each
    update is folded into the round's running sum as it arrives: flows/rounds.py `streams`)."""
    lines = [
        f"name: fleet-{n}",
        "seed: 1",
        f"rounds: {rounds}",
        "train: {steps: 2, batch_size: 32, lr: 0.1}",
        "strategy: {name: fedavg}",
        "screening: {norm_factor: 0}",  # as configs/fleet-10.yaml: the round streams
        "timeouts: {start: 900, train: 600}",
        "workers:",
    ]
    lines += [
        f"  - {{name: w{i:02d}, iid: {{index: {i}, count: {n}, seed: 1}}, threads: 1}}"
        for i in range(n)
    ]
    path = folder / f"fleet-{n}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def figures(run: dict[str, Any], n: int) -> dict[str, float]:
    """Per-round medians of one fleet run (round 1 left out)."""
    rounds = [r for r in run["rounds"] if r["round"] > 1]
    wall = statistics.median(r["seconds"] for r in rounds)
    compute = statistics.median(r["compute"] for r in rounds)
    return {
        "trainers": n,
        "wall_per_round": wall,
        "train_phase": statistics.median(r["train"] for r in rounds),
        "aggregate": statistics.median(r["aggregate"] for r in rounds),
        "record": statistics.median(r["record"] for r in rounds),
        "compute": compute,
        "overhead_per_worker_round_ms": 1000 * (wall - compute) / n,
        "startup": run["startup"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="3,10,20", help="fleet sizes (3,10,20)")
    p.add_argument("--rounds", type=int, default=8, help="rounds per run (8; round 1 not counted)")
    p.add_argument("--repeats", type=int, default=1, help="runs per size and version (median)")
    p.add_argument("--before", type=Path, help="a copy of an earlier checkout to run alongside")
    p.add_argument("--out", type=Path, default=RESULTS / "fleet_overhead", help="results stem")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = {"product": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    table: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(prefix="fedmnist-fleet-") as tmp:
        for n in sizes:
            config = fleet_config(n, args.rounds, Path(tmp))
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
            for _ in range(args.repeats):  # the versions alternate
                for name, root in variants.items():
                    runs[name].append(figures(run_product(root, None, None, str(config)), n))
                    print(name, json.dumps(runs[name][-1]), flush=True)
            for name, got in runs.items():
                table[name].append(
                    {
                        k: statistics.median(r[k] for r in got) if isinstance(v, float) else v
                        for k, v in got[0].items()
                    }
                )
    for rows in table.values():
        for a, b in zip(rows, rows[1:], strict=False):
            added = b["trainers"] - a["trainers"]
            b["marginal_ms_per_worker"] = 1000 * (b["wall_per_round"] - a["wall_per_round"]) / added
            # beyond the workers' own compute: the slope of (wall - slowest worker's compute)
            b["marginal_beyond_compute_ms"] = (
                1000
                * ((b["wall_per_round"] - b["compute"]) - (a["wall_per_round"] - a["compute"]))
                / added
            )
    result = {"rounds": args.rounds, "sizes": sizes, "table": table, "load": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Fleet overhead per worker-round ({result['rounds']} rounds of 2 local steps, "
        "round 1 left out, medians)",
        "",
        "| version | trainers | wall per round s | slowest worker's compute s | train phase s "
        "| aggregate s | record s | (wall - compute) / trainers ms | marginal ms per worker "
        "| marginal beyond compute ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in result["table"].items():
        for r in rows:
            marginal = r.get("marginal_ms_per_worker")
            beyond = r.get("marginal_beyond_compute_ms")
            lines.append(
                f"| {name} | {r['trainers']} | {r['wall_per_round']:.3f} | {r['compute']:.3f} "
                f"| {r['train_phase']:.3f} | {r['aggregate']:.3f} | {r['record']:.3f} "
                f"| {r['overhead_per_worker_round_ms']:.1f} "
                f"| {'' if marginal is None else f'{marginal:.1f}'} "
                f"| {'' if beyond is None else f'{beyond:.1f}'} |"
            )
    lines += [
        "",
        f"Load average at the end: {', '.join(f'{x:.1f}' for x in result['load'])} (a shared "
        "2-core machine). Reproduce: `.venv/bin/python benchmarks/fleet_overhead.py`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
