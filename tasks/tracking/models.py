"""The global model of an evaluated round in the MLflow record: a logged model of the run, and a
version of the registered model with the moving aliases `current` and `champion`.

The logged model is the pyfunc "model from code" of `tasks/mlflow_model.py` (its one artifact is
the safetensors file; no pickle anywhere in the registry). Its SHA-256 goes into the version's
`weights_sha256` tag, so a reader (`fedmnist models`) notices a file changed in the artifact store
after registration. Everything goes through an explicit
`MlflowClient` (the tracker's logging thread calls these): MLflow's fluent `log_model` would use the
process-wide URI and the thread's active run.

What the registry means:

- **Which trainings register.** Every training with `tracking.registered_model` set (the
  default); a quick check sets it to null (configs/smoke.yaml does), so its models stay logged
  models of its run and never become versions. Each evaluated round of a registering training is
  a version (its round, accuracy and test-set size as tags), so `fedmnist models export <n>`
  can hand out any evaluated model.
- **One registered model for all recipes** (`federated-mnist-cnn`): every version is the same
  network (`fedcore.model.Net`) scored by the evaluator on the same MNIST test images, so their
  accuracies compare across strategies and configs, and `models:/federated-mnist-cnn@champion` is
  the best CNN this store holds. A name per recipe would split the champion into many; the
  version's `recipe`, `strategy` and `config_hash` tags say where it came from.
- **`current`** is the final model of the newest *full* training: it moves only to a version
  whose round is its run's last (`round` equals the run's `rounds` param; a run without that
  param is taken as full). An intermediate round, or a training that stopped early, never
  becomes `current`.
- **`champion`** is the best comparable version: versions rank by the number of test images they
  were scored on, then by accuracy (a score on the whole test set outranks one on part of it, a
  tie keeps the older version); a champion whose tags are missing or out of range loses its place.
- **Linked both ways.** A version's source is `models:/<model_id>` with its `model_id`; the logged
  model gets MLflow's `mlflow.modelVersions` tag listing its versions (a tracking server adds it
  itself, a local store does not), so the UI shows the logged model as registered.
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

from .links import experiment_note
from .tags import mark_model_training

ALIAS_CURRENT = "current"  # the newest version; MLflow reserves the name `latest`
ALIAS_CHAMPION = "champion"  # the best federated test accuracy so far
FINAL_TAG = "final"  # "true" on a version that is its training's last round
MNIST_TEST_IMAGES = 10_000  # no evaluation scores more images than MNIST's test set holds
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
    """Log `weights_file` as logged model `global-rNNN` of run `run_id` at step `rnd` (and mark
    the experiment as model training, once).

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

    mark_model_training(client, experiment_id, experiment_note(experiment_id))
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
    """Make logged model `model_id` a new version of registered model `name` (created if new),
    linked to the logged model, and move the aliases as the module's docstring says.

    Args:
        client: an `MlflowClient` on the store (tracking and registry).
        name: the registered model.
        run_id: the run that logged the model (its params say the recipe and its length).
        model_id: the logged model.
        tags: the version's tags (`round`, `accuracy` and `total` among them, for later
            comparisons).
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
            name,
            description=(
                "The federated MNIST CNN: the global models of evaluated rounds, every recipe "
                "scored on the same test images. `current`: the final model of the newest full "
                "training; `champion`: the best test accuracy."
            ),
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    params = client.get_run(run_id).data.params
    tags = {**tags, **training_facts(params, tags.get("round"))}
    with _process_uri(local_store) if local_store else nullcontext():
        version = client.create_model_version(
            name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
        )
    number = str(version.version)
    link_logged_model(client, model_id, name, number)
    if tags.get(FINAL_TAG) == "true":
        client.set_registered_model_alias(name, ALIAS_CURRENT, number)
    champion = client.get_registered_model(name).aliases.get(ALIAS_CHAMPION)
    best = (-1, -1.0)
    if champion is not None:
        best = rank(client.get_model_version(name, champion).tags)
    if rank({**tags, "accuracy": f"{accuracy:.6f}"}) > best:
        client.set_registered_model_alias(name, ALIAS_CHAMPION, number)
    return number


def training_facts(params: Mapping[str, str], rnd: str | None) -> dict[str, str]:
    """What a version says about the training it came from: its recipe (config name), strategy,
    config hash, the training's rounds and whether this round is its last (`final`).

    Args:
        params: the run's params (the flattened config).
        rnd: the version's round, as tagged.
    """
    facts = {
        "recipe": params.get("name", ""),
        "strategy": params.get("strategy.name", ""),
        "config_hash": params.get("config_hash", ""),
        "training_rounds": params.get("rounds", ""),
    }
    total = params.get("rounds")
    facts[FINAL_TAG] = "true" if total is None or total == rnd else "false"
    return {k: v for k, v in facts.items() if v}


def rank(tags: Mapping[str, str]) -> tuple[int, float]:
    """A version's place in the champion's race: (test images scored, accuracy); (-1, -1) when
    its tags are missing or out of range (store data: a tampered champion loses its place
    instead of stopping the registration)."""
    total = tags.get("total", "")
    images = int(total) if total.isdigit() and 0 < int(total) <= MNIST_TEST_IMAGES else -1
    return (images, _accuracy_tag(tags.get("accuracy")) if images > 0 else -1.0)


def link_logged_model(client: Any, model_id: str, name: str, version: str) -> None:
    """List version `version` of `name` in logged model `model_id`'s `mlflow.modelVersions` tag,
    which the UI reads to show a logged model as registered (MLflow's server sets it when it
    creates a version from a logged model; its local stores do not). Idempotent."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    entry = {"name": name, "version": version}
    raw = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    listed: list[Any] = []
    if raw:
        try:
            loaded = json.loads(raw)
            listed = loaded if isinstance(loaded, list) else []
        except ValueError:
            listed = []
    known = [(e.get("name"), str(e.get("version"))) for e in listed if isinstance(e, dict)]
    if (name, version) in known:
        return
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, entry])})


def _accuracy_tag(text: str | None) -> float:
    """A version's `accuracy` tag as a number in [0, 1]; -1 when absent or not one (tags are
    store data: a tampered champion loses its place instead of stopping the registration)."""
    try:
        value = float(text if text is not None else "")
    except ValueError:
        return -1.0
    return value if 0.0 <= value <= 1.0 else -1.0
