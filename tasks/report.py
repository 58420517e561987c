"""A training's report: one self-contained HTML page to share, built from its run folder alone.

`fedmnist report RUN` writes it. The page holds a summary (config name, strategy, schedule,
rounds, final federated accuracy, elapsed time, MLflow run id), the figures drawn from the run
folder's `evaluations.jsonl` (accuracy of every model by round, the federated model's confusion
matrix, group shares; embedded as base64 PNG, so the page needs no other file and no network),
the accuracy of every model at every evaluated round, a per-device table and the config.

What it reads, all in the run folder (`runs/<time>-<name>-<flow run>/`): `state.json` (config,
last round, its metrics, MLflow run id: fedcore/resume.py), `timeline.jsonl` (which devices'
updates made each round) and `devices.jsonl` (each device's hello: Python, torch, CUDA, memory,
secure aggregation and DP-SGD readiness; both fedcore/timeline.py) and `evaluations.jsonl`
(tasks/figures.py). A run
folder may come from someone else, so each file is size-bounded before it is read, values are
type-checked where they are used, and every value on the page is HTML-escaped; nothing in the
folder is executed and no model is loaded.

About 470 lines on purpose: reading the records, turning them into rows and writing the page
(with its small style sheet) are one concern, the shared page, and are read together.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedcore import timeline
from fedcore.evaluation import EvalResult
from fedcore.report import model_label
from fedcore.shards import format_labels
from fedcore.timeline import DEVICES_FILE, TIMELINE_FILE
from tasks import figures
from tasks.figures import RunFolderError
from tasks.tracking.naming import FEDERATED

STATE_FILE = "state.json"  # fedcore.resume.STATE_FILE, kept without importing torch
REPORT_FILE = "report.html"
MAX_STATE_BYTES = 16 * 1024 * 1024
MAX_TIMELINE_BYTES = 64 * 1024 * 1024
MAX_WORKERS = 1000
FACT_CHARS = 120  # of one hello value shown


def _read_bounded(path: Path, limit: int) -> str:
    size = path.stat().st_size
    if size > limit:
        raise RunFolderError(
            f"{path} is {size} bytes, more than the {limit} a run folder's record can take; "
            "it is not a training's record: give the run folder `fedmnist run` wrote"
        )
    return path.read_bytes()[:limit].decode("utf-8", "replace")


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run folder's `state.json` (the last completed round).

    Raises:
        RunFolderError: no state.json, too large, or not a JSON object with a config.
    """
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise RunFolderError(
            f"{run_dir} holds no {STATE_FILE}: not a run folder, or its training stopped before "
            "its first round; run folders are under $FEDMNIST_HOME/runs"
        )
    try:
        state = json.loads(_read_bounded(path, MAX_STATE_BYTES))
    except ValueError as exc:
        raise RunFolderError(f"{path} is not JSON ({exc}); the file is damaged") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise RunFolderError(f"{path} is not a training's state (no config object)")
    return state


def read_record(run_dir: Path, file: str) -> list[dict[str, Any]]:
    """Every complete line of the run folder's `file` (`timeline.jsonl`, `devices.jsonl`), read
    by fedcore.timeline.read (size-bounded, a torn last line left out).

    Raises:
        RunFolderError: too large, or a line other than the last is not a JSON object.
    """
    try:
        return timeline.read(run_dir, file, MAX_TIMELINE_BYTES)
    except ValueError as exc:
        raise RunFolderError(str(exc)) from None


# -- values as text -----------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _percent(value: Any) -> str:
    v = _number(value)
    return "-" if v is None else f"{100 * v:.2f}%"


def _fixed(value: Any, digits: int) -> str:
    v = _number(value)
    return "-" if v is None else f"{v:.{digits}f}"


def _bytes(value: Any) -> str:
    v = _number(value)
    if v is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(v) < 1000 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1000
    return "-"


def _duration(value: Any) -> str:
    v = _number(value)
    if v is None:
        return "-"
    minutes, seconds = divmod(v, 60)
    return f"{int(minutes)} min {seconds:.0f} s" if minutes else f"{seconds:.1f} s"


def shard_text(worker: Mapping[str, Any]) -> str:
    """A worker's shard as the config states it: `digits 0-3`, `iid part 2 of 5`, `test set`."""
    labels = worker.get("labels")
    if isinstance(labels, list) and labels and all(isinstance(d, int) for d in labels):
        return f"digits {format_labels(labels)}"
    iid = worker.get("iid")
    if isinstance(iid, dict) and "index" in iid and "count" in iid:
        return f"iid part {iid.get('index')} of {iid.get('count')}"
    if worker.get("role") == "evaluator":
        return "test set"
    split = worker.get("split")
    return f"{split} split" if split else "-"


# -- the page's parts -----------------------------------------------------------------------


def device_rows(
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    timeline: Sequence[Mapping[str, Any]],
    last_eval: Mapping[str, EvalResult],
) -> list[dict[str, str]]:
    """One row per worker of the config: what it is and what it did (as plain text)."""
    workers = config.get("workers")
    workers = workers[:MAX_WORKERS] if isinstance(workers, list) else []
    counted: dict[str, int] = {}
    for record in timeline:
        updates = record.get("updates")
        for name in updates if isinstance(updates, list) else []:
            counted[str(name)] = counted.get(str(name), 0) + 1
    rows = []
    for worker in workers:
        if not isinstance(worker, dict):
            continue
        name = str(worker.get("name", "?"))
        trainer = worker.get("role", "trainer") == "trainer"
        result = last_eval.get(name)
        ssh = worker.get("ssh")
        host = ssh.get("host") if isinstance(ssh, dict) else None
        rows.append(
            {
                "worker": name,
                "role": str(worker.get("role", "trainer")),
                "transport": str(worker.get("transport", "local")) + (f" ({host})" if host else ""),
                "shard": shard_text(worker),
                "device": str(worker.get("device", "auto")),
                "threads": str(worker.get("threads", "-")),
                "slowdown": _fixed(worker.get("slowdown"), 1),
                "rounds": (f"{counted.get(name, 0)} of {len(timeline)}" if trainer else "-"),
                "samples": _fixed(metrics.get(f"train_samples/{name}"), 0),
                "loss": _fixed(metrics.get(f"train_loss/{name}"), 4),
                "seconds": _fixed(metrics.get(f"train_seconds/{name}"), 2),
                "up": _bytes(metrics.get(f"wire_bytes/{name}")),
                "down": _bytes(metrics.get(f"wire_bytes_down/{name}")),
                "failed": _fixed(metrics.get(f"failed/{name}"), 0),
                "accuracy": _percent(result.accuracy) if result is not None else "-",
            }
        )
    return rows


def _fact(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)[:FACT_CHARS]


def hello_rows(
    hellos: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]
) -> list[dict[str, str]]:
    """One row per worker that said hello (its last hello): what it runs on, what it can do,
    and its device metrics of the last round (as plain text)."""
    last: dict[str, Mapping[str, Any]] = {}
    for hello in hellos[: MAX_WORKERS * 16]:
        last[str(hello.get("worker", "?"))[:FACT_CHARS]] = hello
    rows = []
    for name, hello in list(last.items())[:MAX_WORKERS]:
        raw = hello.get("facts")
        facts: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
        machine = facts.get("jetson_model") or (
            f"{facts['machine']}, {_fact(facts.get('cpus'))} CPUs" if facts.get("machine") else None
        )
        cuda = facts.get("cuda_name")
        if cuda:
            cuda = f"{cuda} (sm {_fact(facts.get('cuda_capability'))})"
        crypto = facts.get("cryptography")
        func = facts.get("torch_func")
        rows.append(
            {
                "worker": name,
                "python": _fact(hello.get("python")),
                "torch": _fact(hello.get("torch")),
                "device": _fact(hello.get("device")),
                "machine": _fact(machine),
                "memory": _fact(facts.get("memory_mb")),
                "cuda": _fact(cuda),
                "secagg": f"yes ({_fact(crypto)})" if crypto else "no",
                "dpsgd": "-" if func is None else ("yes" if func == "yes" else "no"),
                "rss": _fixed(metrics.get(f"device/{name}/rss_mb"), 0),
                "peak": _fixed(metrics.get(f"device/{name}/rss_peak_mb"), 0),
                "cuda_max": _fixed(metrics.get(f"device/{name}/cuda_max_mb"), 0),
                "temp": _fixed(metrics.get(f"device/{name}/temp_c"), 1),
            }
        )
    return rows


HELLO_COLUMNS = (
    ("worker", "worker"),
    ("python", "Python"),
    ("torch", "torch"),
    ("device", "device"),
    ("machine", "machine"),
    ("memory", "memory (MiB)"),
    ("cuda", "CUDA"),
    ("secagg", "secure aggregation (cryptography)"),
    ("dpsgd", "DP-SGD (torch.func)"),
    ("rss", "RSS (MiB)"),
    ("peak", "peak RSS (MiB)"),
    ("cuda_max", "CUDA max (MiB)"),
    ("temp", "temperature (C)"),
)

DEVICE_COLUMNS = (
    ("worker", "worker"),
    ("role", "role"),
    ("transport", "transport"),
    ("shard", "shard"),
    ("device", "device"),
    ("threads", "threads"),
    ("slowdown", "slowdown"),
    ("rounds", "updates used"),
    ("samples", "samples (last round)"),
    ("loss", "train loss (last round)"),
    ("seconds", "train s (last round)"),
    ("up", "bytes up (last round)"),
    ("down", "bytes down (last round)"),
    ("failed", "failed (last round)"),
    ("accuracy", "own model's accuracy (last evaluation)"),
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"num" if i >= numeric_from else "txt"}">{_e(v)}</td>'
            for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png_data(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_images(
    evaluations: Mapping[int, Mapping[str, EvalResult]], groups: Sequence[Sequence[int]]
) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of each picture, drawn from the evaluations (none without any)."""
    if not evaluations:
        return []
    last = max(evaluations)
    results = evaluations[last]
    history = {r: {m: res.accuracy for m, res in rs.items()} for r, rs in evaluations.items()}
    out = [("Test accuracy of every model by round", _png_data(figures.accuracy_by_round(history)))]
    if FEDERATED in results:
        title = f"Federated model, round {last}"
        fig = figures.confusion_matrix(results[FEDERATED].confusion, title)
        out.append((f"Confusion matrix of the federated model, round {last}", _png_data(fig)))
    if groups:
        shares = {m: r.group_shares for m, r in results.items()}
        fig = figures.group_shares(shares, groups, f"Share of predictions, round {last}")
        out.append((f"Share of predictions per digit group, round {last}", _png_data(fig)))
    return out


def _config_text(config: Mapping[str, Any]) -> str:
    """The config as YAML, a tracking URI's credentials hidden."""
    shown = json.loads(json.dumps(config, default=str))
    tracking = shown.get("tracking")
    if isinstance(tracking, dict) and isinstance(tracking.get("uri"), str):
        from tasks.tracking.store import redact_uri

        tracking["uri"] = redact_uri(tracking["uri"])
    return yaml.safe_dump(shown, sort_keys=False, width=100)


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#1d2430}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #d8dde6;padding-bottom:.3rem}
.sub{color:#5a6475;margin-top:0}
dl.summary{display:grid;grid-template-columns:max-content auto;gap:.25rem 1.2rem}
dl.summary dt{color:#5a6475}dl.summary dd{margin:0;font-weight:600}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #d8dde6;padding:.3rem .5rem}th{background:#f3f5f8;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #e3e7ee}figcaption{color:#5a6475;font-size:.85rem}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.8rem}
.note{color:#8a5a00}
"""


def build_report(run_dir: Path) -> str:
    """The HTML page of the training in `run_dir` (see the module docstring).

    Raises:
        RunFolderError: the folder holds no readable state.json, or a record in it is damaged.
    """
    state = read_state(run_dir)
    config: dict[str, Any] = state["config"]
    raw_metrics = state.get("metrics")
    metrics: dict[str, Any] = raw_metrics if isinstance(raw_metrics, dict) else {}
    rounds_done = read_record(run_dir, TIMELINE_FILE)
    hellos = read_record(run_dir, DEVICES_FILE)
    evaluations, groups = figures.read_evaluations(run_dir)
    last_round = max(evaluations) if evaluations else None
    last_eval = evaluations[last_round] if last_round is not None else {}

    federated = last_eval.get(FEDERATED)
    final = (
        f"{_percent(federated.accuracy)} ({federated.correct}/{federated.total}, round "
        f"{last_round})"
        if federated is not None
        else _percent(metrics.get(f"accuracy/{FEDERATED}"))
    )
    strategy = config.get("strategy")
    schedule = config.get("schedule")
    elapsed = rounds_done[-1].get("seconds") if rounds_done else metrics.get("elapsed_seconds")
    summary = [
        ("training", config.get("name", "?")),
        ("run folder", run_dir.name),
        ("rounds", f"{state.get('round', '?')} of {config.get('rounds', '?')}"),
        ("strategy", strategy.get("name", "?") if isinstance(strategy, dict) else "?"),
        ("schedule", schedule.get("mode", "sync") if isinstance(schedule, dict) else "sync"),
        ("final federated accuracy", final),
        ("training time", _duration(elapsed)),
        ("seed", config.get("seed", "?")),
        ("MLflow run", state.get("mlflow_run_id") or "- (tracking off)"),
        ("config file", state.get("config_path") or "-"),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>federated-mnist report: {_e(config.get('name', run_dir.name))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Federated MNIST training {_e(config.get('name', '?'))}</h1>",
        f'<p class="sub">{_e(run_dir.name)}, report written '
        f"{_e(dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC'))}</p>",
        '<dl class="summary">'
        + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in summary)
        + "</dl>",
        "<h2>Figures</h2>",
    ]
    images = figure_images(evaluations, groups)
    if images:
        parts += [
            f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
            for caption, data in images
        ]
    else:
        parts.append(
            '<p class="note">No evaluation is recorded in this run folder '
            f"({_e(figures.EVALUATIONS_FILE)} is absent: the training was not evaluated yet, "
            "or ran before evaluations were written into the run folder).</p>"
        )
    if evaluations:
        models = sorted(
            {m for rs in evaluations.values() for m in rs}, key=lambda m: (m != FEDERATED, m)
        )
        rows = [
            [
                str(r),
                *(
                    _percent(evaluations[r][m].accuracy) if m in evaluations[r] else "-"
                    for m in models
                ),
            ]
            for r in sorted(evaluations)
        ]
        parts += [
            "<h2>Test accuracy by round</h2>",
            _table(["round", *(model_label(m) for m in models)], rows),
        ]
    devices = device_rows(config, metrics, rounds_done, last_eval)
    parts += [
        "<h2>Devices</h2>",
        _table(
            [title for _, title in DEVICE_COLUMNS],
            [[row[key] for key, _ in DEVICE_COLUMNS] for row in devices],
            numeric_from=5,
        ),
        f'<p class="sub">"updates used": rounds (or versions) whose global model took the '
        f"worker's update, of the {len(rounds_done)} recorded in {_e(TIMELINE_FILE)}; the last "
        f"round's figures are those of round {_e(state.get('round', '?'))}.</p>",
        "<h3>What each device said it is</h3>",
        _table(
            [title for _, title in HELLO_COLUMNS],
            [[row[key] for key, _ in HELLO_COLUMNS] for row in hello_rows(hellos, metrics)],
            numeric_from=len(HELLO_COLUMNS) - 4,
        )
        if hellos
        else f'<p class="note">No hello is recorded ({_e(DEVICES_FILE)} is absent: the '
        "training ran before hellos were written into the run folder).</p>",
        f'<p class="sub">From each worker\'s hello (the last, when a worker was restarted), '
        f"in {_e(DEVICES_FILE)}; memory and temperature as the device measured them after the "
        "last round; - where the device does not expose them.</p>",
        "<h2>Config</h2>",
        f"<pre>{_e(_config_text(config))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write `build_report(run_dir)` to `out` (default: `run_dir/report.html`); returns it.

    Raises:
        RunFolderError: as `build_report`.
        OSError: `out` cannot be written.
    """
    page = build_report(run_dir)
    target = out if out is not None else run_dir / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target
