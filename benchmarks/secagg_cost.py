"""What secure aggregation costs: the seed and the best recipe with and without it, through the
product (the `federated-mnist` flow, local worker processes, the wire).

Per recipe and mode the table gives the final federated test accuracy (10,000 images), bytes
per worker-round each way and seconds per round. The issue's target: the same accuracy within
0.1 point with secure aggregation on.

- Accuracy and seconds: one training each through the flow, with the recipe's overrides plus
  `evaluation.workers: false` (secure aggregation never shows a worker's model; off in both
  modes so they do the same work) and the federated model evaluated at the last round only.
  Seconds per round: the mean of each round's train and aggregate phases from the run's
  `timeline.jsonl` (evaluation left out), and the run's wall time over its rounds.
- Bytes: the frames of round 2 (SCAFFOLD's control variate travels from round 2 on), measured on
  the wire by the coordinator's sessions: a plain round's request and reply (`Update.wire_bytes`)
  against the four request/reply pairs of a secure round (`flows.secure_round.exchange`), three
  local workers, the recipe's plan.

    .venv/bin/python benchmarks/secagg_cost.py [--recipes seed,best] [--rounds 40]
        [--data-dir D] [--out benchmarks/results/secagg_cost.md] 2> secagg_cost.log

FEDMNIST_HOME and PREFECT_HOME live in a temporary directory; tracking is off. Raw results go to
the `--out` file's `.json` twin, rewritten after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from strategy_accuracy import isolate, start_prefect  # noqa: E402

RECIPES = {"seed": "configs/seed.yaml", "best": "configs/best.yaml"}
MODES = ("plain", "secagg")


def overrides(rounds: int, data_dir: str, mode: str) -> dict[str, Any]:
    return {
        "rounds": rounds,
        "evaluation.rounds": [rounds],
        "evaluation.workers": False,
        "data_dir": data_dir,
        "tracking.enabled": False,
        "secure_aggregation.enabled": mode == "secagg",
    }


def run_once(recipe: str, mode: str, rounds: int, data_dir: str) -> dict[str, Any]:
    """One training through the flow: final accuracy, seconds per round."""
    from fedcore.config import load_config
    from flows.cli import flow_arguments
    from flows.federated import federated_mnist

    config = str(ROOT / RECIPES[recipe])
    extra = overrides(rounds, data_dir, mode)
    cfg = load_config(config, extra)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    state = federated_mnist(**flow_arguments(config, extra, cfg), return_state=True)
    wall = time.perf_counter() - started
    if not state.is_completed():
        raise RuntimeError(f"{recipe} {mode}: {state.result(raise_on_failure=False)}")
    summary = state.result()
    run_dir = Path(summary["checkpoint_dir"])
    lines = [json.loads(x) for x in (run_dir / "timeline.jsonl").read_text().splitlines()]
    per_round = [
        line["phases"].get("train", 0) + line["phases"].get("aggregate", 0) for line in lines
    ]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "recipe": recipe,
        "mode": mode,
        "rounds": rounds,
        "final_accuracy": float(summary["final_accuracy"]),
        "seconds_per_round": statistics.fmean(per_round),
        "wall_seconds_per_round": wall / rounds,
        # the machine's 1-minute load average before and after (other work slows the rounds)
        "load": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def measure_bytes(recipe: str, data_dir: str) -> dict[str, Any]:
    """Bytes of round 2 per worker, each way, plain and secure (three local workers)."""
    import torch  # noqa: F401 - before the workers start

    from fedcore.config import load_config
    from fedcore.model import initial_weights, weight_spec
    from fedcore.privacy_config import secagg_setup
    from fedcore.protocol import TrainRequest
    from fedcore.seeding import derive_seed
    from fedcore.strategies import build_strategy
    from fedcore.strategies_sum import aggregate_sum
    from flows.federated import make_session
    from flows.secure_round import exchange, sum_tensors

    out: dict[str, Any] = {}
    for mode in MODES:
        cfg = load_config(ROOT / RECIPES[recipe], overrides(2, data_dir, mode))
        sessions = {w.name: make_session(cfg, w) for w in cfg.trainers}
        strategy = build_strategy(cfg.strategy)
        spec = weight_spec()
        names = list(sessions)
        try:
            for s in sessions.values():
                s.start()
            for s in sessions.values():
                s.hello(timeout=300)
            weights = initial_weights(cfg.seed)
            for rnd in (1, 2):
                plan = dataclasses.replace(cfg.plan(rnd), **strategy.plan_overrides())
                reqs = {
                    n: TrainRequest(
                        rnd,
                        plan,
                        derive_seed(cfg.seed, n, rnd),
                        weights,
                        strategy.extras_for(n, rnd),
                    )
                    for n in names
                }
                if mode == "plain":
                    updates = [sessions[n].train(reqs[n], 300) for n in names]
                    down = {u.worker: u.wire_bytes_down for u in updates}
                    up = {u.worker: u.wire_bytes - u.wire_bytes_down for u in updates}
                    weights = strategy.aggregate(rnd, weights, updates, [])
                else:
                    done = exchange(sessions, secagg_setup(cfg, rnd, names, spec), reqs, 300)
                    down, up = done.bytes_down, done.bytes_up
                    r = done.result
                    control = (
                        sum_tensors(r, "control_delta", spec) if "control_delta" in r.sums else None
                    )
                    weights = aggregate_sum(
                        strategy,
                        rnd,
                        weights,
                        sum_tensors(r, "delta", spec),
                        control,
                        r.count,
                        r.survivors,
                    )
            out[mode] = {
                "down": statistics.fmean(down.values()),
                "up": statistics.fmean(up.values()),
            }
        finally:
            for s in sessions.values():
                s.close()
    return out


def table(runs: list[dict[str, Any]], nbytes: dict[str, Any]) -> list[str]:
    head = [
        "recipe",
        "mode",
        "rounds",
        "final accuracy %",
        "vs plain (points)",
        "MB down / up per worker-round",
        "s per round (train+aggregate)",
        "wall s per round",
        "load before / after",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe in RECIPES:
        base = next((r for r in runs if r["recipe"] == recipe and r["mode"] == "plain"), None)
        for r in (r for r in runs if r["recipe"] == recipe):
            b = nbytes.get(recipe, {}).get(r["mode"])
            diff = (
                f"{100 * (r['final_accuracy'] - base['final_accuracy']):+.2f}"
                if base is not None and r["mode"] != "plain"
                else ""
            )
            cells = [
                recipe,
                r["mode"],
                str(r["rounds"]),
                f"{100 * r['final_accuracy']:.2f}",
                diff,
                f"{b['down'] / 1e6:.2f} / {b['up'] / 1e6:.2f}" if b else "",
                f"{r['seconds_per_round']:.2f}",
                f"{r['wall_seconds_per_round']:.2f}",
                " / ".join(f"{x:.1f}" for x in r.get("load", [])),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(out: Path, runs: list[dict[str, Any]], nbytes: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "bytes": nbytes}, indent=1))
    lines = [
        "# What secure aggregation costs",
        "",
        "The seed and best recipes with and without `secure_aggregation` (3 trainers, threshold",
        "2, every pair masking), through the flow with local workers; final federated accuracy on",
        "the 10,000 test images; bytes per worker-round of round 2 as sent (request + relayed",
        "shares down, keys + shares + masked vector + unmasking shares up); seconds per round",
        "from the timeline (train + aggregate phases), on a machine shared with other work (its",
        "1-minute load average before and after each run is given: seconds are comparable only",
        "at similar load). `benchmarks/secagg_cost.py`.",
        "",
        *table(runs, nbytes),
        "",
    ]
    out.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default="seed,best", help="comma-separated (default: seed,best)")
    p.add_argument("--rounds", type=int, default=40, help="rounds per training (default: 40)")
    p.add_argument(
        "--data-dir",
        default=str(ROOT / ".fedmnist" / "data" / "mnist"),
        help="MNIST directory (default: .fedmnist/data/mnist in this checkout)",
    )
    p.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results" / "secagg_cost.md"),
        help="markdown table; raw JSON beside it (default: benchmarks/results/secagg_cost.md)",
    )
    args = p.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    data_dir = str(Path(args.data_dir).expanduser().resolve())
    out = Path(args.out)
    home = Path(tempfile.mkdtemp(prefix="fedmnist-secagg-cost-"))
    isolate(home)
    runs: list[dict[str, Any]] = []
    nbytes: dict[str, Any] = {}
    try:
        for recipe in recipes:
            nbytes[recipe] = measure_bytes(recipe, data_dir)
            print(f"{recipe} bytes: {nbytes[recipe]}", flush=True)
            write_results(out, runs, nbytes)
        print(f"Prefect temporary server started in {start_prefect():.1f} s", flush=True)
        for recipe in recipes:
            for mode in MODES:
                run = run_once(recipe, mode, args.rounds, data_dir)
                runs.append(run)
                print(
                    f"{recipe} {mode}: {100 * run['final_accuracy']:.2f}% after {args.rounds} "
                    f"rounds; {run['seconds_per_round']:.2f} s per round",
                    flush=True,
                )
                write_results(out, runs, nbytes)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    write_results(out, runs, nbytes)
    print("\n".join(table(runs, nbytes)))
    print(f"\nwritten: {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
