"""The tags every run gets besides the flow's own: Prefect's context, MLflow's source fields and
the code version."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import fedcore

log = logging.getLogger("tasks.tracking")


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
