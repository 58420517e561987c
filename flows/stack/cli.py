"""`fedmnist stack up | down | status`: the PostgreSQL-backed Prefect and MLflow servers.

    fedmnist stack up [--postgres-port N] [--prefect-port N] [--mlflow-port N]
    fedmnist stack status [--json]
    fedmnist stack down

`up` and `status` print the two exports clients need (PREFECT_API_URL, MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flows.cli_help import doc

DEFAULT_PORTS = {"postgres": 55432, "prefect": 4300, "mlflow": 5300}  # as layout.DEFAULT_PORTS


def _exports(layout: Any) -> None:
    from .control import client_env
    from .layout import load_state

    state = load_state(layout)
    if state is None:
        return
    print("Clients (prefect deploy, prefect worker start, fedmnist run) use it with:")
    for key, value in client_env(state).items():
        print(f"    export {key}={value}")


def cmd_stack(args: argparse.Namespace) -> int:
    from .control import down, status, status_dict, up
    from .layout import Ports, StackError, StackLayout, load_state

    layout = StackLayout.default()
    try:
        if args.action == "up":
            given = {k: getattr(args, f"{k}_port") for k in DEFAULT_PORTS}
            ports = None
            if any(v is not None for v in given.values()):
                recorded = load_state(layout)
                base = recorded.ports.__dict__ if recorded else DEFAULT_PORTS
                ports = Ports(**{k: v if v is not None else base[k] for k, v in given.items()})
            for line in up(layout, ports):
                print(line, flush=True)
            _exports(layout)
        elif args.action == "down":
            for line in down(layout):
                print(line, flush=True)
        elif args.json:
            print(json.dumps(status_dict(layout), indent=2))
        else:
            parts = status(layout)
            if not parts:
                print(f"no stack in {layout.root} (start one with `fedmnist stack up`)")
            for part in parts:
                state = "stopped" if part.pid is None else f"pid {part.pid}"
                health = (
                    "" if part.pid is None else (" healthy" if part.healthy else " NOT healthy")
                )
                print(f"{part.name:9} {part.url:28} {state}{health}")
            _exports(layout)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub: Any) -> None:
    """Register `fedmnist stack` on the main parser's subcommands."""
    p = sub.add_parser(
        "stack",
        help="PostgreSQL + Prefect server + MLflow server under $FEDMNIST_HOME/stack",
        **doc(
            "Start, stop or show the stack past one machine: a PostgreSQL cluster (as an\n"
            "unprivileged user), a Prefect server and an MLflow tracking server with proxied\n"
            "artifacts on it, each on 127.0.0.1 with its port, log and pid file under\n"
            "$FEDMNIST_HOME/stack. A second `up` starts nothing; `down` stops only what `up`\n"
            "started.",
            "fedmnist stack up",
            "fedmnist stack status --json",
            "fedmnist stack down",
        ),
    )
    p.add_argument("action", choices=["up", "down", "status"])
    for name, port in DEFAULT_PORTS.items():
        p.add_argument(
            f"--{name}-port",
            type=int,
            help=f"up: the {name} port on 127.0.0.1 (default: the recorded one, else {port})",
        )
    p.add_argument("--json", action="store_true", help="status: print JSON")
    p.set_defaults(func=cmd_stack)
