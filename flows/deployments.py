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
"""

from __future__ import annotations

import zoneinfo
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedcore.errors import ConfigError
from fedcore.yamlfile import load_yaml_file

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_FILE = "configs/deployments.yaml"
FLOW_NAME = "federated-mnist"


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


class DeploymentsFile(Strict):
    """configs/deployments.yaml: deployment name -> spec."""

    deployments: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")], DeploymentSpec]


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
