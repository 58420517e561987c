"""Final test accuracy of each aggregation rule when one of three workers lies every round.

One worker (charlie) returns, every round, w' = g + s (w - g) instead of its trained model w (g:
the round's global model): s = -5 ("scale": a flipped and boosted update, 5x the honest distance,
inside the screening's factor 10 so that the rule, not the screening, has to cope with it) or
s = -1 ("signflip": an update of honest size pointing the wrong way). The rows: the fault-free
`mean` (the reference) and `median`, then `mean`, `median`, `trimmed-mean` (beta 1/3) and
`clipped-mean` (bound: the round's median norm) under each attack, and `mean` and `clipped-mean`
under s = 8 ("boost": the honest direction, 8x as far: the model-replacement attack that norm
clipping is meant for; clipping bounds how far an update moves the model, not which way).
Last, the median composed with server momentum 0.5 under the sign flip, next to its fault-free
counterpart (the mean with the same momentum, `fedavgm`).

The budget is the seed's (configs/robust.yaml: 40 rounds of 10 batches of 32, lr 0.1 x0.98)
but the shards are IID, a third of the training set each: on the seed's split (alice 0-3, bob
4-6, charlie 7-9) the attacker's digits are held by nobody else, so any rule that stops it also
loses digits 7-9 and no rule can end near the fault-free run; that measures the split, not the
rule. The same holds for the fault suite (tests/faults), which uses IID shards for that reason.

Each run is the coordinator's own steps in one process, without Prefect, processes or the wire:
`train_local` per worker with the flow's per-round sampling seeds, the strategy's
`check_update` with the counts the flow expects, the flow's screening (`ScreeningHistory`, the
config's norm_factor) and `strategy.aggregate`; the federated model is scored on the 10,000
test images at rounds 10, 20, 30 and 40. The same rules through the real flow and the SSH lab:
tests/faults/test_byzantine.py (8 short rounds).

    .venv/bin/python benchmarks/robust_accuracy.py [--rounds 40] [--data-dir D]
        [--steps 10] [--only mean/none,median/scale] [--out benchmarks/results/robust_accuracy.md]
        [--reuse]    # keep the runs of that budget already in the --out file's .json twin
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcore.config import ExperimentConfig, load_config  # noqa: E402
from fedcore.errors import UpdateRejected  # noqa: E402
from fedcore.evaluation import evaluate  # noqa: E402
from fedcore.mnist import load_shard  # noqa: E402
from fedcore.model import build_model, initial_weights  # noqa: E402
from fedcore.protocol import Update  # noqa: E402
from fedcore.screening import ScreeningHistory  # noqa: E402
from fedcore.seeding import derive_seed  # noqa: E402
from fedcore.strategies import ExpectedCounts, StrategyConfig  # noqa: E402
from fedcore.training import train_local  # noqa: E402

ATTACKER = "charlie"
ATTACKS: dict[str, float | None] = {"none": None, "scale": -5.0, "signflip": -1.0, "boost": 8.0}
STRATEGIES: dict[str, dict[str, Any]] = {
    "mean": {"name": "mean"},
    "median": {"name": "median"},
    "trimmed-mean": {"name": "trimmed-mean", "beta": 1 / 3},
    "clipped-mean": {"name": "clipped-mean", "weighting": "unweighted", "bound": "median"},
    "centered-clip": {
        "name": "clipped-mean",
        "weighting": "unweighted",
        "bound": "median",
        "center": "median",
    },
    "centered-clip+m0.5": {
        "name": "clipped-mean",
        "weighting": "unweighted",
        "center": "median",
        "momentum": 0.5,
    },
    "fedavgm-0.5": {"name": "fedavgm", "weighting": "unweighted", "momentum": 0.5},
    "median+m0.5": {"name": "median", "momentum": 0.5},
}
RUNS = [("mean", "none"), ("median", "none")]
RUNS += [(s, a) for a in ("scale", "signflip") for s in list(STRATEGIES)[:4]]
RUNS += [("mean", "boost"), ("clipped-mean", "boost")]
RUNS += [("fedavgm-0.5", "none"), ("median+m0.5", "signflip"), ("median+m0.5", "scale")]
RUNS += [("centered-clip", a) for a in ("none", "scale", "signflip", "boost")]
RUNS += [("centered-clip+m0.5", a) for a in ("signflip", "scale")]
SCORED = (10, 20, 30, 40)


def lie(weights: dict[str, torch.Tensor], g: dict[str, torch.Tensor], s: float) -> dict:
    """g + s (weights - g): the attacker's update."""
    return {k: (g[k] + s * (t - g[k])).to(t.dtype) for k, t in weights.items()}


def run(cfg: ExperimentConfig, strategy: str, attack: str, data_dir: str) -> dict[str, Any]:
    """One training of `strategy` with `attack`; accuracy at the scored rounds, screening drops."""
    torch.manual_seed(cfg.seed)
    strat = StrategyConfig.model_validate(STRATEGIES[strategy]).root.build()
    shards = {w.name: load_shard(data_dir, w.shard()) for w in cfg.trainers}
    test_images, test_labels = load_shard(data_dir, cfg.evaluators[0].shard())
    screening = ScreeningHistory(cfg.screening.norm_factor)
    weights = initial_weights(cfg.seed)
    scale = ATTACKS[attack]
    accuracy: dict[int, float] = {}
    screened = 0
    started = time.perf_counter()
    for rnd in range(1, cfg.rounds + 1):
        plan = cfg.train.plan(rnd)
        updates = []
        for name, (images, labels) in shards.items():
            model = build_model(weights)
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, name, rnd))
            metrics = train_local(model, images, labels, plan, gen)
            trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if name == ATTACKER and scale is not None:
                trained = lie(trained, weights, scale)
            update = Update(name, rnd, trained, labels.numel(), metrics)
            expected = ExpectedCounts(labels.numel(), plan.steps, plan.batch_size)
            try:
                strat.check_update(update, weights, expected)
            except UpdateRejected:
                continue
            updates.append(update)
        result = screening.screen(updates, weights)
        screened += len(result.dropped)
        screening.accept(result)
        weights = strat.aggregate(rnd, weights, result.kept, [])
        if rnd in SCORED or rnd == cfg.rounds:
            with torch.no_grad():
                scored = evaluate(build_model(weights), test_images, test_labels, [])
            accuracy[rnd] = scored.accuracy
        print(f"  {strategy}/{attack} round {rnd}", end="\r", file=sys.stderr)
    return {
        "strategy": strategy,
        "attack": attack,
        "accuracy": accuracy,
        "screened": screened,
        "seconds": time.perf_counter() - started,
    }


def table(runs: list[dict[str, Any]], rounds: int, reference: float | None) -> list[str]:
    scored = [r for r in SCORED if r < rounds] + [rounds]
    head = "| strategy | attack (charlie, every round) | " + " | ".join(f"r{r}" for r in scored)
    lines = [
        head + " | vs fault-free mean | updates screened out |",
        "|---|---|" + "---|" * len(scored) + "---|---|",
    ]
    for r in runs:
        acc = r["accuracy"]
        cells = " | ".join(f"{100 * acc[k]:.2f}" for k in scored)
        diff = "" if reference is None else f"{100 * (acc[rounds] - reference):+.2f}"
        what = "none" if r["attack"] == "none" else f"{r['attack']} (s = {ATTACKS[r['attack']]:g})"
        lines.append(f"| {r['strategy']} | {what} | {cells} | {diff} | {r['screened']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="rounds per run (default: 40)")
    parser.add_argument(
        "--steps", type=int, default=10, help="batches per worker-round (default: 10)"
    )
    parser.add_argument(
        "--data-dir",
        default=str(ROOT / ".fedmnist" / "data" / "mnist"),
        help="MNIST directory (default: .fedmnist/data/mnist)",
    )
    parser.add_argument(
        "--only", default="", help="strategy/attack pairs, comma-separated (default: all)"
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / "benchmarks/results/robust_accuracy.md"),
        help="the table (default: benchmarks/results/robust_accuracy.md, and its .json)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the runs the .json already has (default: run all again)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    budget = {"rounds": args.rounds, "train.steps": args.steps}
    cfg = load_config(ROOT / "configs" / "robust.yaml", budget)
    out = Path(args.out)
    kept = json.loads(out.with_suffix(".json").read_text()) if args.reuse else []
    kept = [r for r in kept if (r["rounds"], r["steps"]) == (args.rounds, args.steps)]
    for r in kept:
        r["accuracy"] = {int(k): v for k, v in r["accuracy"].items()}  # JSON keys are strings
    done = {(r["strategy"], r["attack"]): r for r in kept}
    chosen = [tuple(p.split("/")) for p in args.only.split(",") if p] or RUNS
    for strategy, attack in chosen:
        if (strategy, attack) in done:
            continue
        r = run(cfg, strategy, attack, args.data_dir)
        r.update(rounds=args.rounds, steps=args.steps)
        done[(strategy, attack)] = r
        final = r["accuracy"][args.rounds]
        print(f"{strategy}/{attack}: {100 * final:.2f}% ({r['seconds']:.0f} s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(list(done.values()), indent=1))
    order = {pair: i for i, pair in enumerate(RUNS)}
    runs = sorted(done.values(), key=lambda r: order.get((r["strategy"], r["attack"]), len(RUNS)))
    ref = done.get(("mean", "none"))
    lines = table(runs, args.rounds, ref["accuracy"][args.rounds] if ref else None)
    print("\n".join(lines))
    out.write_text(
        "# Accuracy under a lying worker\n\nFederated test accuracy (%, 10,000 images); IID "
        f"shards, {args.rounds} rounds of {args.steps} batches of 32; one of three workers lies "
        "every round. `benchmarks/robust_accuracy.py`.\n\n" + "\n".join(lines) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
