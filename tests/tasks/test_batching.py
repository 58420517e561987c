"""Metrics, params and tags reach a run in requests within MLflow's limits, none when empty."""

from __future__ import annotations

from typing import Any

from tasks.tracking.batching import log_batch, metric_entities
from tasks.tracking.naming import is_federated


class Client:
    """Records the sizes of each `log_batch` request."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, int, int]] = []

    def log_batch(self, run_id: str, metrics: list, params: list, tags: list) -> Any:
        assert run_id == "r" and len(metrics) + len(params) + len(tags) <= 1000
        self.requests.append((len(metrics), len(params), len(tags)))


def _sizes(metrics: int = 0, params: int = 0, tags: int = 0) -> list[tuple[int, int, int]]:
    client = Client()
    entities = metric_entities({f"m{i}": i for i in range(metrics)}, step=1, timestamp_ms=0)
    log_batch(
        client,
        "r",
        entities,
        params={f"p{i}": "v" for i in range(params)},
        tags={f"t{i}": "v" for i in range(tags)},
    )
    return client.requests


def test_requests_stay_within_mlflows_limits() -> None:
    assert _sizes() == []
    assert _sizes(metrics=2500) == [(1000, 0, 0), (1000, 0, 0), (500, 0, 0)]
    assert _sizes(params=250, tags=3) == [(0, 100, 3), (0, 100, 0), (0, 50, 0)]
    assert _sizes(params=0, tags=2) == [(0, 0, 2)]
    assert _sizes(metrics=950, params=120) == [(900, 100, 0), (50, 20, 0)]


def test_a_model_id_goes_to_the_linked_metrics_only() -> None:
    values = {"accuracy/federated": 0.5, "accuracy/alice": 0.25}
    metrics = metric_entities(values, step=3, timestamp_ms=7, model_id="m-1", linked=is_federated)
    got = {m.key: (m.value, m.step, m.timestamp, m.model_id) for m in metrics}
    assert got == {"accuracy/federated": (0.5, 3, 7, "m-1"), "accuracy/alice": (0.25, 3, 7, None)}
