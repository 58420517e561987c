"""Final test accuracy of each aggregation rule when one of three workers lies every round.

(Past 400 lines: a script run by path; its in-process loop and its lab mode share the runs'
table, the attack and the strategies, so they stay in one file.)

One worker (charlie) returns, every round, w' = g + s (w - g) instead of its trained model w (g:
the round's global model): s = -5 ("scale": a flipped and boosted update, 5x the honest distance,
inside the screening's factor 10 so that the rule, not the screening, has to cope with it) or
s = -1 ("signflip": an update of honest size pointing the wrong way). The rows: the fault-free
`mean` (the reference) and `median`, then `mean`, `median`, `trimmed-mean` (beta 1/3) and
`clipped-mean` (bound: the round's median norm) under each attack, and `mean` and `clipped-mean`
under s = 8 ("boost": the honest direction, 8x as far: the model-replacement attack that norm
clipping is meant for; clipping bounds how far an update moves the model, not which way).
Then the median composed with server momentum 0.5 under the sign flip, next to its fault-free
counterpart (the mean with the same momentum, `fedavgm`); centered clipping (`center: median`,
Karimireddy et al. 2021) alone and with momentum 0.5; `cc-3+m0.5`, three steps of centered
clipping (the paper's Algorithm 2, `iterations: 3`) with momentum 0.5, the clipping recipe; each
momentum recipe's own fault-free run; and `fedavgm-0.5` with charlie's update left out
("absent"), the ceiling of any rule under an attack: the two honest updates alone.

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
tests/faults/test_byzantine.py (short trainings), and `--lab`.

`--lab` runs the seed budget through the product instead: the SSH lab (fedlab: one sshd and
Linux user per device on loopback, IID thirds, an evaluator holding the test set, under `flock
/tmp/fedmnist-lab.lock`), `fedmnist run` on configs/robust.yaml with each run's strategy, MLflow
off; charlie's device runs tests/faults/lying_worker.py, the real worker whose update is replaced
by g + s (w - g) every round (the same arithmetic as `lie` below), so the two loops can be
compared number for number. Its runs (`LAB_RUNS`, or --only) go to
benchmarks/results/robust_lab.{md,json}, with the same table.

    .venv/bin/python benchmarks/robust_accuracy.py [--rounds 40] [--data-dir D]
        [--steps 10] [--only mean/none,median/scale] [--out benchmarks/results/robust_accuracy.md]
        [--reuse]    # keep the runs of that budget already in the --out file's .json twin
        [--lab]      # over the SSH lab; --out defaults to benchmarks/results/robust_lab.md
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

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
# "absent": charlie's update left out every round, the two honest ones aggregated: what a rule
# that recognised the attacker perfectly would get, the ceiling for any rule under an attack
ATTACKS: dict[str, float | None] = {
    "none": None,
    "scale": -5.0,
    "signflip": -1.0,
    "boost": 8.0,
    "absent": 0.0,
}
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
    "cc-3+m0.5": {
        "name": "clipped-mean",
        "weighting": "unweighted",
        "center": "median",
        "iterations": 3,
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
RUNS += [("median+m0.5", "none"), ("centered-clip+m0.5", "none")]
RUNS += [("fedavgm-0.5", "absent")]
RUNS += [("cc-3+m0.5", a) for a in ("none", "signflip", "scale")]
SCORED = (10, 20, 30, 40)
LAB_LOCK = "/tmp/fedmnist-lab.lock"
FEDMNIST = str(ROOT / ".venv" / "bin" / "fedmnist")
LAB_RUNS = [("mean", "none"), ("median+m0.5", "signflip"), ("median+m0.5", "scale")]
LAB_RUNS += [("cc-3+m0.5", "signflip"), ("cc-3+m0.5", "scale")]
LAB_TRAINERS = ("alice", "bob", "charlie")


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
            if name == ATTACKER and attack == "absent":
                continue
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


# -- over the SSH lab ------------------------------------------------------------------------------


@contextmanager
def lab_devices(data_dir: str) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """The SSH lab up (under the lab lock) with IID thirds and an evaluator; the trainers run the
    lying worker. Yields (lab folder, its inventory); the lab is torn down on leaving."""
    sys.path.insert(0, str(ROOT / "tests" / "faults"))
    import liar_install  # puts the fault suite's liar on the lab (without importing it)

    from fedcore.shards import ShardSpec
    from fedlab import lab_down, lab_up

    done = subprocess.run(
        [str(ROOT / "scripts" / "install-sshd.sh")], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"sshd cannot be installed: {done.stderr.strip()[-300:]}")
    shards = {n: ShardSpec.iid(i, len(LAB_TRAINERS), seed=1) for i, n in enumerate(LAB_TRAINERS)}
    shards["testing"] = ShardSpec(split="test")
    with open(LAB_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as `flock /tmp/fedmnist-lab.lock`: one lab at a time
        # in the temp folder, beside the shared device venv (fedlab.ensure_lab_python), which
        # is built once for every lab; 755: the lab users must enter it
        lab_dir = Path(tempfile.mkdtemp(prefix="fedmnist-robust-lab-"))
        lab_dir.chmod(0o755)
        try:
            info = lab_up(lab_dir, shards, Path(data_dir), evaluator="testing")
            liar = liar_install.install(lab_dir, info.python)
            workers = yaml.safe_load(info.inventory.read_text())["workers"]
            for w in workers:
                if w["role"] == "trainer":
                    w["ssh"]["python"] = liar
            yield lab_dir, workers
        finally:
            lab_down(lab_dir)
            shutil.rmtree(lab_dir, ignore_errors=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_lab(
    lab_dir: Path,
    workers: list[dict[str, Any]],
    budget: dict[str, int],
    strategy: str,
    attack: str,
) -> dict[str, Any]:
    """One training of configs/robust.yaml with `strategy` through `fedmnist run` over the lab,
    charlie lying with `attack` every round; accuracy at the scored rounds from the flow's own
    evaluations."""
    raw = yaml.safe_load((ROOT / "configs" / "robust.yaml").read_text())
    rounds = budget["rounds"]
    raw.update(
        name=f"robust-lab-{strategy.replace('+', '-')}-{attack}",
        rounds=rounds,
        strategy=STRATEGIES[strategy],
        workers=workers,
        tracking={"enabled": False},
    )
    raw["train"]["steps"] = budget["train.steps"]
    raw["evaluation"]["rounds"] = sorted({r for r in SCORED if r < rounds} | {rounds})
    home = lab_dir / "homes" / raw["name"]
    (home / "configs").mkdir(parents=True, exist_ok=True)
    config = home / "configs" / f"{raw['name']}.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    markers = lab_dir / "fault-markers" / raw["name"]
    markers.mkdir(parents=True, exist_ok=True)
    markers.chmod(0o1777)
    markers.parent.chmod(0o755)
    scale = ATTACKS[attack]
    cues = {"FEDMNIST_FAULT_DIR": str(markers), "FEDMNIST_FAULT_ALWAYS": "1"}
    if scale is not None:
        cues[f"FEDMNIST_FAULT_{ATTACKER.upper()}"] = (
            "signflip@*" if attack == "signflip" else f"scale:{scale:g}@*"
        )
    (lab_dir / "faults.env").write_text("".join(f"export {k}='{v}'\n" for k, v in cues.items()))
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_HOME=str(home / "prefect"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    summary_path = home / "summary.json"
    started = time.perf_counter()
    done = subprocess.run(
        [FEDMNIST, "run", str(config), "--summary-json", str(summary_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    seconds = time.perf_counter() - started
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    if done.returncode != 0 or not summary_path.is_file():
        raise RuntimeError(
            f"{raw['name']}: fedmnist run exited {done.returncode}:\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    summary = json.loads(summary_path.read_text())
    accuracy = {int(r): accs["federated"] for r, accs in summary["evaluations"].items()}
    output = done.stdout + done.stderr
    return {
        "strategy": strategy,
        "attack": attack,
        "accuracy": accuracy,
        "screened": output.count(f"update from {ATTACKER} rejected"),
        "seconds": seconds,
    }


def table(
    runs: list[dict[str, Any]], rounds: int, done: dict[tuple[str, str], dict[str, Any]]
) -> list[str]:
    """The markdown rows: accuracy at the scored rounds, the gap to the fault-free `mean` and to
    the same strategy's fault-free run (where it was run)."""
    scored = [r for r in SCORED if r < rounds] + [rounds]
    head = "| strategy | attack (charlie, every round) | " + " | ".join(f"r{r}" for r in scored)
    lines = [
        head + " | vs fault-free mean | vs its own fault-free run | updates screened out |",
        "|---|---|" + "---|" * len(scored) + "---|---|---|",
    ]
    ref = done.get(("mean", "none"))
    for r in runs:
        acc = r["accuracy"]
        cells = " | ".join(f"{100 * acc[k]:.2f}" for k in scored)
        diff = "" if ref is None else f"{100 * (acc[rounds] - ref['accuracy'][rounds]):+.2f}"
        own = done.get((r["strategy"], "none"))
        mine = "" if own is None else f"{100 * (acc[rounds] - own['accuracy'][rounds]):+.2f}"
        if r["attack"] == "none":
            what = "none"
        elif r["attack"] == "absent":
            what = "absent (left out: the ceiling)"
        else:
            what = f"{r['attack']} (s = {ATTACKS[r['attack']]:g})"
        lines.append(f"| {r['strategy']} | {what} | {cells} | {diff} | {mine} | {r['screened']} |")
    return lines


def same_as_in_process(runs: list[dict[str, Any]], path: Path) -> str:
    """Which lab runs give the in-process loop's accuracy at every scored round (the same
    arithmetic through the product: the flow, the wire, the lab's devices)."""
    if not path.is_file():
        return "No in-process results to compare with"
    local = {
        (r["strategy"], r["attack"], r["rounds"], r["steps"]): {
            int(k): v for k, v in r["accuracy"].items()
        }
        for r in json.loads(path.read_text())
    }
    pairs = [(r, local.get((r["strategy"], r["attack"], r["rounds"], r["steps"]))) for r in runs]
    compared = [(r, acc) for r, acc in pairs if acc is not None]
    same = [r for r, acc in compared if acc == r["accuracy"]]
    differ = ", ".join(f"{r['strategy']}/{r['attack']}" for r, acc in compared if r not in same)
    text = (
        f"{len(same)} of {len(compared)} runs give exactly the in-process loop's accuracy "
        "(`robust_accuracy.md`) at every scored round"
    )
    return text + (f"; not: {differ}" if differ else "")


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
        default=None,
        help="the table (default: benchmarks/results/robust_accuracy.md, with --lab "
        "robust_lab.md; and its .json)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the runs the .json already has (default: run all again)",
    )
    parser.add_argument(
        "--lab",
        action="store_true",
        help="through `fedmnist run` over the SSH lab (default: the in-process loop)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    budget = {"rounds": args.rounds, "train.steps": args.steps}
    cfg = load_config(ROOT / "configs" / "robust.yaml", budget)
    name = "robust_lab.md" if args.lab else "robust_accuracy.md"
    out = Path(args.out or ROOT / "benchmarks" / "results" / name)
    json_path = out.with_suffix(".json")
    kept = json.loads(json_path.read_text()) if args.reuse and json_path.is_file() else []
    kept = [r for r in kept if (r["rounds"], r["steps"]) == (args.rounds, args.steps)]
    for r in kept:
        r["accuracy"] = {int(k): v for k, v in r["accuracy"].items()}  # JSON keys are strings
    done = {(r["strategy"], r["attack"]): r for r in kept}
    all_runs = LAB_RUNS if args.lab else RUNS
    chosen = [tuple(p.split("/")) for p in args.only.split(",") if p] or all_runs
    todo = [pair for pair in chosen if pair not in done]

    def record(r: dict[str, Any]) -> None:
        r.update(rounds=args.rounds, steps=args.steps)
        done[(r["strategy"], r["attack"])] = r
        final = r["accuracy"][args.rounds]
        print(
            f"{r['strategy']}/{r['attack']}: {100 * final:.2f}% ({r['seconds']:.0f} s)", flush=True
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(list(done.values()), indent=1))

    if args.lab and todo:
        with lab_devices(args.data_dir) as (lab_dir, workers):
            for strategy, attack in todo:
                record(run_lab(lab_dir, workers, budget, strategy, attack))
    else:
        for strategy, attack in todo:
            record(run(cfg, strategy, attack, args.data_dir))
    order = {pair: i for i, pair in enumerate(all_runs)}
    runs = sorted(done.values(), key=lambda r: order.get((r["strategy"], r["attack"]), len(order)))
    lines = table(runs, args.rounds, done)
    print("\n".join(lines))
    where = (
        "through `fedmnist run` over the SSH lab (charlie's device runs the lying worker)"
        if args.lab
        else "the coordinator's steps in one process"
    )
    if args.lab:
        where += ". " + same_as_in_process(runs, out.with_name("robust_accuracy.json"))
    out.write_text(
        "# Accuracy under a lying worker\n\nFederated test accuracy (%, 10,000 images); IID "
        f"shards, {args.rounds} rounds of {args.steps} batches of 32; one of three workers lies "
        f"every round; {where}. `benchmarks/robust_accuracy.py{' --lab' if args.lab else ''}`. "
        "Two references: the fault-free seed recipe (`mean`, no server momentum: the seed's "
        "own aggregation) and the same strategy without the attack (where that run is in the "
        "table; `fedavgm-0.5` is the fault-free mean with the recipes' server momentum 0.5)."
        "\n\n" + "\n".join(lines) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
