"""Device lineage in the MLflow record: which device trained, on what, with which data.

- Each worker's hello as run tags `device.<worker>.<key>`: Python, torch, the torch device,
  threads, shard, example count, pacing, and the hello's facts (`fedcore.device_facts`: CUDA
  name and capability, memory, `cryptography`, `torch_func`, a Jetson's model).
- Each worker's shard as a dataset input of the run (`training` for a trainer, `evaluation` for
  the evaluator), digested from its label counts: the coordinator never sees an example, so the
  counts its hello reports are all there is to fingerprint; two shards with the same counts per
  digit of the same split have the same digest.
- The per-round device metrics (`device/<worker>/rss_mb`, `.../cuda_max_mb`, `.../temp_c`) are
  `naming.round_metrics`'.

The tags and the dataset's name and profile are pure (`device_tags`, `label_digest`,
`shard_profile`); `log_devices` writes them on the tracker's logging thread.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from typing import Any

from fedcore.protocol import Hello

from .batching import log_batch

TAG_PREFIX = "device"
DATASET_SOURCE_TYPE = "fedmnist-device"  # the shard lives on the device; nothing to load here
DIGEST_CHARS = 16  # MLflow keeps at most 36 characters of a dataset's digest


def device_tags(worker: str, hello: Hello) -> dict[str, str]:
    """The run tags of worker `worker`'s hello: `device.<worker>.<key>` -> value."""
    fields = {
        "python": hello.python,
        "torch": hello.torch,
        "device": hello.device,
        "threads": str(hello.threads),
        "shard": hello.shard,
        "examples": str(hello.num_examples),
        "protocol": str(hello.protocol),
        "pacing": hello.pacing,
        "slowdown": f"{hello.slowdown:g}",
    }
    # The hello's own fields win over a fact of the same name (`threads` is both).
    merged = {**hello.facts, **fields}
    return {f"{TAG_PREFIX}.{worker}.{key}": value for key, value in sorted(merged.items())}


def label_digest(counts: Mapping[int, int]) -> str:
    """A shard's fingerprint: SHA-256 of its label counts in label order (16 hex digits)."""
    canonical = json.dumps([[int(k), int(v)] for k, v in sorted(counts.items())])
    return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_CHARS]


def shard_profile(hello: Hello) -> dict[str, Any]:
    """What MLflow shows as the dataset's profile: example count and count per digit."""
    return {
        "num_rows": hello.num_examples,
        "label_counts": {str(k): v for k, v in sorted(hello.label_counts.items())},
    }


def shard_input(worker: str, hello: Hello, context: str) -> Any:
    """Worker `worker`'s shard as an MLflow `DatasetInput` tagged with `context`."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(
        name=f"mnist-{worker}",
        digest=label_digest(hello.label_counts),
        source_type=DATASET_SOURCE_TYPE,
        source=json.dumps({"worker": worker, "shard": hello.shard}),
        profile=json.dumps(shard_profile(hello)),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def log_devices(
    client: Any, run_id: str, hellos: Mapping[str, Hello], trainers: Collection[str]
) -> None:
    """Tag run `run_id` with every hello in `hellos` and log each worker's shard as an input
    (`training` for the names in `trainers`, else `evaluation`)."""
    tags: dict[str, str] = {}
    for worker, hello in hellos.items():
        tags.update(device_tags(worker, hello))
    log_batch(client, run_id, tags=tags)
    datasets = [
        shard_input(w, h, "training" if w in trainers else "evaluation") for w, h in hellos.items()
    ]
    if datasets:
        client.log_inputs(run_id, datasets=datasets)
