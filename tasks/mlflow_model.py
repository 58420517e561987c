"""The federated CNN as an MLflow model: written as a self-contained pyfunc "model from code" for
MLflow's own tools, read back only as its safetensors file with the LOCAL model code.

Writing: MLflow pickles a `PythonModel` object with cloudpickle unless the model is given as code;
`save()` hands MLflow the *path* of `tasks/mlflow_pyfunc.py`, so a logged model holds that source,
`artifacts/weights.safetensors`, the few fedcore modules the pyfunc imports (`code/fedcore/`,
MLflow's `code_paths`: the Net, and fedcore's own safetensors reader that checks every tensor
against it), an input example and text (MLmodel, requirements: torch and numpy, MLflow adds
itself). No pickle anywhere in the registry, and no dependency on this checkout: `mlflow models
serve` and `mlflow.pyfunc.load_model` work on any machine with MLflow and torch
(tests/tasks/test_model_serving.py serves a registered version from a fresh venv).

Reading: nothing here loads a model through pyfunc. `mlflow.pyfunc.load_model` executes the
`mlflow_model.py` kept in the artifact store, honours the MLmodel's `loader_module` and unpickles
cloudpickle models, so whoever can write the registry or the artifact store would run code on the
operator's machine. `load_stored_weights` instead downloads the one plain file
`artifacts/weights.safetensors` (its listed size checked against a bound derived from the Net
before any byte is fetched, its size checked again on disk, its SHA-256 checked when the version
records one), reads it with fedcore's safetensors reader and checks every name, shape, dtype and
value against `fedcore.model.Net`. The MLmodel file and the code next to it are never read.

Input of the Net: float32 images shaped (N, 1, 28, 28), normalised as `fedcore.mnist.load_shard`
gives them. Output: (N, 10) float32 log-probabilities.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcore.errors import FedError

WEIGHTS = "weights"  # the artifact key; the file lands at artifacts/weights.safetensors
WEIGHTS_FILE = "weights.safetensors"
WEIGHTS_PATH = f"artifacts/{WEIGHTS_FILE}"  # inside a logged model's directory
SHA_TAG = "weights_sha256"  # the version tag recording the file's hash
HEADER_ALLOWANCE = 64 * 1024  # safetensors header and metadata beyond the raw tensor bytes
PYFUNC_CODE = Path(__file__).resolve().with_name("mlflow_pyfunc.py")
# The fedcore modules `mlflow_pyfunc.py` imports (checkpoint, model) and what they import: the
# code that travels with every logged model. Fixed here rather than walked at each save (a
# thread-unsafe `ast.parse` on the logging thread); a test holds it equal to the import closure.
MODEL_CODE_MODULES = ("__init__", "checkpoint", "errors", "model", "tensorcodec", "wire")


class StoredModelError(FedError):
    """A model version in the store cannot be used: no weights file, too large, a hash that
    differs from the record, or weights that are not the Net's. Not transient: the stored bytes
    stay what they are."""

    cause = "failed"
    transient = False


def max_weights_bytes() -> int:
    """The largest weights file accepted: the Net's raw tensor bytes plus the header allowance."""
    from fedcore.model import weight_spec

    total = 0
    for shape, dtype in weight_spec().values():
        total += int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    return total + HEADER_ALLOWANCE


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_net_file(path: Path, what: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """The Net (eval mode) and metadata of a local safetensors file, size-bounded first.

    Raises:
        StoredModelError: the file is too large or not a valid safetensors file of the Net.
    """
    from fedcore.checkpoint import load_weights
    from fedcore.model import build_model

    limit = max_weights_bytes()
    size = path.stat().st_size
    if size > limit:
        raise StoredModelError(
            f"{what}: {WEIGHTS_FILE} is {size} bytes, more than the {limit} a model of this "
            "Net can take; the store holds something else: register a model written by "
            "`fedmnist run`, or export a known-good file"
        )
    try:
        weights, meta = load_weights(path)
    except FedError as exc:
        raise StoredModelError(
            f"{what}: {WEIGHTS_FILE} is not a valid model of this Net ({exc}); the stored file "
            "is damaged or was replaced: register the round again from its checkpoint"
        ) from None
    return build_model(weights).eval(), meta


def load_stored_weights(
    client: Any, tracking_uri: str, version: Any, dest: Path
) -> tuple[torch.nn.Module, dict[str, str], Path]:
    """Download a registered version's weights file alone and build the Net from it.

    Args:
        client: an `MlflowClient` on the store (tracking and registry).
        tracking_uri: the store's URI (artifact downloads resolve against it).
        version: the `ModelVersion`.
        dest: an empty folder to download into.

    Returns:
        (the Net in eval mode, the file's metadata, the downloaded file).

    Raises:
        StoredModelError: no weights file, too large, a hash that differs from the version's
            `weights_sha256` tag, or weights that are not the Net's (the message says which).
    """
    from mlflow.artifacts import download_artifacts, list_artifacts

    what = f"{version.name} version {version.version}"
    location = str(client.get_model_version_download_uri(version.name, version.version))
    listed = {
        f.path.rsplit("/", 1)[-1]: f
        for f in list_artifacts(artifact_uri=f"{location}/artifacts", tracking_uri=tracking_uri)
    }
    info = listed.get(WEIGHTS_FILE)
    if info is None or info.is_dir:
        raise StoredModelError(
            f"{what}: the store holds no {WEIGHTS_PATH} for it (found: "
            f"{sorted(listed) or 'nothing'}); only models logged by `fedmnist run` can be loaded"
        )
    limit = max_weights_bytes()
    if info.file_size is not None and info.file_size > limit:
        raise StoredModelError(
            f"{what}: {WEIGHTS_FILE} is listed at {info.file_size} bytes, more than the {limit} "
            "a model of this Net can take; not downloaded"
        )
    path = Path(
        download_artifacts(
            artifact_uri=f"{location}/{WEIGHTS_PATH}", dst_path=str(dest), tracking_uri=tracking_uri
        )
    )
    expected = (version.tags or {}).get(SHA_TAG)
    if expected is not None and path.stat().st_size <= limit:
        got = sha256_file(path)
        if got != expected:
            raise StoredModelError(
                f"{what}: {WEIGHTS_FILE} has SHA-256 {got[:16]}..., the version records "
                f"{str(expected)[:16]}...; the stored file was changed after registration: do not "
                "use this version, register the round again from its checkpoint"
            )
    net, meta = load_net_file(path, what)
    return net, meta, path


# -- writing ----------------------------------------------------------------------------------


def pip_requirements() -> list[str]:
    """What loading through MLflow's tools needs, stated (never inferred): torch and numpy. The
    model's own code travels in `code/` and reads the weights with fedcore's safetensors reader
    (torch and the standard library), so neither this project nor `safetensors` is required;
    MLflow adds its own pin."""
    return ["torch>=2.1", "numpy>=1.24"]


def signature() -> Any:
    """Tensor signature: float32 (-1, 1, 28, 28) in, float32 (-1, 10) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def input_example() -> np.ndarray:
    """One blank image, normalised as the Net expects: what `mlflow models serve` and the UI
    show as a request (`{"inputs": [[[[...]]]]}`)."""
    from fedcore.model import NORMALIZE_MEAN, NORMALIZE_STD

    return np.full((1, 1, 28, 28), (0.0 - NORMALIZE_MEAN) / NORMALIZE_STD, dtype=np.float32)


class _QuietValidation(logging.Filter):
    """Drops MLflow's INFO line "Validating input example against model signature", which
    `save_model` logs for every model (a check of the example's shape, no prediction): one line
    per evaluated round in the training's terminal otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Validating input example")


_QUIET = _QuietValidation()


def model_code(folder: Path) -> Path:
    """Copy the fedcore modules of `MODEL_CODE_MODULES` into `folder/fedcore` and return that
    package folder: what `code_paths` ships with the model."""
    import fedcore

    source = Path(fedcore.__file__).resolve().parent
    package = folder / "fedcore"
    package.mkdir(parents=True)
    for module in MODEL_CODE_MODULES:
        shutil.copyfile(source / f"{module}.py", package / f"{module}.py")
    return package


def save(
    path: Path, weights_file: Path, metadata: dict[str, Any], mlflow_model: Any = None
) -> Path:
    """Write the MLflow model directory `path` (must not exist or be empty).

    Args:
        path: the model directory to create.
        weights_file: a safetensors file of the Net (stored as artifacts/weights.safetensors).
        metadata: JSON-able facts shown in MLmodel (round, strategy, config hash, accuracy, ...).
        mlflow_model: an `mlflow.models.Model` carrying run/model ids, when logging.

    Returns:
        `path`, holding MLmodel, mlflow_pyfunc.py, code/fedcore/, artifacts/weights.safetensors,
        the input example and the environment files.
    """
    import mlflow.pyfunc

    logging.getLogger("mlflow.pyfunc").addFilter(_QUIET)  # addFilter skips one already there
    with tempfile.TemporaryDirectory(prefix="fedmnist-model-code-") as tmp:
        named = Path(tmp) / "weights" / WEIGHTS_FILE  # the artifact keeps its file name
        named.parent.mkdir()
        shutil.copyfile(weights_file, named)
        with warnings.catch_warnings():
            # No type hints (the tensor signature is given explicitly): MLflow warns about it.
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                str(path),
                python_model=str(PYFUNC_CODE),
                artifacts={WEIGHTS: str(named)},
                code_paths=[str(model_code(Path(tmp) / "code"))],
                pip_requirements=pip_requirements(),
                signature=signature(),
                input_example=input_example(),
                metadata=metadata,
                mlflow_model=mlflow_model,
            )
    return path


def load(model_dir: Path) -> tuple[torch.nn.Module, dict[str, str]]:
    """The Net and metadata of a saved or downloaded model directory: its weights file only,
    read with the local model code (the directory's code and MLmodel are never read)."""
    return load_net_file(Path(model_dir) / WEIGHTS_PATH, str(model_dir))
