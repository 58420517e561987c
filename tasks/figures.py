"""Pictures of a training for the MLflow record: accuracy by round of every model on one plot,
the confusion matrix of the federated model, and the share of predictions per digit group
(`save_run_figures` draws all three from a training's evaluations).

Drawn with matplotlib's object API on the Agg canvas: no pyplot, hence no GUI backend and no global
"current figure", so the tracker's background thread can draw while other threads work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedcore.evaluation import EvalResult
from fedcore.report import model_label
from fedcore.shards import format_labels
from tasks.tracking.naming import FEDERATED


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _model_order(models: Sequence[str]) -> list[str]:
    """The federated model first, then the workers by name."""
    return sorted(set(models), key=lambda m: (m != FEDERATED, m))


def accuracy_by_round(history: Mapping[int, Mapping[str, float]], title: str = "") -> Figure:
    """One line per model: test accuracy (%) at each evaluated round."""
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    models = _model_order([m for accs in history.values() for m in accs])
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
    models = _model_order(list(shares))
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
