"""The names in the MLflow record: runs, params and metrics (pure: no MLflow, no Prefect).

Metrics are keyed `<quantity>/<model>` (`accuracy/federated`, `train_loss/alice`), stepped by
round: the MLflow UI groups each quantity in one section, one line per model. Params are the config
flattened to dotted keys, as MLflow params are flat strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from fedcore.evaluation import EvalResult
from fedcore.protocol import Update
from fedcore.shards import format_labels
from fedcore.strategies import Failure

FEDERATED = "federated"  # the model name of the global model in metric keys
REGISTERED_MODEL = "federated-mnist-cnn"  # the registry name of the global models
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def run_name(name: str, strategy: str, deployment: str | None = None) -> str:
    """A training's run name.

    Args:
        name: the config's name.
        strategy: the strategy's name.
        deployment: the Prefect deployment's name, if any (left out when equal to `name`).

    Returns:
        `<deployment>-<config name>-<strategy>-<YYYYmmdd-HHMMSS>`.
    """
    parts = [deployment] if deployment and deployment != name else []
    return "-".join([*parts, name, strategy, datetime.now().strftime("%Y%m%d-%H%M%S")])


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """Nested config -> {'train.lr': '0.1', ...}.

    Args:
        prefix: the key of `value` ("" at the top).
        value: a mapping, a list of mappings (keyed by their `name`, else their index) or a leaf.
        out: where the flat entries go.

    Returns:
        `out`, each leaf's `str()` cut to MLflow's param limit.
    """
    if isinstance(value, Mapping):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            key = v.get("name", i) if isinstance(v, Mapping) else i
            flatten(f"{prefix}.{key}", v, out)
    else:
        out[prefix] = str(value)[:MAX_PARAM_CHARS]
    return out


def round_metrics(updates: Sequence[Update], failures: Sequence[Failure]) -> dict[str, float]:
    """A round's training metrics.

    Args:
        updates: the workers' updates of the round.
        failures: the workers that failed it.

    Returns:
        `<quantity>/<worker>` (loss, samples, seconds, wire bytes both ways and of them the
        request's, coordinator -> worker, failed 0/1), the device's facts after the round as
        `device/<worker>/<fact>` (`rss_mb`, `rss_peak_mb`, `cuda_max_mb`, `temp_c`: only those
        the device reported) plus round totals.
    """
    out: dict[str, float] = {}
    for u in updates:
        out[f"train_loss/{u.worker}"] = u.metrics.loss
        out[f"train_samples/{u.worker}"] = u.metrics.samples
        out[f"train_seconds/{u.worker}"] = u.metrics.seconds
        out[f"wire_bytes/{u.worker}"] = u.wire_bytes
        out[f"wire_bytes_down/{u.worker}"] = u.wire_bytes_down
        out[f"failed/{u.worker}"] = 0
        for fact, value in sorted(u.device.items()):
            out[f"device/{u.worker}/{fact}"] = value
    for f in failures:
        out[f"failed/{f.worker}"] = 1
    out["workers_ok"] = len(updates)
    out["workers_failed"] = len(failures)
    out["round_bytes"] = sum(u.wire_bytes for u in updates)
    return out


def eval_metrics(
    results: Mapping[str, EvalResult], groups: Sequence[Sequence[int]]
) -> dict[str, float]:
    """An evaluation's metrics.

    Args:
        results: each model's result, keyed `federated` or a worker's name.
        groups: the digit groups the results' `group_shares` follow.

    Returns:
        `<quantity>/<model>`: accuracy, loss, seed loss, share per group, accuracy per digit
        (digits absent from the test set are left out).
    """
    out: dict[str, float] = {}
    for model, r in results.items():
        out[f"accuracy/{model}"] = r.accuracy
        out[f"loss/{model}"] = r.loss
        out[f"seed_loss/{model}"] = r.seed_loss
        for g, share in zip(groups, r.group_shares):
            out[f"share_{format_labels(g)}/{model}"] = share
        for d, acc in enumerate(r.per_digit_accuracy):
            if acc == acc:  # skip NaN (digit absent)
                out[f"digit_{d}_accuracy/{model}"] = acc
    return out


def is_federated(key: str) -> bool:
    """Whether metric `key` measures the federated model (`<quantity>/federated`)."""
    return key.endswith(f"/{FEDERATED}")
