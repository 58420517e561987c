"""Pictures of a training: accuracy by round of every model on one plot, the confusion matrix of
the federated model, and the share of predictions per digit group.

Two callers. The round loop calls `update_figures(run_dir, rnd, results, groups)` at every
evaluation round, tracking on or off: the round's results are appended to the run folder's
`evaluations.jsonl` (one JSON line per evaluated round, so a resumed training keeps its history
and `fedmnist report` reads it back) and the three pictures in `figures/` are redrawn from the
whole file under stable names, each replaced atomically so a reader never sees half a PNG. The
MLflow tracker draws the same pictures at the end (`save_run_figures`).

Drawn with matplotlib's object API on the Agg canvas: no pyplot, hence no GUI backend and no global
"current figure", so any thread can draw while other threads work. `evaluations.jsonl` is read as
untrusted (a run folder may come from elsewhere): size-bounded, every field type- and
range-checked, errors typed (`RunFolderError`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedcore.errors import FedError
from fedcore.evaluation import EvalResult
from fedcore.report import model_label
from fedcore.shards import format_labels
from tasks.tracking.naming import FEDERATED

EVALUATIONS_FILE = "evaluations.jsonl"  # in the run folder: one line per evaluated round
FIGURES_DIR = "figures"  # in the run folder
ACCURACY_PNG = "accuracy_by_round.png"
CONFUSION_PNG = "confusion_federated.png"
SHARES_PNG = "group_shares.png"
MAX_EVALUATIONS_BYTES = 64 * 1024 * 1024  # ~2 KiB a model and round: far above any training
MAX_MODELS = 1000  # models in one evaluated round (the federated one and the workers)


class RunFolderError(FedError):
    """A run folder's record cannot be read: a file too large, not JSON, or holding values of the
    wrong type or range. Not transient: the file stays what it is."""

    cause = "failed"
    transient = False


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def model_order(models: Sequence[str]) -> list[str]:
    """The federated model first, then the workers by name."""
    return sorted(set(models), key=lambda m: (m != FEDERATED, m))


def accuracy_by_round(history: Mapping[int, Mapping[str, float]], title: str = "") -> Figure:
    """One line per model: test accuracy (%) at each evaluated round."""
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    models = model_order([m for accs in history.values() for m in accs])
    for model in models:
        rounds = sorted(r for r, accs in history.items() if model in accs)
        values = [100 * history[r][model] for r in rounds]
        federated = model == FEDERATED
        ax.plot(
            rounds,
            values,
            marker="o",
            linewidth=2.5 if federated else 1.4,
            color="black" if federated else None,
            label=model_label(model),
        )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "Accuracy by round")
    return fig


def confusion_matrix(confusion: Sequence[Sequence[int]], title: str) -> Figure:
    """Counts of (true digit, predicted digit), annotated."""
    fig = _figure(5.6, 5)
    ax = fig.add_subplot()
    n = len(confusion)
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    top = max((max(row) for row in confusion), default=0)
    for t in range(n):
        for p in range(n):
            value = confusion[t][p]
            if value:
                ax.text(
                    p,
                    t,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > top / 2 else "black",
                )
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(title)
    return fig


def group_shares(
    shares: Mapping[str, Sequence[float]], groups: Sequence[Sequence[int]], title: str
) -> Figure:
    """Grouped bars: per model, the share (%) of its predictions falling in each digit group."""
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    models = model_order(list(shares))
    width = 0.8 / max(len(groups), 1)
    for i, group in enumerate(groups):
        xs = [m + (i - (len(groups) - 1) / 2) * width for m in range(len(models))]
        ys = [100 * shares[model][i] for model in models]
        ax.bar(xs, ys, width=width, label=f"predicted {format_labels(group)}")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([model_label(m) for m in models])
    ax.set_ylabel("share of test predictions (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG (creating the folder) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def save_run_figures(
    evaluations: Mapping[int, Mapping[str, EvalResult]],
    groups: Sequence[Sequence[int]],
    out: Path,
) -> list[Path]:
    """A training's pictures, from its evaluations so far.

    Args:
        evaluations: round -> model (`federated` or a worker) -> result; not empty.
        groups: the digit groups of the results' `group_shares` (none: no group picture).
        out: the folder to write into.

    Returns:
        The files written: `accuracy_by_round.png`, and of the last evaluated round
        `confusion_federated_rNNN.png` (when the federated model was evaluated) and
        `group_shares_rNNN.png`.
    """
    last = max(evaluations)
    results = evaluations[last]
    history = {r: {m: res.accuracy for m, res in rs.items()} for r, rs in evaluations.items()}
    written = [save_png(accuracy_by_round(history), out / "accuracy_by_round.png")]
    if FEDERATED in results:
        figure = confusion_matrix(results[FEDERATED].confusion, f"Federated model, round {last}")
        written.append(save_png(figure, out / f"confusion_federated_r{last:03d}.png"))
    if groups:
        figure = group_shares(
            {m: r.group_shares for m, r in results.items()},
            groups,
            f"Share of predictions per digit group, round {last}",
        )
        written.append(save_png(figure, out / f"group_shares_r{last:03d}.png"))
    return written


# -- the run folder: evaluations.jsonl and figures/, redrawn at every evaluation round ---------


def update_figures(
    run_dir: Path,
    rnd: int,
    results: Mapping[str, EvalResult],
    groups: Sequence[Sequence[int]],
) -> list[Path]:
    """Record round `rnd`'s evaluation in the run folder and redraw its pictures.

    Call it at every evaluation round, after the round is written (tracking on or off); a round
    recorded twice (a retried record step) keeps its last results.

    Args:
        run_dir: the training's run folder.
        rnd: the evaluated round (or version).
        results: model (`federated` or a worker's name) -> its result this round.
        groups: the digit groups of the results' `group_shares` ([]: no group picture).

    Returns:
        The pictures written, under `run_dir/figures/`: `accuracy_by_round.png`, and of the last
        evaluated round `confusion_federated.png` (when the federated model was evaluated) and
        `group_shares.png` (when there are groups).

    Raises:
        RunFolderError: the folder's `evaluations.jsonl` is damaged (the message names the line).
        OSError: the folder cannot be written.
    """
    record_evaluation(run_dir, rnd, results, groups)
    evaluations, recorded_groups = read_evaluations(run_dir)
    return draw_figures(evaluations, recorded_groups, run_dir / FIGURES_DIR)


def record_evaluation(
    run_dir: Path,
    rnd: int,
    results: Mapping[str, EvalResult],
    groups: Sequence[Sequence[int]],
) -> None:
    """Append round `rnd`'s results to `run_dir/evaluations.jsonl` (one line, flushed)."""
    line = {
        "round": int(rnd),
        "groups": [[int(d) for d in g] for g in groups],
        "results": {str(m): r.to_dict() for m, r in results.items()},
    }
    with open(run_dir / EVALUATIONS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_evaluations(run_dir: Path) -> tuple[dict[int, dict[str, EvalResult]], list[list[int]]]:
    """Every evaluated round recorded in `run_dir/evaluations.jsonl`, and the last digit groups.

    A torn last line (a crash while appending) is left out; a round recorded twice keeps its last
    line. No file: nothing evaluated yet, ({}, []).

    Raises:
        RunFolderError: the file is over the size bound, or a line other than the last is not a
            well-formed record (the message names the file and the line).
    """
    path = run_dir / EVALUATIONS_FILE
    if not path.is_file():
        return {}, []
    size = path.stat().st_size
    if size > MAX_EVALUATIONS_BYTES:
        raise RunFolderError(
            f"{path} is {size} bytes, more than the {MAX_EVALUATIONS_BYTES} an evaluation "
            "record can take; it is not this training's record: remove or replace it"
        )
    lines = path.read_bytes()[:MAX_EVALUATIONS_BYTES].decode("utf-8", "replace").splitlines()
    evaluations: dict[int, dict[str, EvalResult]] = {}
    groups: list[list[int]] = []
    for i, text in enumerate(lines, 1):
        try:
            raw = json.loads(text)
        except ValueError:
            if i == len(lines):
                break  # torn by a crash while appending
            raw = None
        try:
            rnd, results, line_groups = _parse_line(raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise RunFolderError(
                f"{path}: line {i} is not an evaluation record ({exc}); the file was damaged or "
                "edited: remove that line (the round is then missing from the figures)"
            ) from None
        evaluations[rnd] = results
        groups = line_groups
    return evaluations, groups


def _parse_line(raw: Any) -> tuple[int, dict[str, EvalResult], list[list[int]]]:
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    rnd = raw["round"]
    if not isinstance(rnd, int) or isinstance(rnd, bool) or not 0 <= rnd < 10**9:
        raise ValueError(f"round {rnd!r} is not a round number")
    groups = raw.get("groups", [])
    if not isinstance(groups, list) or len(groups) > 10:
        raise ValueError("groups is not a list of digit groups")
    for g in groups:
        if not isinstance(g, list) or not all(_is_int(d) and 0 <= d <= 9 for d in g):
            raise ValueError(f"group {g!r} is not a list of digits")
    results_raw = raw["results"]
    if not isinstance(results_raw, dict) or len(results_raw) > MAX_MODELS:
        raise ValueError(f"results is not an object of at most {MAX_MODELS} models")
    results = {str(m)[:200]: _result(r, len(groups)) for m, r in results_raw.items()}
    return rnd, results, [list(g) for g in groups]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _result(raw: Any, n_groups: int) -> EvalResult:
    """An `EvalResult` from a record, every value checked (counts, a 10x10 confusion, shares)."""
    if not isinstance(raw, dict):
        raise ValueError("a result is not an object")
    result = EvalResult.from_dict(raw)
    if not 0 <= result.correct <= result.total <= 10**9:
        raise ValueError(f"correct {result.correct} of total {result.total}")
    if len(result.confusion) != 10 or any(len(row) != 10 for row in result.confusion):
        raise ValueError("confusion is not 10x10")
    if any(v < 0 or v > 10**9 for row in result.confusion for v in row):
        raise ValueError("confusion holds a count out of range")
    if len(result.group_shares) != n_groups:
        raise ValueError("group_shares does not match the groups")
    if not all(0.0 <= s <= 1.0 for s in result.group_shares):
        raise ValueError("a group share is outside [0, 1]")
    if not all(math.isfinite(v) for v in (result.loss, result.seed_loss)):
        raise ValueError("a loss is not finite")
    return result


def draw_figures(
    evaluations: Mapping[int, Mapping[str, EvalResult]],
    groups: Sequence[Sequence[int]],
    out: Path,
) -> list[Path]:
    """The three pictures of `evaluations` under stable names in `out`, each replaced atomically.

    Returns:
        The files written (none when `evaluations` is empty); see `update_figures`.
    """
    if not evaluations:
        return []
    last = max(evaluations)
    results = evaluations[last]
    history = {r: {m: res.accuracy for m, res in rs.items()} for r, rs in evaluations.items()}
    pictures = [(accuracy_by_round(history), ACCURACY_PNG)]
    if FEDERATED in results:
        title = f"Federated model, round {last}"
        pictures.append((confusion_matrix(results[FEDERATED].confusion, title), CONFUSION_PNG))
    if groups:
        shares = {m: r.group_shares for m, r in results.items()}
        title = f"Share of predictions per digit group, round {last}"
        pictures.append((group_shares(shares, groups, title), SHARES_PNG))
    return [_replace_png(fig, out / name) for fig, name in pictures]


def _replace_png(fig: Figure, path: Path) -> Path:
    """Write `fig` next to `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
