"""The federated CNN as an MLflow model: a pyfunc "model from code" whose one artifact is a
safetensors file.

MLflow pickles a `PythonModel` object with cloudpickle unless the model is given as code; this file
is that code. `save()` hands MLflow the *path* of this file, so a logged model holds this source,
`artifacts/weights.safetensors` and text (MLmodel, requirements): no pickle anywhere in the registry
(DESIGN decision 3). Loading executes this file, which rebuilds `fedcore.model.Net` and reads the
weights with `fedcore.checkpoint.load_weights` (names, shapes and dtypes validated).

`log` and `register` put one global model into a store through an explicit `MlflowClient` (the
tracker's background thread calls them); `load` reads a model directory back.

Input: float32 images shaped (N, 1, 28, 28), normalised as `fedcore.mnist.load_shard` gives them
(mean 0.1307, std 0.3081). Output: (N, 10) float32 log-probabilities. Requirements are explicit
(inferring them costs 5-6 s per model, FIELD-NOTES): torch, numpy and this project
(`federated-mnist`, which provides fedcore); install the project where the model is loaded.
"""

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

ALIAS_CURRENT = "current"  # the newest version; MLflow reserves the name `latest`
ALIAS_CHAMPION = "champion"  # the best federated test accuracy so far
WEIGHTS = "weights"  # the artifact key; the file lands at artifacts/weights.safetensors
WEIGHTS_FILE = "weights.safetensors"


class FederatedCNN(PythonModel):
    """Pyfunc wrapper of `fedcore.model.Net`; `net` and `metadata` are set by `load_context`."""

    net: Any = None
    metadata: dict[str, str] = {}

    def load_context(self, context: Any) -> None:
        from fedcore.checkpoint import load_weights
        from fedcore.model import build_model

        weights, meta = load_weights(Path(context.artifacts[WEIGHTS]))
        self.metadata = meta
        self.net = build_model(weights).eval()

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """(N, 1, 28, 28) normalised images -> (N, 10) log-probabilities. (`np.ndarray` is a hint
        MLflow infers no schema from, and warns about none; the signature is given in `save`.
        No `from __future__ import annotations` here: MLflow reads the hint as a live object.)"""
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32)).reshape(-1, 1, 28, 28)
        with torch.inference_mode():
            return self.net(x).numpy()


def pip_requirements() -> list[str]:
    """What loading needs, stated (never inferred)."""
    import fedcore

    return ["torch>=2.1", "numpy>=1.24", f"federated-mnist=={fedcore.__version__}"]


def signature() -> Any:
    """Tensor signature: float32 (-1, 1, 28, 28) in, float32 (-1, 10) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def save(
    path: Path, weights_file: Path, metadata: dict[str, Any], mlflow_model: Any = None
) -> Path:
    """Write the MLflow model directory `path` (must not exist or be empty).

    Args:
        path: the model directory to create.
        weights_file: a safetensors file of the Net (stored as artifacts/weights.safetensors).
        metadata: JSON-able facts shown in MLmodel (round, strategy, config hash, accuracy, ...).
        mlflow_model: an `mlflow.models.Model` carrying run/model ids, when logging.
    """
    import mlflow.pyfunc

    if weights_file.name != WEIGHTS_FILE:  # the artifact keeps its file name: make it ours
        with tempfile.TemporaryDirectory(prefix="fedmnist-weights-") as tmp:
            named = Path(tmp) / WEIGHTS_FILE
            shutil.copyfile(weights_file, named)
            return save(path, named, metadata, mlflow_model)
    with warnings.catch_warnings():
        # No input example (it would run a prediction per save) and no type hints (the tensor
        # signature is given explicitly): MLflow warns about both.
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(Path(__file__).resolve()),
            artifacts={WEIGHTS: str(weights_file)},
            pip_requirements=pip_requirements(),
            signature=signature(),
            metadata=metadata,
            mlflow_model=mlflow_model,
        )
    return path


def log(
    client: Any,
    experiment_id: str,
    run_id: str,
    name: str,
    step: int,
    weights_file: Path,
    facts: dict[str, str],
) -> str:
    """Log `weights_file` as a logged model of run `run_id` at `step`, through `client` (explicit
    store and run: MLflow's fluent `log_model` uses the process-wide URI and the thread's active
    run). `facts` join the weights' metadata and MLmodel's. Returns the model id."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    from fedcore.checkpoint import load_weights, save_weights

    weights, meta = load_weights(weights_file)
    facts = {**meta, **facts}
    model = client.create_logged_model(
        experiment_id,
        name=name,
        source_run_id=run_id,
        params={k: facts[k] for k in ("round", "strategy", "config_hash") if k in facts},
        tags={"round": str(step)},
        model_type="pyfunc",
    )
    with tempfile.TemporaryDirectory(prefix="fedmnist-model-") as tmp:
        local = save(
            Path(tmp) / "model",
            save_weights(Path(tmp) / WEIGHTS_FILE, weights, facts),
            metadata=facts,
            mlflow_model=Model(
                artifact_path=model.artifact_location,
                run_id=run_id,
                model_id=model.model_id,
                model_uuid=model.model_id,
            ),
        )
        client.log_model_artifacts(model.model_id, str(local))
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    return str(model.model_id)


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
    """Make logged model `model_id` a new version of registered model `name` (created if new);
    alias `current` moves to it, and `champion` too when `accuracy` beats the champion's tag
    (a tie keeps the older version). `local_store`: the URI when it is not a server. Returns the
    version number."""
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
        best = float(client.get_model_version(name, champion).tags.get("accuracy", -1.0))
    if accuracy > best:
        client.set_registered_model_alias(name, ALIAS_CHAMPION, version.version)
    return str(version.version)


def load(model_dir: Path) -> FederatedCNN:
    """Load a saved or downloaded model directory; returns the wrapper (`.net`, `.metadata`)."""
    import mlflow.pyfunc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = mlflow.pyfunc.load_model(str(model_dir))
    return model.unwrap_python_model()


set_model(FederatedCNN())
