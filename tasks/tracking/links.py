"""Where a run shows in the MLflow UI: the run's page, metric views plotting every model of a
quantity on one chart (linked from the run's description), and the experiment's run list ordered
by the federated accuracy (linked from the experiment's description).

The run list's columns are the UI's own state (kept in the browser), not something a tracking
store can set; ordering the list by a metric through its URL is what MLflow allows, and the UI then
shows that metric's column."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from .naming import FEDERATED, REGISTERED_MODEL


def run_page_url(base: str, experiment_id: str | None, run_id: str) -> str:
    """The run's page in the MLflow UI served at `base`."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def metric_chart_url(experiment_id: str, run_id: str, keys: Sequence[str]) -> str:
    """MLflow's metric view plotting `keys` of one run on one chart.

    Returns:
        The UI route the UI builds itself (`getMetricPageRoute`), relative to the UI's root.
    """

    def enc(value: Any) -> str:
        return quote(json.dumps(value, separators=(",", ":")), safe="")

    query = (
        f"runs={enc([run_id])}&metric={enc(keys[0])}&experiments={enc([experiment_id])}"
        f"&plot_metric_keys={enc(list(keys))}&plot_layout={enc({})}&x_axis=step"
        "&y_axis_scale=linear&line_smoothness=1&show_point=true"
        f"&deselected_curves={enc([])}&last_linear_y_axis_range={enc([])}"
    )
    return f"#/metric?{query}"


def comparison_note(experiment_id: str, run_id: str, models: Sequence[str]) -> str:
    """The run's description (markdown): links that chart every model of a quantity on one chart.

    Args:
        experiment_id: the run's experiment.
        run_id: the run.
        models: the evaluated models (`federated` and workers' names).
    """
    workers = [m for m in models if m != FEDERATED]
    ordered = [FEDERATED, *workers] if FEDERATED in models else workers
    charts = [
        ("test accuracy", [f"accuracy/{m}" for m in ordered]),
        ("average test loss", [f"loss/{m}" for m in ordered]),
        ("training loss", [f"train_loss/{w}" for w in workers]),
        ("local training seconds", [f"train_seconds/{w}" for w in workers]),
    ]
    links = " · ".join(
        f"[{label}]({metric_chart_url(experiment_id, run_id, keys)})"
        for label, keys in charts
        if keys
    )
    return (
        f"**Every model on one chart** (federated vs {', '.join(workers)}): {links}.\n\n"
        "Metrics are `<quantity>/<model>`, stepped by round. Pictures: `figures/`; every round's "
        "global model: `models/global-rNNN.safetensors`; evaluated rounds' models are logged "
        f"models registered as `{REGISTERED_MODEL}` versions (aliases `current`, `champion`)."
    )


def runs_by_accuracy_route(experiment_id: str) -> str:
    """The experiment's run list ordered by the federated test accuracy, best first (a UI route,
    relative to the UI's root)."""
    key = quote(f"metrics.`accuracy/{FEDERATED}`", safe="")
    return f"#/experiments/{experiment_id}/runs?orderByKey={key}&orderByAsc=false"


def experiment_note(experiment_id: str) -> str:
    """The experiment's description (markdown): what a run holds and where the best runs are."""
    return (
        "Federated MNIST trainings: one run per training, metrics `<quantity>/<model>` stepped "
        "by round (`accuracy/federated` is the global model's test accuracy). "
        f"[Runs by federated accuracy]({runs_by_accuracy_route(experiment_id)}) · registered "
        f"model `{REGISTERED_MODEL}` (aliases `current`: the newest full training's final model, "
        "`champion`: the best test accuracy)."
    )
