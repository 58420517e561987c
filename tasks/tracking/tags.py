"""The tags every run gets besides the flow's own (Prefect's context, MLflow's source fields and
the code version), and the experiment's: marked as model training, so the MLflow UI opens it on
its runs rather than on the GenAI view (traces, "no data") it infers for an unmarked experiment."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import fedcore

log = logging.getLogger("tasks.tracking")

# The experiment tag the MLflow 3 UI reads to choose an experiment's view, and the value its own
# "Machine learning" choice writes (the UI's ExperimentKind enum).
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
EXPERIMENT_NOTE = "mlflow.note.content"  # an experiment's description in the UI


def prefect_context() -> dict[str, str]:
    """Prefect's flow run id, name and UI URL and the deployment name, where there are some.

    Raises:
        Exception: whatever Prefect raises outside a flow run context.
    """
    from prefect.runtime import deployment, flow_run

    out = {
        "prefect.flow_run_id": str(flow_run.get_id() or "local"),
        "prefect.flow_run_name": str(flow_run.get_name() or ""),
    }
    url = flow_run.get_flow_run_ui_url()
    if url and url.startswith(("http://", "https://")):
        out["prefect.flow_run_url"] = url
    if deployment.get_id():
        out["prefect.deployment"] = str(deployment.get_name() or deployment.get_id())
    return out


def context_tags() -> dict[str, str]:
    """Prefect's context (none when it cannot be read) and MLflow's source fields."""
    try:
        tags = prefect_context()
    except Exception as exc:  # noqa: BLE001 - a missing Prefect context must not stop the record
        log.debug("no Prefect context: %s", exc)
        tags = {}
    return {**tags, "mlflow.source.name": "flows/federated.py", "mlflow.source.type": "JOB"}


def code_version_tags() -> dict[str, str]:
    """`code_version` (fedcore version, plus `+g<commit>[.dirty]` in a git checkout) and the
    commit itself. Runs `git`: call it off the critical path (the tracking thread does)."""
    version = fedcore.__version__
    checkout = Path(fedcore.__file__).resolve().parents[1]
    tags = {"code_version": version}
    if not (checkout / ".git").exists():
        return tags

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        full = git("rev-parse", "HEAD")
        if not full:
            return tags
        dirty = ".dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    except (OSError, subprocess.SubprocessError):
        return tags
    tags.update(
        code_version=f"{version}+g{full[:7]}{dirty}",
        git_commit=full[:7],
        **{"mlflow.source.git.commit": full},
    )
    return tags


def mark_model_training(client: Any, experiment_id: str, note: str) -> None:
    """Tag experiment `experiment_id` as model training and give it `note` as its description,
    each only where unset (a kind or description chosen in the UI stays). Two reads at most."""
    tags = client.get_experiment(experiment_id).tags
    if EXPERIMENT_KIND not in tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    if not tags.get(EXPERIMENT_NOTE):
        client.set_experiment_tag(experiment_id, EXPERIMENT_NOTE, note)
