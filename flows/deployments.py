"""The deployments of the `federated-mnist` flow (`seed`, `lab`, `jetsons`) and how they are served.

Read from `configs/deployments.yaml` (validated here: unknown keys, bad cron strings, time zones
and parameters are refused with the field named) and served by `fedmnist serve` with
`prefect.serve`: one long-lived process polls the Prefect server and runs each flow run in a fresh
subprocess. No work pool and no worker: every deployment runs on the machine that serves it, which
is exactly where the coordinator must run (it starts the local workers and opens the SSH
sessions). README ("Run it the Prefect way") says when a work pool is the better choice.

Each deployment gets:
- default parameters (`config_path`, plus any listed under `parameters`), checked against the
  flow's signature here and against its parameter schema by the server;
- its cron schedule, with a fixed slug so a restart updates that schedule instead of adding one,
  active or not as the file says (the file is the source of truth on every start);
- a deployment concurrency limit (1: a rerun never overlaps the previous run; a run that finds
  the slot taken is re-scheduled, `AwaitingConcurrencySlot`, and starts when the slot frees).

The same file is the source of the Prefect-native path past one machine: `prefect.yaml` at the
checkout's root is rendered from it (`python -m flows.deployments --write prefect.yaml`; a test
checks the two agree), so `prefect deploy --all` puts the same deployments on a process work
pool, each on its site's work queue (`queue`: lab or fleet), and `prefect worker start --pool
fedmnist --work-queue lab` on the host that reaches those devices runs them. A flow run there
enters the checkout the worker's Python imports this package from (`enter_checkout`, a pull
step), so no path of one machine is written into prefect.yaml.
"""

from __future__ import annotations

import zoneinfo
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedcore.errors import ConfigError
from fedcore.yamlfile import load_yaml_file

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_FILE = "configs/deployments.yaml"
FLOW_NAME = "federated-mnist"
ENTRYPOINT = "flows/federated.py:federated_mnist"
QUEUE = r"^[a-z0-9][a-z0-9-]{0,62}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleSpec(Strict):
    """A cron schedule of one deployment."""

    cron: str  # five fields, e.g. "0 2 * * *" (02:00 every day)
    timezone: str = "UTC"  # IANA name, e.g. Europe/Berlin
    active: bool = False  # inactive until someone switches it on (see configs/deployments.yaml)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from prefect.schedules import Cron

        Cron(value)  # raises ValueError naming the problem
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as UTC") from None
        return value


class DeploymentSpec(Strict):
    """One deployment: which experiment, when, how many at once."""

    config_path: Annotated[str, Field(min_length=1)]  # the experiment (or inventory) YAML
    description: str = ""
    parameters: dict[str, Any] = {}  # further default parameters, e.g. {rounds: 10}
    schedule: ScheduleSpec | None = None
    concurrency_limit: Annotated[int, Field(gt=0)] = 1
    tags: list[str] = []
    queue: Annotated[str, Field(pattern=QUEUE)] = "lab"  # the site's work queue (work pool path)


class WorkPoolSpec(Strict):
    """The process work pool the deployments go to with `prefect deploy`, one queue per site."""

    name: Annotated[str, Field(pattern=QUEUE)] = "fedmnist"
    queues: list[Annotated[str, Field(pattern=QUEUE)]] = ["lab", "fleet"]


class DeploymentsFile(Strict):
    """configs/deployments.yaml: the work pool, and deployment name -> spec."""

    work_pool: WorkPoolSpec = WorkPoolSpec()
    deployments: dict[Annotated[str, Field(pattern=QUEUE)], DeploymentSpec]

    @model_validator(mode="after")
    def _known_queues(self) -> DeploymentsFile:
        for name, dep in self.deployments.items():
            if dep.queue not in self.work_pool.queues:
                raise ValueError(
                    f"deployment {name}: queue {dep.queue!r} is not one of work_pool.queues "
                    f"{self.work_pool.queues}"
                )
        return self


def load_deployments(path: str | Path = DEFAULT_FILE) -> DeploymentsFile:
    """Read and validate a deployments file.

    Raises:
        ConfigError: the file is missing or not YAML, or a field is invalid (named in the message).
    """
    from flows.parameters import resolve_config_path

    p = resolve_config_path(str(path))
    if not p.is_file():
        raise ConfigError(f"deployments file {p} does not exist (try {DEFAULT_FILE})")
    raw = load_yaml_file(p) or {}
    try:
        spec = DeploymentsFile.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{p}: invalid deployments"]
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    for name, dep in spec.deployments.items():
        check_parameters(name, {"config_path": dep.config_path, **dep.parameters})
    return spec


def check_parameters(deployment: str, parameters: dict[str, Any]) -> None:
    """Refuse default parameters the flow does not take, whose values fail its parameter schema
    (the check the server makes for every run), or `overrides` outside the training fields (the
    check the flow makes: flows/parameters.py)."""
    from prefect.utilities.schema_tools.validation import ValidationError as SchemaError
    from prefect.utilities.schema_tools.validation import validate

    from flows.federated import federated_mnist

    known = set(federated_mnist.parameters.properties)
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise ConfigError(
            f"deployment {deployment}: unknown parameter(s) {unknown}; "
            f"the flow takes {sorted(known)}"
        )
    try:
        validate(parameters, federated_mnist.parameters.model_dump_for_openapi(), True)
    except SchemaError as exc:
        raise ConfigError(f"deployment {deployment}: {exc}") from None
    from flows.parameters import check_overrides

    try:
        check_overrides(parameters.get("overrides"))
    except ConfigError as exc:
        raise ConfigError(f"deployment {deployment}: {exc}") from None


def build_deployments(spec: DeploymentsFile) -> list[RunnerDeployment]:
    """One RunnerDeployment of the flow per entry, ready for `prefect.serve`."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from flows.federated import federated_mnist

    out = []
    for name, dep in spec.deployments.items():
        schedules = None
        if dep.schedule is not None:
            s = dep.schedule
            schedules = [Cron(s.cron, timezone=s.timezone, active=s.active, slug=f"{name}-cron")]
        # Called outside an event loop, the sync-compatible `to_deployment` returns the
        # deployment itself, never a coroutine.
        out.append(
            cast(
                "RunnerDeployment",
                federated_mnist.to_deployment(
                    name,
                    parameters={"config_path": dep.config_path, **dep.parameters},
                    schedules=schedules,
                    concurrency_limit=ConcurrencyLimitConfig(
                        limit=dep.concurrency_limit,
                        collision_strategy=ConcurrencyLimitStrategy.ENQUEUE,
                    ),
                    description=dep.description or None,
                    tags=list(dep.tags),
                ),
            )
        )
    return out


def serve(path: str | Path = DEFAULT_FILE, limit: int | None = 1) -> None:
    """Register the deployments with the server at PREFECT_API_URL and run their flow runs until
    interrupted (SIGINT/SIGTERM pause the deployments, so nothing is scheduled while unserved).

    Args:
        path: the deployments file.
        limit: most flow runs this process runs at once, over all deployments (None: no limit).
    """
    from prefect import serve as prefect_serve

    deployments = build_deployments(load_deployments(path))
    prefect_serve(*deployments, limit=limit, pause_on_shutdown=True)


PREFECT_YAML_HEADER = """\
# Rendered from configs/deployments.yaml by `python -m flows.deployments --write prefect.yaml`:
# edit that file and render this one again (tests/stack/test_prefect_yaml.py checks they agree).
#
# The Prefect-native path past one machine (README, "Past one machine"):
#   prefect work-pool create {pool} --type process
#   prefect deploy --all                      # from the checkout, PREFECT_API_URL set
#   prefect worker start --pool {pool} --work-queue lab   # on the host that reaches the lab
# `fedmnist serve` serves the same deployments without a pool, on one machine.
"""


def prefect_yaml(spec: DeploymentsFile) -> str:
    """The prefect.yaml text of `spec`: the same deployments, parameters, schedules and limits,
    each on its queue of the process work pool."""
    import yaml

    deployments = []
    for name, dep in spec.deployments.items():
        entry: dict[str, Any] = {
            "name": name,
            "description": dep.description or None,
            "entrypoint": ENTRYPOINT,
            "tags": list(dep.tags),
            "parameters": {"config_path": dep.config_path, **dep.parameters},
            "enforce_parameter_schema": True,
            "work_pool": {"name": spec.work_pool.name, "work_queue_name": dep.queue},
            "concurrency_limit": {"limit": dep.concurrency_limit, "collision_strategy": "ENQUEUE"},
            "schedules": [],
        }
        if dep.schedule is not None:
            s = dep.schedule
            entry["schedules"] = [
                {"cron": s.cron, "timezone": s.timezone, "active": s.active, "slug": f"{name}-cron"}
            ]
        deployments.append(entry)
    body: dict[str, Any] = {
        "name": "federated-mnist",
        "build": None,
        "push": None,
        "pull": [{"flows.deployments.enter_checkout": {}}],
        "deployments": deployments,
    }
    text = yaml.safe_dump(body, sort_keys=False, width=100)
    return PREFECT_YAML_HEADER.format(pool=spec.work_pool.name) + text


def enter_checkout() -> dict[str, str]:
    """Pull step of every prefect.yaml deployment: make the checkout this package runs from the
    flow run's working directory (where the entrypoint and configs/ are), through Prefect's own
    `set_working_directory` step."""
    from prefect.deployments.steps import set_working_directory

    from flows.parameters import CHECKOUT

    return set_working_directory(str(CHECKOUT))


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.deployments [--deployments FILE] [--write PATH | --check PATH]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=main.__doc__)
    parser.add_argument("--deployments", default=DEFAULT_FILE)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", help="write prefect.yaml there")
    group.add_argument("--check", metavar="PATH", help="exit 1 when PATH differs from the render")
    args = parser.parse_args(argv)
    try:
        text = prefect_yaml(load_deployments(args.deployments))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.write:
        Path(args.write).write_text(text)
    elif args.check:
        if not Path(args.check).is_file() or Path(args.check).read_text() != text:
            print(f"{args.check} is out of date: python -m flows.deployments --write {args.check}")
            return 1
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
