"""What the MLflow record costs a training: round times with tracking on vs off.

Off is `tracking.enabled: false` (the null tracker). Runs the flow in this process (one temporary
Prefect server for all runs), alternating off/on so drift on a loaded machine hits both alike.
Each run's tracker is wrapped to timestamp the flow's calls, so the numbers are the flow's own:
`round_seconds` (what the flow logs: round start to the metrics call), the training loop's wall
time (store ready -> last round logged), the wait for the store before round 1, and `close()`
after the last round (figures, queue drain, end of run). Tracking writes to a fresh SQLite store
under a temporary FEDMNIST_HOME, migrated before timing starts (a store's first use costs 5-8 s,
once).

    .venv/bin/python benchmarks/tracking_overhead.py [--config configs/seed.yaml] [--rounds N]
        [--repeats 2] [--data-dir D]

Acceptance: the mean round time with tracking is within 10% of without (ratio <= 1.10).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class TimedTracker:
    """Forwards every call to the real (or null) tracker, noting when the flow made it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.round_seconds: dict[int, float] = {}
        self.logged_at: dict[int, float] = {}
        self.ready_seconds = 0.0
        self.ready_at = 0.0
        self.close_seconds = 0.0

    def ensure_ready(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner.ensure_ready(*args, **kwargs)
        finally:
            self.ready_at = time.perf_counter()
            self.ready_seconds = self.ready_at - started

    def log_metrics(self, metrics: Any, step: int) -> None:
        self.logged_at[step] = time.perf_counter()
        self.round_seconds[step] = float(metrics["round_seconds"])
        self.inner.log_metrics(metrics, step)

    def close(self, *args: Any, **kwargs: Any) -> list[str]:
        started = time.perf_counter()
        try:
            return self.inner.close(*args, **kwargs)
        finally:
            self.close_seconds = time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def one_run(config: str, overrides: dict[str, Any], tracking: bool) -> tuple[TimedTracker, dict]:
    import flows.federated as federated
    from flows.cli import flow_arguments
    from tasks.tracking import make_tracker

    made: list[TimedTracker] = []

    def timed_make_tracker(cfg: Any) -> TimedTracker:
        made.append(TimedTracker(make_tracker(cfg)))
        return made[-1]

    federated.make_tracker = timed_make_tracker  # type: ignore[assignment]
    summary = federated.federated_mnist(
        **flow_arguments(config, {**overrides, "tracking.enabled": tracking})
    )
    return made[0], summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/seed.yaml", help="(default: configs/seed.yaml)")
    ap.add_argument("--rounds", type=int, help="override the rounds (default: the config's)")
    ap.add_argument("--repeats", type=int, default=2, help="off/on pairs (default: 2)")
    ap.add_argument("--data-dir", help="MNIST directory (default: $FEDMNIST_HOME/data/mnist)")
    args = ap.parse_args()

    from fedcore.config import default_data_dir, load_config

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    overrides: dict[str, Any] = {"data_dir": str(data_dir)}
    if args.rounds:
        overrides["rounds"] = args.rounds
    cfg = load_config(ROOT / args.config, overrides)
    evaluated = {r for r in range(1, cfg.rounds + 1) if cfg.evaluation.due(r, cfg.rounds)}

    with tempfile.TemporaryDirectory(prefix="fedmnist-bench-") as tmp:
        os.environ["FEDMNIST_HOME"] = tmp
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        from mlflow.tracking import MlflowClient

        from tasks.tracking import default_tracking_uri

        MlflowClient(default_tracking_uri()).search_experiments()  # migrate the new store now

        results: dict[bool, list[TimedTracker]] = {False: [], True: []}
        for i in range(args.repeats):
            for tracking in (False, True):
                t, summary = one_run(str(ROOT / args.config), overrides, tracking)
                results[tracking].append(t)
                rounds = list(t.round_seconds.values())
                print(
                    f"pair {i + 1} tracking {'on ' if tracking else 'off'}: "
                    f"mean round {statistics.mean(rounds):.3f}s, "
                    f"loop {t.logged_at[max(t.logged_at)] - t.ready_at:.2f}s, "
                    f"store wait {t.ready_seconds:.2f}s, close {t.close_seconds:.2f}s, "
                    f"final accuracy {summary['final_accuracy']}",
                    flush=True,
                )

    def mean_round(ts: list[TimedTracker], which: set[int] | None = None) -> float:
        return statistics.mean(
            s for t in ts for r, s in t.round_seconds.items() if which is None or r in which
        )

    def loop(ts: list[TimedTracker]) -> float:
        return statistics.mean(t.logged_at[max(t.logged_at)] - t.ready_at for t in ts)

    plain = set(range(1, cfg.rounds + 1)) - evaluated
    on, off = results[True], results[False]
    models = [s for t in on for s in getattr(t.inner, "model_seconds", [])]
    print()
    print(f"{'':34}{'off':>9}{'on':>9}{'on/off':>9}")
    for label, a, b in (
        ("mean round_seconds, all rounds", mean_round(off), mean_round(on)),
        ("  rounds without evaluation", mean_round(off, plain), mean_round(on, plain)),
        ("  evaluation rounds", mean_round(off, evaluated), mean_round(on, evaluated)),
        ("training loop wall time", loop(off), loop(on)),
    ):
        print(f"{label:34}{a:9.3f}{b:9.3f}{b / a:9.3f}")
    print(
        f"store wait before round 1: {statistics.mean(t.ready_seconds for t in on):.2f}s; "
        f"close() after the last round: {statistics.mean(t.close_seconds for t in on):.2f}s; "
        f"logging + registering one model (tracking thread): "
        f"{statistics.mean(models) if models else float('nan'):.2f}s over {len(models)} models"
    )
    ratio = mean_round(on) / mean_round(off)
    print(f"overhead ratio (mean round time, tracking on / off): {ratio:.3f}")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
