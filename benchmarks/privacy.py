"""What differential privacy costs: final accuracy and epsilon per device for DP-SGD noise
multipliers on the seed's split and budget with the best recipe (configs/best.yaml).

Each run is one in-process loop (as benchmarks/seed_overhead.py's `bare_loop`): the same shards,
the same per-round plans (`ExperimentConfig.plan`, the strategy's overrides), the same local
training (`train_local`, DP-SGD on when the plan says so), SCAFFOLD's worker side
(`ScaffoldClient`) and the same aggregation (`build_strategy`) as the product, with no worker
processes and no wire. Epsilon is the coordinator's ledger (fedcore.privacy.accountant) charged
as the round loop charges it: every round, each trainer's `steps` steps at sampling rate
batch_size / its examples. DP noise and batches come from each "device's" own entropy
(`secret_generator`), so a DP run's accuracy varies from run to run: `--repeats` reruns each.

    nice -n 10 .venv/bin/python benchmarks/privacy.py [--noise 0.5 1 1.5 2] [--repeats 1]

DP rounds are slow on one thread (per-example gradients); settings may run in parallel, each
`--private-only --noise S --out DIR_S`, then `--merge benchmarks/results/privacy.json
DIR_S/privacy.json ...` writes the table.

Writes benchmarks/results/privacy.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcore.config import ExperimentConfig, load_config  # noqa: E402
from fedcore.evaluation import evaluate  # noqa: E402
from fedcore.local_algorithms import ScaffoldClient  # noqa: E402
from fedcore.mnist import load_shard  # noqa: E402
from fedcore.model import build_model, initial_weights  # noqa: E402
from fedcore.protocol import Update  # noqa: E402
from fedcore.seeding import derive_seed  # noqa: E402
from fedcore.strategies import build_strategy  # noqa: E402
from fedcore.training import train_local  # noqa: E402

CONFIG = ROOT / "configs" / "best.yaml"
DELTA = 1e-5
TARGET_EPSILON = 2.0
TARGET_POINTS = 1.5
OUT = ROOT / "benchmarks" / "results"


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    """One training; final federated accuracy, epsilon per trainer, seconds."""
    from fedcore.privacy.accountant import DeviceLedger

    started = time.perf_counter()
    torch.set_num_threads(1)
    shards = {w.name: load_shard(str(cfg.data_dir_for(w)), w.shard()) for w in cfg.trainers}
    test_images, test_labels = load_shard(
        str(cfg.data_dir_for(cfg.evaluators[0])), cfg.evaluators[0].shard()
    )
    strategy = build_strategy(cfg.strategy)
    weights = initial_weights(cfg.seed)
    model = build_model(weights)
    clients = {
        name: ScaffoldClient({k: (tuple(p.shape), p.dtype) for k, p in model.named_parameters()})
        for name in shards
    }
    ledger = DeviceLedger(cfg.privacy.delta, cfg.privacy.target_epsilon)
    accuracy: dict[int, float] = {}
    for rnd in range(1, cfg.rounds + 1):
        plan = dataclasses.replace(cfg.plan(rnd), **strategy.plan_overrides())
        updates = []
        for name, (images, labels) in shards.items():
            model.load_state_dict(weights)
            extras = strategy.extras_for(name, rnd) if plan.scaffold else {}
            correction = clients[name].begin(rnd, extras) if plan.scaffold else None
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, name, rnd))
            metrics = train_local(model, images, labels, plan, gen, grad_correction=correction)
            new = {k: v.detach().clone() for k, v in model.state_dict().items()}
            back = (
                clients[name].finish(rnd, weights, new, plan.steps, plan.lr)
                if plan.scaffold
                else {}
            )
            updates.append(Update(name, rnd, new, labels.numel(), metrics, back))
            if plan.dp_noise_multiplier > 0:
                q = min(1.0, plan.batch_size / labels.numel())
                ledger.record(name, plan.steps, q, plan.dp_noise_multiplier)
        weights = strategy.aggregate(rnd, weights, updates, [])
        if cfg.evaluation.due(rnd, cfg.rounds):
            torch.set_num_threads(2)
            model.load_state_dict(weights)
            accuracy[rnd] = evaluate(model, test_images, test_labels, []).accuracy
            torch.set_num_threads(1)
        print(f"  round {rnd}/{cfg.rounds}", end="\r", file=sys.stderr, flush=True)
    return {
        "accuracy": accuracy,
        "final_accuracy": accuracy[cfg.rounds],
        "epsilon": {name: ledger.epsilon(name) for name in shards} if cfg.privacy.enabled else {},
        "examples": {name: int(labels.numel()) for name, (_, labels) in shards.items()},
        "seconds": time.perf_counter() - started,
    }


def measure(
    noise: list[float],
    repeats: int,
    rounds: int | None,
    private_only: bool = False,
    sets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    settings: list[float | None] = [*([] if private_only else [None]), *noise]
    rows = []
    for sigma in settings:
        overrides: dict[str, Any] = {"rounds": rounds} if rounds else {}
        overrides.update(sets or {})
        if sigma is not None:
            overrides.update(
                {
                    "privacy.enabled": True,
                    "privacy.noise_multiplier": sigma,
                    "privacy.delta": DELTA,
                    "privacy.target_epsilon": 1e6,  # measured here, not enforced
                }
            )
        cfg = load_config(CONFIG, overrides)
        runs = []
        for i in range(repeats if sigma is not None else 1):  # the non-private run is seeded
            print(f"noise {sigma} run {i + 1}", file=sys.stderr, flush=True)
            runs.append(run(cfg))
        rows.append(
            {
                "noise_multiplier": sigma,
                "max_grad_norm": cfg.privacy.max_grad_norm if sigma is not None else None,
                "runs": runs,
                "final_accuracy": statistics.mean(r["final_accuracy"] for r in runs),
                "epsilon_max": max(runs[0]["epsilon"].values()) if sigma is not None else None,
                "overrides": dict(sets or {}),
            }
        )
        write(rows, rounds or cfg.rounds)  # what finished survives an interrupted run
    return {"rows": rows}


def merge(parts: list[Path]) -> list[dict[str, Any]]:
    """The rows of earlier runs' JSON (one setting each, e.g. run in parallel), non-private
    first, then by noise multiplier; a setting in several parts keeps its last."""
    rows: dict[tuple[float, str], dict[str, Any]] = {}
    rounds = None
    for part in parts:
        data = json.loads(part.read_text())
        rounds = data["rounds"]
        for r in data["rows"]:
            sigma = r["noise_multiplier"]
            key = (-1.0 if sigma is None else sigma, _variant(r))
            rows[key] = r
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (k[1], k[0]))]
    write(ordered, rounds or 40)
    return ordered


def _variant(row: dict[str, Any]) -> str:
    """The row's config overrides besides the noise, e.g. `train.batch_size=512` ('' if none)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(row.get("overrides", {}).items()))


def table(rows: list[dict[str, Any]], rounds: int) -> list[str]:
    base = next(r for r in rows if r["noise_multiplier"] is None)["final_accuracy"]
    trainers = list(rows[0]["runs"][0]["examples"])
    head = "| noise multiplier | final accuracy | vs non-private | " + " | ".join(
        f"epsilon {t}" for t in trainers
    )
    lines = [
        head + " | meets target | seconds/run |",
        "|" + "---|" * (5 + len(trainers)),
    ]
    for r in rows:
        sigma = r["noise_multiplier"]
        acc = 100 * r["final_accuracy"]
        gap = 100 * (r["final_accuracy"] - base)
        secs = statistics.mean(x["seconds"] for x in r["runs"])
        accs = [100 * x["final_accuracy"] for x in r["runs"]]
        spread = f" ({min(accs):.2f}-{max(accs):.2f}, {len(accs)} runs)" if len(accs) > 1 else ""
        if sigma is None:
            eps = ["inf (no DP)"] * len(trainers)
            meets = "-"
        else:
            eps = [f"{r['runs'][0]['epsilon'][t]:.2f}" for t in trainers]
            ok = r["epsilon_max"] <= TARGET_EPSILON and gap >= -TARGET_POINTS
            meets = "yes" if ok else "no"
        label = "none (non-private)" if sigma is None else f"{sigma:g}"
        if _variant(r):
            label += f" ({_variant(r)})"
        lines.append(
            f"| {label} | {acc:.2f}%{spread} | {gap:+.2f} | "
            + " | ".join(eps)
            + f" | {meets} | {secs:.0f} |"
        )
    return lines


def write(rows: list[dict[str, Any]], rounds: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if not any(r["noise_multiplier"] is None for r in rows):  # a part: JSON only, no table
        (OUT / "privacy.json").write_text(json.dumps({"rounds": rounds, "rows": rows}) + "\n")
        return
    first = rows[0]["runs"][0]
    data = {
        "config": str(CONFIG.relative_to(ROOT)),
        "rounds": rounds,
        "delta": DELTA,
        "target": {"epsilon": TARGET_EPSILON, "points": TARGET_POINTS},
        "examples": first["examples"],
        "rows": rows,
    }
    (OUT / "privacy.json").write_text(json.dumps(data, indent=2) + "\n")
    md = [
        "# Differential privacy: accuracy against epsilon",
        "",
        "configs/best.yaml (SCAFFOLD + server Nesterov momentum, label smoothing 0.1), the seed's "
        f"split and budget: {rounds} rounds of 10 steps of expected batch 32 per trainer. DP-SGD "
        "on every trainer: per-example gradients clipped to L2 norm 1, Gaussian noise of the noise "
        "multiplier times that, Poisson-sampled batches (rate 32 / the trainer's examples: "
        + ", ".join(f"{k} {v}" for k, v in first["examples"].items())
        + f"). Epsilon per device at delta = {DELTA:g}, example-level, from the coordinator's "
        "ledger (dp-accounting RDP). Target: epsilon <= 2 within 1.5 points of the non-private "
        "run. In-process loop (no workers, no wire), the product's training and aggregation "
        "code; DP noise comes from the OS's entropy, so DP rows vary run to run.",
        "",
        *table(rows, rounds),
        "",
        "Reproduce: `nice -n 10 .venv/bin/python benchmarks/privacy.py`",
        "",
    ]
    (OUT / "privacy.md").write_text("\n".join(md))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    p.add_argument("--repeats", type=int, default=1, help="runs per DP setting (default 1)")
    p.add_argument("--rounds", type=int, help="override the config's 40 rounds (a quick look)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    p.add_argument("--private-only", action="store_true", help="skip the non-private run")
    p.add_argument("--merge", type=Path, nargs="+", help="combine these privacy.json parts")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, e.g. train.batch_size=512 (YAML value)",
    )
    args = p.parse_args()
    global OUT
    OUT = args.out or OUT
    if args.merge:
        print("\n".join(table(merge(args.merge), 40)))
        return
    sets = {}
    for item in args.set:
        key, _, value = item.partition("=")
        sets[key] = yaml.safe_load(value)
    result = measure(args.noise, args.repeats, args.rounds, args.private_only, sets)
    if not args.private_only:
        print("\n".join(table(result["rows"], args.rounds or 40)))


if __name__ == "__main__":
    main()
