"""The global model of an evaluated round in the MLflow record: a logged model of the run, and a
version of the registered model with the moving aliases `current` and `champion`.

The logged model is the pyfunc "model from code" of `tasks/mlflow_model.py` (its one artifact is
the safetensors file; no pickle anywhere in the registry). Its SHA-256 goes into the version's
`weights_sha256` tag, so a reader (`fedmnist models`) notices a file changed in the artifact store
after registration. Everything goes through an explicit
`MlflowClient` (the tracker's logging thread calls these): MLflow's fluent `log_model` would use the
process-wide URI and the thread's active run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from fedcore.evaluation import EvalResult

ALIAS_CURRENT = "current"  # the newest version; MLflow reserves the name `latest`
ALIAS_CHAMPION = "champion"  # the best federated test accuracy so far
CODE_FACTS = ("code_version", "git_commit")  # the code tags a logged model carries


def evaluation_facts(
    rnd: int, result: EvalResult, groups: Sequence[Sequence[int]]
) -> dict[str, str]:
    """What a global model's record says about its evaluation: round, accuracy (6 decimals),
    correct and total test images, and the digit groups (JSON)."""
    return {
        "round": str(rnd),
        "accuracy": f"{result.accuracy:.6f}",
        "correct": str(result.correct),
        "total": str(result.total),
        "groups": json.dumps([list(g) for g in groups]),
    }


def log_global_model(
    client: Any,
    experiment_id: str,
    run_id: str,
    rnd: int,
    weights_file: Path,
    facts: Mapping[str, str],
) -> tuple[str, str]:
    """Log `weights_file` as logged model `global-rNNN` of run `run_id` at step `rnd`.

    Args:
        client: an `MlflowClient` on the run's store.
        experiment_id: the run's experiment.
        run_id: the run.
        rnd: the round (the model's step and name).
        weights_file: the round's safetensors file.
        facts: join the weights' metadata and MLmodel's; `round`, `strategy` and `config_hash`
            among them become the model's params.

    Returns:
        The logged model's id (the model is left PENDING: finalize it once its metrics are in)
        and the SHA-256 of the weights file as stored.
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    from fedcore.checkpoint import load_weights, save_weights
    from tasks import mlflow_model

    weights, meta = load_weights(weights_file)
    merged = {**meta, **facts}
    model = client.create_logged_model(
        experiment_id,
        name=f"global-r{rnd:03d}",
        source_run_id=run_id,
        params={k: merged[k] for k in ("round", "strategy", "config_hash") if k in merged},
        tags={"round": str(rnd)},
        model_type="pyfunc",
    )
    with tempfile.TemporaryDirectory(prefix="fedmnist-model-") as tmp:
        stored = save_weights(Path(tmp) / mlflow_model.WEIGHTS_FILE, weights, merged)
        sha = mlflow_model.sha256_file(stored)
        local = mlflow_model.save(
            Path(tmp) / "model",
            stored,
            metadata=merged,
            mlflow_model=Model(
                artifact_path=model.artifact_location,
                run_id=run_id,
                model_id=model.model_id,
                model_uuid=model.model_id,
            ),
        )
        client.log_model_artifacts(model.model_id, str(local))
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=rnd)])
    return str(model.model_id), sha


@contextmanager
def _process_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri` for one call, then restore it.

    MLflow 3.17's SQL registry resolves a version's `models:/<model_id>` source through the
    process-wide URI (`MlflowClient()` inside `SqlAlchemyStore.create_model_version`), not the
    client's: without this a local store's registration fails ("Logged model ... not found") and
    creates ./mlflow.db in the current directory. A server resolves it against its own store.
    """
    from mlflow.tracking._tracking_service import utils

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with utils._use_tracking_uri(uri):
            yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def register(
    client: Any,
    name: str,
    run_id: str,
    model_id: str,
    tags: dict[str, str],
    accuracy: float,
    local_store: str | None,
) -> str:
    """Make logged model `model_id` a new version of registered model `name` (created if new).

    Alias `current` moves to the new version, and `champion` too when `accuracy` beats the
    champion's `accuracy` tag (a tie keeps the older version).

    Args:
        client: an `MlflowClient` on the store (tracking and registry).
        name: the registered model.
        run_id: the run that logged the model.
        model_id: the logged model.
        tags: the version's tags (`accuracy` among them, for later comparisons).
        accuracy: the model's federated test accuracy.
        local_store: the store's URI when it is not a server.

    Returns:
        The version number.

    Raises:
        MlflowException: the registry refused a call.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name, description="The federated MNIST CNN: global models at evaluation rounds."
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with _process_uri(local_store) if local_store else nullcontext():
        version = client.create_model_version(
            name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
        )
    client.set_registered_model_alias(name, ALIAS_CURRENT, version.version)
    champion = client.get_registered_model(name).aliases.get(ALIAS_CHAMPION)
    best = -1.0
    if champion is not None:
        best = _accuracy_tag(client.get_model_version(name, champion).tags.get("accuracy"))
    if accuracy > best:
        client.set_registered_model_alias(name, ALIAS_CHAMPION, version.version)
    return str(version.version)


def _accuracy_tag(text: str | None) -> float:
    """A version's `accuracy` tag as a number in [0, 1]; -1 when absent or not one (tags are
    store data: a tampered champion loses its place instead of stopping the registration)."""
    try:
        value = float(text if text is not None else "")
    except ValueError:
        return -1.0
    return value if 0.0 <= value <= 1.0 else -1.0
