"""`fedmnist lab ...` and `fedmnist workers ...`: the emulated Jetson lab and pre-flight checks.

fedmnist lab up [--config C] [--dir D]   start one sshd "device" per worker of C (default: the
                                         seed's alice 0-3, bob 4-6, charlie 7-9, testing)
fedmnist lab status | down
fedmnist workers check CONFIG            a ready/not-ready table per worker (with each device's
                                         facts: memory, CUDA, secure aggregation and DP-SGD
                                         readiness); exit 1 if any is not
fedmnist workers trust NAME --config C   show the device's host key fingerprint, then record it
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from fedcore.config import ExperimentConfig, default_data_dir, fedmnist_home, load_config
from fedcore.errors import FedError


def _lab_dir(args: argparse.Namespace) -> Path:
    return Path(args.dir) if args.dir else fedmnist_home() / "lab"


def cmd_lab_up(args: argparse.Namespace) -> int:
    from fedlab import DeviceSpeed, lab_up

    cfg = load_config(args.config)
    workers = {w.name: w.shard() for w in cfg.workers}
    evaluator = cfg.evaluators[0].name if cfg.evaluators else None
    mnist = Path(args.mnist_dir) if args.mnist_dir else default_data_dir()
    print(f"starting {len(workers)} emulated devices ({', '.join(workers)}); first time ~1 min")
    speeds = {w.name: DeviceSpeed(w.slowdown, w.step_seconds) for w in cfg.workers}
    info = lab_up(_lab_dir(args), workers, mnist, evaluator, speeds=speeds)
    for name, host in info.hosts.items():
        print(f"  {name:10} ssh {host.user}@127.0.0.1 -p {host.port}")
    print(f"inventory: {info.inventory}\nknown_hosts: {info.known_hosts}")
    if not info.per_user:
        print("note: not root, so every device logs in as the current user (no per-user shards)")
    print("next: fedmnist workers check configs/lab.yaml && fedmnist run configs/lab.yaml")
    return 0


def cmd_lab_status(args: argparse.Namespace) -> int:
    from fedlab import lab_status

    status = lab_status(_lab_dir(args))
    if not status:
        print(f"no lab in {_lab_dir(args)} (start one with `fedmnist lab up`)")
        return 1
    for name, s in status.items():
        state = "running" if s.get("running") else "STOPPED"
        print(f"  {name:10} {state:8} port {s['port']:<6} user {s['user']} pid {s['pid']}")
    return 0 if all(s.get("running") for s in status.values()) else 1


def cmd_lab_down(args: argparse.Namespace) -> int:
    from fedlab import lab_down

    done = lab_down(_lab_dir(args))
    print(f"lab stopped: {', '.join(done.get('stopped', [])) or 'nothing was running'}")
    return 0


def check_worker(cfg: ExperimentConfig, name: str) -> dict[str, Any]:
    """One row of `workers check`: the transport's probe plus the worker program's hello."""
    from flows.federated import make_session

    worker = next(w for w in cfg.workers if w.name == name)
    row: dict[str, Any] = {"worker": name, "transport": worker.transport, "error": None}
    if worker.ssh is not None:
        from fedcore.transport.ssh import probe

        row.update(probe(worker.ssh, name))
        if row.get("error"):
            return row
    try:
        session = make_session(cfg, worker)
        start = time.perf_counter()
        session.start()
        hello = session.hello(cfg.timeouts.start)
        row["start_s"] = time.perf_counter() - start
        row.setdefault("python", hello.python)
        row.setdefault("torch", hello.torch)
        row["device"] = hello.device
        row["counts"] = hello.label_counts
        row["facts"] = dict(hello.facts)
        start = time.perf_counter()
        session.hello(cfg.timeouts.start)  # a second hello: the protocol's round trip
        if row.get("latency_ms") is None:
            row["latency_ms"] = 1000 * (time.perf_counter() - start)
        session.close()
    except FedError as exc:
        row["error"] = str(exc)
    return row


def readiness(facts: dict[str, str]) -> list[str]:
    """What the device can take part in beyond plain training, from its hello's facts: secure
    aggregation needs `cryptography` on the device, DP-SGD needs `torch.func` (torch >= 2.0)."""
    crypto = facts.get("cryptography")
    secagg = f"ready (cryptography {crypto})" if crypto else "NOT ready (no cryptography)"
    dp = "ready" if facts.get("torch_func") == "yes" else "NOT ready (torch without torch.func)"
    return [f"secure aggregation {secagg}", f"DP-SGD {dp}"]


def facts_line(facts: dict[str, str]) -> str:
    """A device's facts in one line: machine, memory, CUDA, Jetson model, readiness."""
    parts = []
    if "jetson_model" in facts:
        parts.append(facts["jetson_model"])
    machine = facts.get("machine")
    if machine:
        parts.append(f"{machine}, {facts.get('cpus', '?')} CPUs")
    if "memory_mb" in facts:
        parts.append(f"{facts['memory_mb']} MiB")
    if "cuda_name" in facts:
        cuda = f"{facts['cuda_name']} (sm {facts.get('cuda_capability', '?')}"
        parts.append(cuda + f", {facts.get('cuda_memory_mb', '?')} MiB)")
    if "temp_zone" in facts:
        parts.append(f"temperature from {facts['temp_zone']}")
    if not facts:
        return "no device facts (a worker older than this coordinator)"
    return "; ".join([", ".join(parts) or "-", *readiness(facts)])


def cmd_workers_check(args: argparse.Namespace) -> int:
    from fedcore.report import available_numbers

    cfg = load_config(args.config)
    bad = 0
    header = f"{'worker':10} {'ready':6} {'transport':9} {'host key':9} {'python':8} {'torch':14} "
    print(header + f"{'device':6} {'latency':>8}  shard")
    for w in cfg.workers:
        row = check_worker(cfg, w.name)
        ready = row.get("error") is None
        bad += not ready
        latency = f"{row['latency_ms']:.1f}ms" if row.get("latency_ms") is not None else "-"
        shard = (
            available_numbers(w.name, w.shard().split, row["counts"]).split(": ", 1)[1]
            if row.get("counts")
            else "-"
        )
        print(
            f"{w.name:10} {'yes' if ready else 'NO':6} {w.transport:9} "
            f"{row.get('host_key') or '-':9} {row.get('python') or '-':8} "
            f"{row.get('torch') or '-':14} {row.get('device') or '-':6} {latency:>8}  {shard}"
        )
        if row.get("facts") is not None:
            print(f"    {facts_line(row['facts'])}")
        if not ready:
            print(f"    -> {row['error']}")
    print(f"{len(cfg.workers) - bad} of {len(cfg.workers)} workers ready")
    return 1 if bad else 0


def cmd_workers_trust(args: argparse.Namespace) -> int:
    from fedcore.transport.ssh import fetch_host_key, trust

    cfg = load_config(args.config)
    worker = next((w for w in cfg.workers if w.name == args.name), None)
    if worker is None or worker.ssh is None:
        print(f"error: {args.name!r} is not an ssh worker of {args.config}", file=sys.stderr)
        return 2
    keytype, _, fp = fetch_host_key(worker.ssh, worker.name)
    print(f"{worker.name} offers a {keytype} host key with fingerprint {fp}")
    if not args.yes:
        answer = input(
            "Is that the device's key (compare on the device: ssh-keygen -lf "
            "/etc/ssh/ssh_host_ed25519_key.pub)? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("not trusted")
            return 1
    rec = trust(worker.ssh, name=worker.name, expected_fingerprint=fp)
    print(f"trusted: {rec}")
    return 0


def _guard(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except FedError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def add_parsers(sub: Any) -> None:
    """Register `lab` and `workers` on the `fedmnist` parser."""
    from flows.cli_help import doc

    lab = sub.add_parser(
        "lab",
        help="emulated Jetsons on this machine (real sshd on loopback)",
        **doc(
            "An emulated device lab: one real sshd per worker on a loopback port, each with its "
            "own host key, its own Linux user when run as root and only its own digits. Train on "
            "it with configs/lab.yaml.",
            "fedmnist lab up",
            "fedmnist lab status",
            "fedmnist lab down",
        ),
    )
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    p = lab_sub.add_parser(
        "up",
        help="start the lab and write its inventory",
        **doc(
            "Start one sshd device per worker of a config, cut each its shard of MNIST, and "
            "write the inventory and known_hosts that configs/lab.yaml reads.",
            "fedmnist lab up",
            "fedmnist lab up --config configs/seed.yaml --dir /tmp/lab",
        ),
    )
    p.add_argument(
        "--config",
        default="configs/seed.yaml",
        help="take the workers and shards from this config (configs/seed.yaml)",
    )
    p.add_argument("--mnist-dir", help="MNIST files to cut shards from (default: the data dir)")
    p.add_argument("--dir", help="lab folder (default: $FEDMNIST_HOME/lab)")
    p.set_defaults(func=_guard(cmd_lab_up))
    for name, fn, text, description in (
        (
            "status",
            cmd_lab_status,
            "show the lab's devices",
            "One line per device: running or stopped, port, user, pid; exit 1 when any stopped.",
        ),
        (
            "down",
            cmd_lab_down,
            "stop the lab, remove its users and files",
            "Stop every sshd the lab started and delete exactly the users and files it created.",
        ),
    ):
        p = lab_sub.add_parser(
            name,
            help=text,
            **doc(description, f"fedmnist lab {name}", f"fedmnist lab {name} --dir /tmp/lab"),
        )
        p.add_argument("--dir", help="lab folder (default: $FEDMNIST_HOME/lab)")
        p.set_defaults(func=_guard(fn))

    workers = sub.add_parser(
        "workers",
        help="check or trust the workers of a config",
        **doc(
            "Pre-flight checks of a config's workers before a training, and recording an SSH "
            "device's host key after showing its fingerprint.",
            "fedmnist workers check configs/lab.yaml",
            "fedmnist workers trust alice --config configs/jetsons.yaml",
        ),
    )
    w_sub = workers.add_subparsers(dest="workers_command", required=True)
    p = w_sub.add_parser(
        "check",
        help="pre-flight table; exit 1 when any worker is not ready",
        **doc(
            "Start every worker of a config once: host key, Python, torch, device, round-trip "
            "latency and shard per worker, with the reason for any that is not ready.",
            "fedmnist workers check configs/seed.yaml",
            "fedmnist workers check configs/lab.yaml",
        ),
    )
    p.add_argument("config", help="experiment or lab config, e.g. configs/lab.yaml")
    p.set_defaults(func=_guard(cmd_workers_check))
    p = w_sub.add_parser(
        "trust",
        help="record a device's SSH host key after showing it",
        **doc(
            "Fetch an SSH worker's host key, show its fingerprint and record it in the "
            "config's known_hosts once you confirm it matches the device's own.",
            "fedmnist workers trust alice --config configs/jetsons.yaml",
            "fedmnist workers trust alice --config configs/lab.yaml --yes",
        ),
    )
    p.add_argument("name", help="worker name")
    p.add_argument("--config", required=True, help="config that names the worker")
    p.add_argument("--yes", action="store_true", help="trust without asking (default: ask)")
    p.set_defaults(func=_guard(cmd_workers_trust))
