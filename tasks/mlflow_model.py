"""The federated CNN as an MLflow model: a pyfunc "model from code" whose one artifact is a
safetensors file.

MLflow pickles a `PythonModel` object with cloudpickle unless the model is given as code; this file
is that code. `save()` hands MLflow the *path* of this file, so a logged model holds this source,
`artifacts/weights.safetensors` and text (MLmodel, requirements): no pickle anywhere in the
registry, so loading a model never runs code hidden in a pickle, and a model stays loadable across
Python and cloudpickle versions. Loading executes this file, which rebuilds `fedcore.model.Net` and
reads the weights with `fedcore.checkpoint.load_weights` (names, shapes and dtypes validated); it
therefore imports only torch, numpy, MLflow and fedcore. Logging and registering a model in a
store is `tasks/tracking/models.py`; `load` reads a model directory back.

Input: float32 images shaped (N, 1, 28, 28), normalised as `fedcore.mnist.load_shard` gives them
(mean 0.1307, std 0.3081). Output: (N, 10) float32 log-probabilities. Requirements are explicit
(MLflow infers them by importing the model in a subprocess, 5-6 s per model): torch, numpy and
this project (`federated-mnist`, which provides fedcore); install the project where the model is
loaded.
"""

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

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


def load(model_dir: Path) -> FederatedCNN:
    """Load a saved or downloaded model directory; returns the wrapper (`.net`, `.metadata`)."""
    import mlflow.pyfunc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = mlflow.pyfunc.load_model(str(model_dir))
    return model.unwrap_python_model()


set_model(FederatedCNN())
