"""The stored model: a pyfunc model from code for MLflow's tools (a safetensors file, no pickle),
read back here from its weights file alone, with the same predictions as the Net."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedcore.checkpoint import save_weights
from fedcore.model import build_model, initial_weights
from tasks import mlflow_model


def test_pyfunc_loads_the_safetensors_file_and_predicts(tmp_path: Path) -> None:
    weights = initial_weights(7)
    file = save_weights(tmp_path / "w.safetensors", weights, {"round": 3, "strategy": "mean"})
    model_dir = mlflow_model.save(tmp_path / "model", file, metadata={"round": 3})
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert "artifacts/weights.safetensors" in files and "mlflow_pyfunc.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    reqs = (model_dir / "requirements.txt").read_text().split()
    assert "torch>=2.1" in reqs and not any(r.startswith("federated-mnist") for r in reqs)

    net, meta = mlflow_model.load(model_dir)
    assert meta["strategy"] == "mean"
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = build_model(weights).eval()(x).detach().numpy()
    got = net(x).detach().numpy()
    assert got.shape == (5, 10) and np.array_equal(got, expected)

    import mlflow.pyfunc

    # MLflow's own tools still load it (our own fresh directory, through the signature check).
    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    assert np.array_equal(pyfunc.predict(x.numpy()), expected)


def test_loading_refuses_weights_of_another_shape(tmp_path: Path) -> None:
    bad = dict(initial_weights(1))
    bad["fc2.weight"] = torch.zeros(3, 500)
    file = save_weights(tmp_path / "bad.safetensors", bad, {})
    model_dir = mlflow_model.save(tmp_path / "model", file, metadata={})
    with pytest.raises(mlflow_model.StoredModelError, match="fc2.weight"):
        mlflow_model.load(model_dir)
