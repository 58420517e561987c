"""Seed config through the product (flow, worker processes, MLflow) vs a bare in-process loop.

Both do the same training: same shards, same per-round sampling seeds, same learning rates, the
same aggregation and the same evaluations. The bare loop is one Python process with no Prefect,
no MLflow, no worker processes and no wire: the floor the product's overhead is measured against.
benchmarks/seed_phases.py breaks both down by phase (start-up, each step of a round, shutdown).

    .venv/bin/python benchmarks/seed_overhead.py [--config configs/seed.yaml] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcore.config import load_config  # noqa: E402
from fedcore.evaluation import evaluate  # noqa: E402
from fedcore.mnist import load_shard  # noqa: E402
from fedcore.model import build_model, initial_weights  # noqa: E402
from fedcore.protocol import TrainRequest, Update  # noqa: E402
from fedcore.seeding import derive_seed  # noqa: E402
from fedcore.strategies import build_strategy  # noqa: E402
from fedcore.training import train_local  # noqa: E402


def bare_loop(
    config: str,
    rounds: int | None,
    phases: dict[str, list[float]] | None = None,
    overrides: dict[str, object] | None = None,
) -> tuple[float, float | None]:
    """(seconds, final federated accuracy) of the training as one plain loop.

    `phases`, when given, collects seconds per step: "startup" (config and shards), and per
    round "round", "train" (every trainer, one after the other), "aggregate", "evaluate"."""
    start = time.perf_counter()
    marks: dict[str, list[float]] = phases if phases is not None else {}
    cfg = load_config(config, {**(overrides or {}), **({"rounds": rounds} if rounds else {})})
    torch.set_num_threads(1)
    shards = {w.name: load_shard(str(cfg.data_dir_for(w)), w.shard()) for w in cfg.workers}
    strategy = build_strategy(cfg.strategy)
    groups = cfg.digit_groups()
    weights = initial_weights(cfg.seed)
    model = build_model(weights)
    final = None
    marks.setdefault("startup", []).append(time.perf_counter() - start)
    for rnd in range(1, cfg.rounds + 1):
        t_round = time.perf_counter()
        plan = cfg.train.plan(rnd)
        updates = []
        for w in cfg.trainers:
            model.load_state_dict(weights)
            x, y = shards[w.name]
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, w.name, rnd))
            metrics = train_local(model, x, y, plan, gen)
            new = {k: v.detach().clone() for k, v in model.state_dict().items()}
            updates.append(Update(w.name, rnd, new, y.numel(), metrics))
        t_trained = time.perf_counter()
        weights = strategy.aggregate(rnd, weights, updates, [])
        t_aggregated = time.perf_counter()
        if cfg.evaluators and cfg.evaluation.due(rnd, cfg.rounds):
            torch.set_num_threads(cfg.evaluators[0].threads or 2)
            x, y = shards[cfg.evaluators[0].name]
            models = {u.worker: u.weights for u in updates} if cfg.evaluation.workers else {}
            models["federated"] = weights
            for name, wts in models.items():
                model.load_state_dict(wts)
                res = evaluate(model, x, y, groups)
                if name == "federated":
                    final = res.accuracy
            torch.set_num_threads(1)
        _ = TrainRequest  # same messages exist; the bare loop just never encodes them
        t_done = time.perf_counter()
        for key, value in (
            ("round", t_done - t_round),
            ("train", t_trained - t_round),
            ("aggregate", t_aggregated - t_trained),
            ("evaluate", t_done - t_aggregated),
        ):
            marks.setdefault(key, []).append(value)
    return time.perf_counter() - start, final


def product(config: str, rounds: int | None) -> tuple[float, float | None]:
    """(seconds, final federated accuracy) of `fedmnist run` in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [
            str(ROOT / ".venv" / "bin" / "fedmnist"),
            "run",
            config,
            "--summary-json",
            str(summary),
        ]
        if rounds:
            cmd += ["--rounds", str(rounds)]
        start = time.perf_counter()
        subprocess.run(
            cmd,
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ),
        )
        took = time.perf_counter() - start
        return took, json.loads(summary.read_text())["final_accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/seed.yaml", help="experiment (configs/seed.yaml)")
    p.add_argument("--rounds", type=int, help="override the rounds (default: the config's)")
    args = p.parse_args()
    flow_s, flow_acc = product(args.config, args.rounds)
    bare_s, bare_acc = bare_loop(args.config, args.rounds)
    print(f"{'':24}{'wall s':>10}{'final acc':>12}")
    print(f"{'flow + workers + MLflow':24}{flow_s:>10.1f}{100 * (flow_acc or 0):>11.2f}%")
    print(f"{'bare in-process loop':24}{bare_s:>10.1f}{100 * (bare_acc or 0):>11.2f}%")
    print(f"ratio flow/bare: {flow_s / bare_s:.2f}")


if __name__ == "__main__":
    main()
