"""`fedmnist models` and `fedmnist ui`: the registered model versions, and the MLflow UI.

  fedmnist models list                          versions with round, accuracy, aliases
  fedmnist models export VERSION|ALIAS --out F  write that version's safetensors file
  fedmnist models evaluate VERSION|ALIAS        load it, score it on the MNIST test set here
  fedmnist ui [--port 5000]                     `mlflow ui` on the project's store

Each takes `--tracking-uri` (default: $MLFLOW_TRACKING_URI, else the project's SQLite store
$FEDMNIST_HOME/mlflow.db: where `fedmnist run` records when the config names no store).
`evaluate` runs in this process. `export` and `evaluate` download only the version's
`artifacts/weights.safetensors` (size-bounded, hash-checked against the version's
`weights_sha256` tag) and build the Net with the local code (tasks/mlflow_model.py): nothing is
loaded through pyfunc and no code or pickle from the store runs here. A version that cannot be
used is refused with the reason (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REGISTERED_MODEL = "federated-mnist-cnn"  # tasks.tracking.REGISTERED_MODEL, kept import-free


def add_parsers(sub: Any) -> None:
    """Add the `models` and `ui` subcommands to `fedmnist`'s subparsers."""
    from flows.cli_help import doc

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///$FEDMNIST_HOME/mlflow.db)",
    )
    common.add_argument(
        "--name", default=REGISTERED_MODEL, help=f"registered model (default: {REGISTERED_MODEL})"
    )

    models = sub.add_parser(
        "models",
        help="list, export and evaluate registered model versions",
        **doc(
            "The registered global models of past trainings (one version per evaluated round, "
            "aliases `current` and `champion`). Reading a version downloads only its "
            "safetensors file, checks its size and hash, and builds the Net with this "
            "checkout's code: nothing stored in MLflow is executed.",
            "fedmnist models list",
            "fedmnist models evaluate champion",
            "fedmnist models export champion --out champion.safetensors",
        ),
    )
    msub = models.add_subparsers(dest="models_command", required=True)
    p = msub.add_parser(
        "list",
        parents=[common],
        help="versions with round, accuracy, aliases",
        **doc(
            "One line per version of the registered model: its round, federated test accuracy, "
            "aliases and the MLflow run that logged it.",
            "fedmnist models list",
            "fedmnist models list --tracking-uri http://127.0.0.1:5000",
        ),
    )
    p.set_defaults(func=cmd_list)
    ref_help = "a version number (3) or an alias (champion, current)"
    p = msub.add_parser(
        "export",
        parents=[common],
        help="write a version's safetensors file",
        **doc(
            "Write a version's weights as a safetensors file, after checking it is this Net's "
            "(names, shapes, dtypes, values) and that its SHA-256 matches the registration.",
            "fedmnist models export champion --out champion.safetensors",
            "fedmnist models export 3 --out v3.safetensors",
        ),
    )
    p.add_argument("ref", metavar="VERSION|ALIAS", help=ref_help)
    p.add_argument("--out", required=True, help="file to write (.safetensors)")
    p.set_defaults(func=cmd_export)
    p = msub.add_parser(
        "evaluate",
        parents=[common],
        help="load a version and score it on the MNIST test set",
        **doc(
            "Score a version on the MNIST test set on this machine and print the seed's "
            "evaluation lines; exit 1 when the score differs from the one logged with it.",
            "fedmnist models evaluate champion",
            "fedmnist models evaluate 3 --data-dir .fedmnist/data/mnist",
        ),
    )
    p.add_argument("ref", metavar="VERSION|ALIAS", help=ref_help)
    p.add_argument("--data-dir", help="MNIST directory (default: $FEDMNIST_HOME/data/mnist)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "ui",
        help="open the MLflow UI on the project's store (mlflow ui)",
        **doc(
            "Start `mlflow ui` on the project's store (its SQLite file and artifact folder) in "
            "the foreground; with a tracking server as the store, print its address instead.",
            "fedmnist ui",
            "fedmnist ui --port 5001 --host 0.0.0.0",
            "fedmnist ui --print-command",
        ),
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///$FEDMNIST_HOME/mlflow.db)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")
    p.add_argument("--print-command", action="store_true", help="print the command, do not run it")
    p.set_defaults(func=cmd_ui)


# -- helpers ----------------------------------------------------------------------------------


def _uri(args: argparse.Namespace) -> str:
    from tasks.tracking import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri)


def _shown(uri: str) -> str:
    from tasks.tracking import redact_uri

    return redact_uri(uri)


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def resolve_version(client: Any, name: str, ref: str) -> Any:
    """The `ModelVersion` named by a version number or an alias.

    Raises:
        LookupError: no such registered model, version or alias (the message lists what exists).
    """
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        raise LookupError(f"no registered model {name!r} in this store") from None
    if ref.isdigit():
        try:
            return client.get_model_version(name, ref)
        except MlflowException:
            raise LookupError(f"{name} has no version {ref}") from None
    version = registered.aliases.get(ref)
    if version is None:
        known = ", ".join(sorted(registered.aliases)) or "none"
        raise LookupError(f"{name} has no alias {ref!r} (aliases: {known})")
    return client.get_model_version(name, str(version))


def _aliases(client: Any, name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        out.setdefault(str(version), []).append(alias)
    return out


def _percent(text: str | None) -> str:
    try:
        return f"{100 * float(text or ''):.2f}%"
    except ValueError:
        return "-"


def _groups(text: str | None) -> list[list[int]]:
    """The digit groups a version's tag names; [] when the tag is absent or not a short list of
    digit lists (tags are store data: read, never trusted)."""
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    if not isinstance(value, list) or len(value) > 10:
        return []
    ok = all(
        isinstance(g, list) and all(isinstance(d, int) and 0 <= d <= 9 for d in g) for g in value
    )
    return value if ok else []


# -- commands ---------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    uri = _uri(args)
    client = _client(uri)
    try:
        aliases = _aliases(client, args.name)
    except Exception as exc:  # noqa: BLE001 - shown as the store's answer
        from tasks.tracking import redact_text

        return _error(
            redact_text(f"{_shown(uri)}: cannot read registered model {args.name!r}: {exc}", uri)
        )
    versions = sorted(
        client.search_model_versions(f"name='{args.name}'"), key=lambda v: int(v.version)
    )
    print(f"{args.name} in {_shown(uri)}: {len(versions)} version(s)")
    print(f"{'version':>7}  {'round':>5}  {'accuracy':>8}  {'aliases':<18} run")
    for v in versions:
        tags = v.tags or {}
        shown = _percent(tags.get("accuracy"))
        names = ",".join(sorted(aliases.get(str(v.version), []))) or "-"
        print(f"{v.version:>7}  {tags.get('round', '-'):>5}  {shown:>8}  {names:<18} {v.run_id}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tasks.mlflow_model import StoredModelError, load_stored_weights

    uri = _uri(args)
    client = _client(uri)
    try:
        version = resolve_version(client, args.name, args.ref)
    except LookupError as exc:
        return _error(f"{_shown(uri)}: {exc}")
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="fedmnist-export-") as tmp:
        try:  # validated before anything is written
            _, meta, weights = load_stored_weights(client, uri, version, Path(tmp))
        except StoredModelError as exc:
            return _error(f"{_shown(uri)}: {exc}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, out)
    print(
        f"wrote {out}: {args.name} version {version.version} (round {meta.get('round', '?')}, "
        f"strategy {meta.get('strategy', '?')}, config {meta.get('config_hash', '?')})"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedcore.config import default_data_dir
    from fedcore.errors import FedError
    from fedcore.evaluation import evaluate
    from fedcore.mnist import load_shard
    from fedcore.report import evaluation_lines
    from fedcore.shards import ShardSpec
    from tasks.mlflow_model import StoredModelError, load_stored_weights

    uri = _uri(args)
    client = _client(uri)
    try:
        version = resolve_version(client, args.name, args.ref)
    except LookupError as exc:
        return _error(f"{_shown(uri)}: {exc}")
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    try:
        images, labels = load_shard(str(data_dir), ShardSpec(split="test"))
    except FedError as exc:
        return _error(str(exc))
    tags = version.tags or {}
    groups = _groups(tags.get("groups"))
    with tempfile.TemporaryDirectory(prefix="fedmnist-eval-") as tmp:
        try:
            net, _, _ = load_stored_weights(client, uri, version, Path(tmp))
        except StoredModelError as exc:
            return _error(f"{_shown(uri)}: {exc}")
    result = evaluate(net, images, labels, groups)
    names = ",".join(sorted(_aliases(client, args.name).get(str(version.version), [])))
    print(
        f"{args.name} version {version.version}"
        + (f" ({names})" if names else "")
        + f": round {tags.get('round', '?')} of run {version.run_id}"
    )
    for line in evaluation_lines("federated", result, groups):
        print(line)
    logged = tags.get("correct")
    if logged is None:
        return 0
    if logged == str(result.correct):
        print(f"Matches the logged accuracy ({logged}/{tags.get('total', '?')}).")
        return 0
    print(f"Differs from the logged accuracy {logged}/{tags.get('total', '?')}.", file=sys.stderr)
    return 1


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow ui` serving the store `uri`; a SQLite store's artifacts stay beside it."""
    from tasks.tracking import artifact_root_for

    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "ui", "--backend-store-uri", uri]
    root = artifact_root_for(uri)
    if root is not None:
        cmd += ["--artifacts-destination", str(root)]
    return cmd + ["--host", host, "--port", str(port)]


def cmd_ui(args: argparse.Namespace) -> int:
    from tasks.tracking import is_server

    uri = _uri(args)
    if is_server(uri):
        print(f"The store is an MLflow server: open {_shown(uri)}")
        return 0
    cmd = ui_command(uri, args.host, args.port)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    print(
        f"MLflow UI for {_shown(uri)} on http://{args.host}:{args.port} (Ctrl-C stops it)",
        flush=True,
    )
    try:
        return subprocess.call(cmd, env=dict(os.environ))
    except KeyboardInterrupt:
        return 0
