"""The one way metrics, params and tags reach a run: `log_batch` requests within MLflow's limits.

MLflow refuses a batch of more than 1,000 metrics, 100 params, 100 tags or 1,000 entities in all;
a flattened config or an evaluation of many workers can pass a limit, so this splits the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

MAX_ENTITIES = 1000  # per request, metrics + params + tags
MAX_PARAMS = 100
MAX_TAGS = 100


def metric_entities(
    values: Mapping[str, float],
    step: int,
    timestamp_ms: int,
    model_id: str | None = None,
    linked: Callable[[str], bool] | None = None,
) -> list[Any]:
    """MLflow `Metric`s of `values` at `step`.

    Args:
        values: metric key -> value.
        step: the round.
        timestamp_ms: when they were measured, in ms since the epoch.
        model_id: a logged model the metrics describe.
        linked: which keys `model_id` goes to (default: all).
    """
    from mlflow.entities import Metric

    return [
        Metric(
            k,
            float(v),
            timestamp_ms,
            step,
            model_id=model_id if linked is None or linked(k) else None,
        )
        for k, v in values.items()
    ]


def log_batch(
    client: Any,
    run_id: str,
    metrics: Iterable[Any] = (),
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Log `metrics` (MLflow `Metric`s), `params` and `tags` to run `run_id` in as few requests as
    MLflow's limits allow (none when all are empty).

    Raises:
        MlflowException: the store refused a request (the ones before it are logged).
    """
    from mlflow.entities import Param, RunTag

    ms = list(metrics)
    ps = [Param(k, v) for k, v in (params or {}).items()]
    ts = [RunTag(k, v) for k, v in (tags or {}).items()]
    while ms or ps or ts:
        p, ps = ps[:MAX_PARAMS], ps[MAX_PARAMS:]
        t, ts = ts[:MAX_TAGS], ts[MAX_TAGS:]
        room = MAX_ENTITIES - len(p) - len(t)
        m, ms = ms[:room], ms[room:]
        client.log_batch(run_id, metrics=m, params=p, tags=t)
