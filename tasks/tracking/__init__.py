"""The MLflow record of a training, as a small package:

- `naming`: run names, flattened params, `<quantity>/<model>` metric keys (pure);
- `store`: where the record goes (URI policy), opening it, the server health check;
- `links`: where a run and its metric charts show in the MLflow UI;
- `tags`: Prefect's context and the code version as run tags;
- `batching`: the one chunked `log_batch` loop;
- `background`: the logging thread that keeps MLflow off the critical path;
- `models`: an evaluated global model as a logged model and a registered version;
- `tracker`: the `Tracker` protocol and `make_tracker`; `mlflow_tracker` and `null` its two
  implementations.

MLflow itself is imported only on the logging thread, when a store is opened.
"""

from .links import comparison_note, metric_chart_url
from .mlflow_tracker import MlflowTracker
from .naming import FEDERATED, REGISTERED_MODEL, eval_metrics, flatten, round_metrics, run_name
from .null import NullTracker
from .store import (
    TrackingUnavailable,
    artifact_root_for,
    check_server,
    default_artifact_root,
    default_tracking_uri,
    is_server,
    redact_text,
    redact_uri,
    resolve_tracking_uri,
    sqlite_path,
)
from .tags import code_version_tags, context_tags, prefect_context
from .tracker import Tracker, make_tracker

__all__ = [
    "FEDERATED",
    "REGISTERED_MODEL",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingUnavailable",
    "artifact_root_for",
    "check_server",
    "code_version_tags",
    "comparison_note",
    "context_tags",
    "default_artifact_root",
    "default_tracking_uri",
    "eval_metrics",
    "flatten",
    "is_server",
    "make_tracker",
    "metric_chart_url",
    "prefect_context",
    "redact_text",
    "redact_uri",
    "resolve_tracking_uri",
    "round_metrics",
    "run_name",
    "sqlite_path",
]
