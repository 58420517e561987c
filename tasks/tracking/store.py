"""Where the MLflow record goes, and opening it.

The store is `tracking.uri` in the config, else `$MLFLOW_TRACKING_URI`, else the SQLite store
`$FEDMNIST_HOME/mlflow.db` with its artifacts in `mlartifacts/` beside it (MLflow would otherwise
write them under the current directory). A server is health-checked before use so that an
unreachable one is named, with the fixes, before the training starts. Credentials for a server
are MLflow's own (`MLFLOW_TRACKING_USERNAME`/`_PASSWORD`/`_TOKEN` in the environment); a URI that
carries them itself (`https://user:pass@host`, `postgresql://u:p@h/db`) is used as given to
connect, and shown everywhere else through `redact_uri` (params, config.json, links, messages,
logs): the user part becomes `***`. MLflow itself is imported only when a store is opened.
"""

from __future__ import annotations

import base64
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fedcore.config import URI_USERINFO, fedmnist_home, redact_uri
from fedcore.errors import FedError

ENV_URI = "MLFLOW_TRACKING_URI"
HEALTH_TIMEOUT = 5.0  # seconds for GET <server>/health


class TrackingUnavailable(FedError):
    """The MLflow store cannot be reached or cannot open the run."""


def _without_userinfo(uri: str) -> str:
    return URI_USERINFO.sub(r"\g<scheme>", uri, count=1)


def redact_text(text: str, uri: str) -> str:
    """`text` with `uri` and its credentials (user info, password) replaced, for messages that
    embed what a library said about the store."""
    found = URI_USERINFO.match(uri)
    if not found:
        return text
    text = text.replace(uri, redact_uri(uri))
    userinfo = found.group("userinfo")
    for secret in (userinfo, userinfo.partition(":")[2]):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def default_tracking_uri() -> str:
    """The project's SQLite store: $FEDMNIST_HOME/mlflow.db."""
    return f"sqlite:///{fedmnist_home() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    """Where the project's SQLite store keeps artifacts: $FEDMNIST_HOME/mlartifacts."""
    return fedmnist_home() / "mlartifacts"


def resolve_tracking_uri(configured: str | None) -> str:
    """The store to use.

    Args:
        configured: `tracking.uri` from the config, if set.

    Returns:
        `configured`, else $MLFLOW_TRACKING_URI, else the project's store.
    """
    return configured or os.environ.get(ENV_URI) or default_tracking_uri()


def is_server(uri: str) -> bool:
    """Whether `uri` is an MLflow tracking server (http or https)."""
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative paths are relative to the cwd), else
    None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()


def artifact_root_for(uri: str) -> Path | None:
    """Where a SQLite store's artifacts go: `mlartifacts/` beside the database file. None: the
    store decides (a server)."""
    db = sqlite_path(uri)
    return db.parent / "mlartifacts" if db is not None else None


def fix_hint(uri: str) -> str:
    """What to do about store `uri` not answering: the sentences ending every error about it."""
    db = sqlite_path(uri)
    if db is not None:  # a file: nothing to start, but something may hold it or starve it
        return (
            f"The SQLite file {db} may be locked by another program (`fuser {db}` shows who "
            "holds it) or the machine too busy to write it; try again when it is free, point "
            f"tracking.uri (`--set tracking.uri=...`) or ${ENV_URI} at an MLflow server, or "
            "`--set tracking.enabled=false` to train without a record."
        )
    port = urlsplit(uri).port or 5000
    return (
        "Start the server (e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --host "
        f"127.0.0.1 --port {port}`), or point tracking.uri (`--set tracking.uri=...`) or "
        f"${ENV_URI} at a running one, or unset both to use the local store "
        f"{default_tracking_uri()}; `--set tracking.enabled=false` trains without a record."
    )


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT) -> None:
    """GET `<uri>/health` of an MLflow server.

    Args:
        uri: the server's base URL.
        timeout: seconds to wait for the answer.

    Raises:
        TrackingUnavailable: no answer, or not OK; the message names the URI and the fixes.
    """
    url = uri.rstrip("/") + "/health"
    request = urllib.request.Request(_without_userinfo(url))
    found = URI_USERINFO.match(url)
    if found:  # urllib takes no credentials in the URL: send them as MLflow's client does
        user, _, password = found.group("userinfo").partition(":")
        token = f"{unquote(user)}:{unquote(password)}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(token).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if resp.status == 200:
                return
            reason = f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    shown = redact_uri(uri)
    raise TrackingUnavailable(
        redact_text(
            f"MLflow tracking server {shown} is not reachable (GET {redact_uri(url)}: {reason}). "
            f"{fix_hint(shown)}",
            uri,
        )
    )


def open_store(uri: str) -> Any:
    """An `MlflowClient` on store `uri` (tracking and registry), a server health-checked first
    and a SQLite file's folder created.

    Raises:
        TrackingUnavailable: `uri` is a server that does not answer.
    """
    from mlflow.tracking import MlflowClient

    if URI_USERINFO.match(uri):
        # MLflow prints "View run ... at: <uri>/#/..." when a run ends, credentials included;
        # the flow logs its own link (without them).
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if is_server(uri):
        check_server(uri)
    # One INFO line per registered version ("Waiting up to 300 seconds ...") otherwise.
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: Any, name: str, artifact_root: Path | None) -> str:
    """The id of experiment `name`, created when new.

    Args:
        client: an `MlflowClient`.
        name: the experiment's name.
        artifact_root: where a new experiment's artifacts go (`<root>/<name>`); None: the store
            decides.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if artifact_root is not None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        location = (artifact_root / name).as_uri()
    return str(client.create_experiment(name, artifact_location=location))
