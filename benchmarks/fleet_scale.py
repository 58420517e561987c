"""How far one coordinator scales: its time and memory per worker-round at 3, 10 and 30 trainers.

A fleet of N trainers (IID parts of MNIST's training set, one torch thread each, 2 local steps
of 32 images, so a worker's own compute is tiny), no evaluator, streaming settings
(`screening.norm_factor: 0`, no worker model scored: configs/fleet-10.yaml's), trains `--rounds`
rounds through the product (`fedmnist run`: Prefect's temporary server, MLflow SQLite). While it
runs, /proc is sampled every 50 ms: the coordinator process's CPU seconds and resident memory,
and the CPU of its other children that are not workers (the temporary Prefect server, which
takes every task run's states, events and log lines). Round 1 (every worker's warm-up) is left
out: the window runs from round 1's record (its timeline line's wall clock) to the last round's.

- coordinator ms per worker-round: the coordinator's CPU in the window / (N x rounds);
  the Prefect server's likewise (what the same per-worker task runs cost it);
- round wall: the median of the rounds' wall times in the window;
- peak RSS: the coordinator's largest resident memory in the window, and its slope per added
  worker between fleet sizes (target: below one model, 1.7 MB); RSS at round 1: its resident
  memory at round 1's record, where the window starts (peak minus it: what the rounds added).

`--repeats K`: K runs of every size and version, alternated; a row gives each figure's median
and every run's peak RSS (a run's peak moves by several MB from run to run, as much as a few
added workers' share). `--before DIR`: an earlier checkout (for example `git archive HEAD |
tar -x -C DIR`) runs the same configs alternately, side by side. `--lab N`: also N devices of
the SSH lab (fedlab, real sshd, one Linux user each, under `flock /tmp/fedmnist-lab.lock`), the
coordinator the same.

    .venv/bin/python benchmarks/fleet_scale.py [--sizes 3,10,30] [--rounds 8] [--repeats 3]
        [--lab 10] [--before DIR [--before-name before]] [--out benchmarks/results/fleet_scale]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcore.config import default_data_dir  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LAB_LOCK = "/tmp/fedmnist-lab.lock"
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
MODEL_MB = 1.72  # the seed's CNN in float32 (431,080 parameters)


def fleet_config(workers: list[dict[str, Any]], rounds: int, path: Path, name: str) -> Path:
    """A config of `workers` (trainers only) with configs/fleet-10.yaml's settings."""
    config = {
        "name": name,
        "seed": 1,
        "rounds": rounds,
        "train": {"steps": 2, "batch_size": 32, "lr": 0.1},
        "strategy": {"name": "fedavg"},
        "evaluation": {"workers": False},
        "screening": {"norm_factor": 0},
        "timeouts": {"start": 900, "train": 600},
        "tracking": {"registered_model": None},
        "workers": workers,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def local_workers(n: int) -> list[dict[str, Any]]:
    return [
        {"name": f"w{i:02d}", "iid": {"index": i, "count": n, "seed": 1}, "threads": 1}
        for i in range(n)
    ]


def _stat(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, resident KiB) of `pid`, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK, int(statm[1]) * PAGE_KB


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _is_worker(pid: int) -> bool:
    try:
        return b"fedcore.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


class Sampler(threading.Thread):
    """The coordinator's CPU and RSS, and its non-worker children's CPU, every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float, int, float]] = []  # wall, cpu, rss KiB, server
        self.server: dict[int, float] = {}  # child pid -> its last CPU seconds
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            own = _stat(self.pid)
            if own is None:
                return
            for child in _children(self.pid):
                if child not in self.server and _is_worker(child):
                    continue
                got = _stat(child)
                if got is not None:
                    self.server[child] = got[0]
            self.samples.append((time.time(), own[0], own[1], sum(self.server.values())))


def run_fleet(root: Path, config: Path, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """One `fedmnist run` of the checkout at `root`, sampled; its per-round figures."""
    with tempfile.TemporaryDirectory(prefix="fedmnist-scale-") as tmp:
        base = Path(tmp)
        env = dict(os.environ, FEDMNIST_HOME=str(base / "home"), PREFECT_HOME=str(base / "pf"))
        env.pop("PREFECT_API_URL", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        env["PYTHONPATH"] = str(root)
        # a loaded machine can take more than Prefect's default 60 s to start its server
        env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
        env.update(extra_env or {})
        cmd = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]
        cmd += ["run", str(config), "--set", f"data_dir={default_data_dir()}"]
        cmd += ["--summary-json", str(base / "summary.json")]
        out = open(base / "out.txt", "w")
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
        out.close()
        if rc != 0:
            text = (base / "out.txt").read_text()
            raise RuntimeError(f"fedmnist run failed in {root}:\n{text[-3000:]}")
        summary = json.loads((base / "summary.json").read_text())
        lines = (Path(summary["checkpoint_dir"]) / "timeline.jsonl").read_text().splitlines()
        rounds = [json.loads(line) for line in lines]
    return figures(rounds, sampler.samples)


def figures(rounds: list[dict[str, Any]], samples: list[tuple]) -> dict[str, Any]:
    start, end = rounds[0]["wall"], rounds[-1]["wall"]
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2:
        raise RuntimeError("too few samples inside the round window; run more rounds")
    counted = len(rounds) - 1
    walls = [b["wall"] - a["wall"] for a, b in zip(rounds, rounds[1:], strict=False)]
    n = len(rounds[-1]["updates"])
    cpu = inside[-1][1] - inside[0][1]
    server = inside[-1][3] - inside[0][3]
    before = [s for s in samples if s[0] <= start]
    return {
        "trainers": n,
        "rounds_counted": counted,
        "round_wall_s": statistics.median(walls),
        "coordinator_ms_per_worker_round": 1000 * cpu / (n * counted),
        "prefect_server_ms_per_worker_round": 1000 * server / (n * counted),
        "peak_rss_mb": max(s[2] for s in inside) / 1024,
        "rss_at_round_1_mb": (before[-1][2] if before else inside[0][2]) / 1024,
        # the largest RSS in each round after the first (between two rounds' records): whether
        # the rounds keep adding memory or the peak is one round's
        "peak_rss_by_round_mb": [
            max((s[2] for s in inside if a["wall"] <= s[0] <= b["wall"]), default=0) / 1024
            for a, b in zip(rounds, rounds[1:], strict=False)
        ],
        "fold_s": statistics.median(r["phases"].get("fold", 0.0) for r in rounds[1:]),
        "aggregate_s": statistics.median(r["phases"]["aggregate"] for r in rounds[1:]),
        "compute_s": statistics.median(r["phases"]["compute"] for r in rounds[1:]),
        "load": os.getloadavg(),
    }


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs of one size and version as one row: each figure's median over the runs
    (the per-round peaks and the load those of the run of median peak RSS), and every run's
    peak RSS, so the spread shows."""
    ranked = sorted(rows, key=lambda r: r["peak_rss_mb"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    for key, value in rows[0].items():
        if isinstance(value, float):
            row[key] = statistics.median(r[key] for r in rows)
    row["peak_rss_runs_mb"] = [r["peak_rss_mb"] for r in rows]
    return row


def lab_workers(n: int, data_dir: Path, lab_dir: Path) -> list[dict[str, Any]]:
    """N lab devices up in `lab_dir`, each with an IID part; their inventory, one thread each."""
    from fedcore.shards import ShardSpec
    from fedlab import lab_up

    shards = {f"d{i:02d}": ShardSpec.iid(i, n, 1, "train") for i in range(n)}
    info = lab_up(lab_dir, shards, data_dir)
    workers = yaml.safe_load(info.inventory.read_text())["workers"]
    for w in workers:
        w["threads"] = 1
    return workers


def run_lab(n: int, rounds: int, tmp: Path) -> dict[str, Any]:
    from fedlab import lab_down

    done = subprocess.run(
        [str(ROOT / "scripts" / "install-sshd.sh")], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"sshd cannot be installed: {done.stderr.strip()[-300:]}")
    with open(LAB_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as `flock /tmp/fedmnist-lab.lock`: one lab at a time
        lab_dir = Path(tempfile.mkdtemp(prefix="fedmnist-fleet-lab-"))
        lab_dir.chmod(0o755)  # the lab users must enter it
        try:
            workers = lab_workers(n, default_data_dir(), lab_dir)
            config = fleet_config(workers, rounds, tmp / f"lab-{n}.yaml", f"fleet-lab-{n}")
            return run_fleet(ROOT, config)
        finally:
            lab_down(lab_dir)
            shutil.rmtree(lab_dir, ignore_errors=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="3,10,30", help="local fleet sizes (3,10,30)")
    p.add_argument("--rounds", type=int, default=8, help="rounds per run (8; round 1 not counted)")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per size and version, alternated (1)"
    )
    p.add_argument("--lab", type=int, default=0, help="also this many SSH lab devices (0: none)")
    p.add_argument("--before", type=Path, help="an earlier checkout, run alternately")
    p.add_argument("--before-name", default="before", help="its name in the table (before)")
    p.add_argument("--out", type=Path, default=RESULTS / "fleet_scale", help="results stem")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    variants = {"product": ROOT} | (
        {args.before_name: args.before.resolve()} if args.before else {}
    )
    table: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(prefix="fedmnist-scale-cfg-") as tmp:
        for n in sizes:
            config = fleet_config(local_workers(n), args.rounds, Path(tmp) / f"f{n}.yaml", f"f{n}")
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
            for _ in range(args.repeats):
                for name, root in variants.items():
                    row = run_fleet(root, config)
                    runs[name].append(row)
                    print(name, json.dumps(row), flush=True)
            for name, rows in runs.items():
                table[name].append(median_row(rows))
        if args.lab:
            row = run_lab(args.lab, args.rounds, Path(tmp))
            table["product (SSH lab)"] = [row]
            print("lab", json.dumps(row), flush=True)
    for rows in table.values():
        for a, b in zip(rows, rows[1:], strict=False):
            added = b["trainers"] - a["trainers"]
            b["rss_mb_per_added_worker"] = (b["peak_rss_mb"] - a["peak_rss_mb"]) / added
    result = {
        "rounds": args.rounds,
        "sizes": sizes,
        "repeats": args.repeats,
        "table": table,
        "load": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Fleet scale: one coordinator, {result['rounds']} rounds of 2 local steps "
        f"(round 1 left out), the median of {result.get('repeats', 1)} run(s) each",
        "",
        "| version | trainers | round wall s (median) | coordinator CPU ms per worker-round "
        "| Prefect server CPU ms per worker-round | coordinator RSS MB at round 1 "
        "| coordinator peak RSS MB (each run) | RSS MB per added worker | fold s | aggregate s "
        "| load average (1, 5, 15 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in result["table"].items():
        for r in rows:
            per = r.get("rss_mb_per_added_worker")
            runs = ", ".join(f"{x:.0f}" for x in r.get("peak_rss_runs_mb", [r["peak_rss_mb"]]))
            lines.append(
                f"| {name} | {r['trainers']} | {r['round_wall_s']:.3f} "
                f"| {r['coordinator_ms_per_worker_round']:.1f} "
                f"| {r['prefect_server_ms_per_worker_round']:.1f} | {r['rss_at_round_1_mb']:.0f} "
                f"| {r['peak_rss_mb']:.0f} ({runs}) "
                f"| {'' if per is None else f'{per:.2f}'} | {r['fold_s']:.3f} "
                f"| {r['aggregate_s']:.3f} | {', '.join(f'{x:.1f}' for x in r['load'])} |"
            )
    lines += [
        "",
        f"Targets (issue 15): coordinator time per worker-round < 25 ms; peak RSS growing by less "
        f"than one model ({MODEL_MB} MB) per added worker. A shared 2-core machine: the "
        "figures move with its load. Reproduce: `.venv/bin/python benchmarks/fleet_scale.py`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
