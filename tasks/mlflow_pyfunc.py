"""The pyfunc "model from code" that `tasks/mlflow_model.save` stores with every logged model, for
MLflow's own tools (`mlflow models serve`, `mlflow.pyfunc.load_model` by someone who trusts the
store). This project never loads a model through it: `tasks/mlflow_model.py` reads the weights
file with the local code. MLflow executes this file on load, so it imports only torch, numpy,
MLflow and fedcore; the fedcore it finds is the copy in the model's own `code/` folder (MLflow
puts it first on sys.path), `tasks/mlflow_model.MODEL_CODE_MODULES`, so a machine without this
project loads it too.
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class FederatedCNN(PythonModel):
    """Pyfunc wrapper of `fedcore.model.Net`; `net` and `metadata` are set by `load_context`."""

    net: Any = None
    metadata: dict[str, str] = {}

    def load_context(self, context: Any) -> None:
        from fedcore.checkpoint import load_weights
        from fedcore.model import build_model

        weights, meta = load_weights(Path(context.artifacts["weights"]))
        self.metadata = meta
        self.net = build_model(weights).eval()

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """(N, 1, 28, 28) normalised images -> (N, 10) log-probabilities. (No `from __future__
        import annotations` here: MLflow reads the `np.ndarray` hint as a live object.)"""
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32)).reshape(-1, 1, 28, 28)
        with torch.inference_mode():
            return self.net(x).numpy()


set_model(FederatedCNN())
