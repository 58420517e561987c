"""Configuration: pydantic models of an experiment and its inventory of workers, read from YAML.

Past 400 lines: one model per config section, each validated against the others in one place
(`ExperimentConfig`); splitting the sections apart would split their cross-checks.

Every model is frozen and refuses unknown keys (`extra="forbid"`), so a typo is an error that
names the field, not a silently ignored setting. `load_config` merges dotted overrides
(`train.lr=0.05`) before validation so overrides are checked exactly like the file. YAML is read
by `fedcore.yamlfile` (a repeated key is an error naming the key and both lines).

Names become file names, MLflow names and command-line arguments, so they are checked by pattern:
a letter or digit first (never `-`, which would read as an option, nor `.`), then letters,
digits, `_`, `.`, `-`. Hosts and users are checked in `transport/ssh/config.py`.

Past 400 lines because the experiment's schema, its loading and what a loaded config may ask for
in this version (`check_available`) belong together; the sections with rules of their own live
in their modules (schedules, strategies, privacy_config) and are only composed here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .privacy_config import PrivacyConfig, SecureAggregationConfig, check_composition
from .schedules import ScheduleConfig
from .shards import ShardSpec
from .strategies import StrategyConfig
from .training import TrainPlan
from .transport.ssh.config import Command, SSHConfig, matching
from .yamlfile import load_yaml_file

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(value: str) -> str:
    """`value` when it is a safe name (see the module docstring), else ValueError with the fix."""
    return matching(
        NAME,
        value,
        f"name {value!r} is not allowed: use 1-64 letters, digits, '_', '.', '-', starting "
        "with a letter or digit (it becomes a file name and a command-line argument)",
    )


Name = Annotated[str, AfterValidator(check_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(gt=0)]


class CompressionConfig(Strict):
    """How the model travels each way in a worker-round (fedcore.compression): `none` (float32,
    the seed's bytes), `fp16` (half the bytes), `int8` (a quarter), `topk` (float16 down, the
    `fraction` of each tensor's largest delta entries up, with error feedback)."""

    name: Literal["none", "fp16", "int8", "topk"] = "none"
    fraction: Annotated[float, Field(gt=0, le=1)] = 0.01  # topk only: share of entries sent

    @model_validator(mode="after")
    def _fraction_for_topk(self) -> CompressionConfig:
        # the default is accepted with any name: a recorded config (resume) dumps every field
        default = type(self).model_fields["fraction"].default
        if self.fraction != default and self.name != "topk":
            raise ValueError(f"fraction applies to name: topk only, not {self.name}")
        return self


class TrainConfig(Strict):
    """Local training per worker-round and the learning-rate schedule."""

    steps: PositiveInt = 10  # minibatches per worker per round
    batch_size: PositiveInt = 32
    lr: Annotated[float, Field(gt=0)] = 0.1
    lr_decay: Annotated[float, Field(gt=0, le=1)] = 1.0  # lr multiplied by this every round
    lr_min: Annotated[float, Field(ge=0)] = 0.0  # floor of the decayed lr
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # update compression both ways (none: the seed's float32 frames, byte for byte)
    compression: CompressionConfig = CompressionConfig()

    def lr_at(self, round: int) -> float:
        """Learning rate of round `round` (1-based): lr * decay^(round-1), floored at lr_min."""
        return max(self.lr * self.lr_decay ** (round - 1), self.lr_min)

    def plan(self, round: int) -> TrainPlan:
        return TrainPlan(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr_at(round),
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
            compression=self.compression.name,
            topk_fraction=self.compression.fraction if self.compression.name == "topk" else 0.0,
        )


class EvaluationConfig(Strict):
    """When and how models are scored on the evaluator."""

    rounds: list[PositiveInt] | None = None  # explicit rounds, e.g. [1, 11, 21, 31, 40]
    every: PositiveInt | None = None  # or every k rounds (plus round 1 and the last)
    groups: list[list[Annotated[int, Field(ge=0, le=9)]]] | None = None  # default: trainers' labels
    workers: bool = True  # also score each worker's returned model, as the seed did

    def due(self, round: int, total: int) -> bool:
        """Whether `round` of `total` is evaluated. The last round always is, so a training
        shortened with `--rounds` still ends with a score; listed rounds past it are skipped."""
        if round == total:
            return True
        if self.rounds is not None:
            return round in self.rounds
        if self.every is not None:
            return round == 1 or round == total or round % self.every == 0
        return round == total


class IIDPart(Strict):
    index: Annotated[int, Field(ge=0)]
    count: PositiveInt
    seed: int = 0


class WorkerConfig(Strict):
    """One worker of the inventory: its role, shard and how to reach it."""

    name: Name
    role: Literal["trainer", "evaluator"] = "trainer"
    transport: Literal["local", "ssh"] = "local"
    ssh: SSHConfig | None = None  # how to reach the device (transport: ssh)
    split: Literal["train", "test"] | None = (
        None  # default: train for trainers, test for evaluators
    )
    labels: list[Annotated[int, Field(ge=0, le=9)]] | None = None
    iid: IIDPart | None = None
    data_dir: str | None = None  # default: the experiment's data_dir
    threads: Annotated[int, Field(ge=0)] = 1  # torch threads; 0 = torch's default
    python: Command | None = None  # local transport: the interpreter (default: the coordinator's)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # a slower device, for heterogeneous fleets: each training step takes `slowdown` times as long
    # (a CPU limit where the kernel allows it, else the worker sleeps; its hello says which)
    slowdown: Annotated[float, Field(ge=1, le=1000)] = 1.0
    # a steady device, for reproducible schedules: each training step takes this many seconds
    # (times slowdown), the worker sleeping what its computation leaves; None: as fast as it is
    step_seconds: Annotated[float, Field(gt=0, le=60)] | None = None

    @model_validator(mode="after")
    def _one_shard_kind(self) -> WorkerConfig:
        if self.transport == "ssh" and self.ssh is None:
            raise ValueError("transport: ssh needs an ssh: section (host or alias, user, ...)")
        if self.transport == "local" and self.ssh is not None:
            raise ValueError("an ssh: section needs transport: ssh")
        if self.labels is not None and self.iid is not None:
            raise ValueError("give either labels or iid, not both")
        if self.labels is not None and not self.labels:
            raise ValueError("labels must name at least one digit")
        if self.iid is not None and self.iid.index >= self.iid.count:
            raise ValueError(f"iid.index {self.iid.index} must be below iid.count {self.iid.count}")
        return self

    def shard(self) -> ShardSpec:
        split = self.split or ("test" if self.role == "evaluator" else "train")
        if self.labels is not None:
            return ShardSpec.by_labels(self.labels, split)
        if self.iid is not None:
            return ShardSpec.iid(self.iid.index, self.iid.count, self.iid.seed, split)
        return ShardSpec(split=split)


class TimeoutConfig(Strict):
    """Deadlines, in seconds."""

    start: Annotated[float, Field(gt=0)] = 180.0  # worker start until hello
    train: Annotated[float, Field(gt=0)] = 300.0  # one train request
    evaluate: Annotated[float, Field(gt=0)] = 600.0  # one evaluate request


class ScreeningConfig(Strict):
    """Which well-formed updates are still refused before aggregation (fedcore.screening)."""

    # drop an update whose distance from the global model exceeds this many times the round's
    # median distance (>= 3 updates) or the recent rounds' accepted median (any number of
    # updates; in the first round: the model's norm); 0 turns screening off
    norm_factor: Annotated[float, Field(ge=0)] = 10.0


class TrackingConfig(Strict):
    """Where the MLflow record goes (default: the SQLite store under FEDMNIST_HOME), and how
    much of a round Prefect's UI shows."""

    enabled: bool = True  # false: train without an MLflow record (benchmarks, quick checks)
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///$FEDMNIST_HOME/mlflow.db
    experiment: Name = "federated-mnist"
    ui_url: str = (
        "http://127.0.0.1:5000"  # where `mlflow ui` serves a file/SQLite store (for links)
    )
    # Evaluated global models become versions of this registered model (aliases `current` and
    # `champion`); null: log them without registering.
    registered_model: Name | None = "federated-mnist-cnn"
    # A round shows one Prefect task run per trainer (`train-<worker>-rNN`) up to this many
    # trainers; a larger fleet's round trains in one `train-rNN` task run, its workers' lines in
    # that run's log (per-worker figures stay in MLflow): tens of task runs a round cost more
    # than a small worker-round and say less in the UI than the round's own lines.
    worker_tasks_up_to: Annotated[int, Field(ge=0)] = 10


class ExperimentConfig(Strict):
    """A whole training: rounds, local training, strategy, evaluation, workers, record."""

    name: Name = "experiment"
    seed: int = 1
    rounds: PositiveInt = 40
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    schedule: ScheduleConfig = ScheduleConfig()  # sync (the seed's), semi-sync or async
    evaluation: EvaluationConfig = EvaluationConfig()
    workers: list[WorkerConfig]
    # updates a round needs: a count (2) or a fraction of the trainers (0.5); default: all of them
    quorum: PositiveInt | Annotated[float, Field(gt=0, le=1)] | None = None
    below_quorum: Literal["fail", "retry"] = "fail"  # what a round short of its quorum does
    round_retries: Annotated[int, Field(ge=0)] = (
        2  # with below_quorum: retry, tries after the first
    )
    data_dir: str | None = None  # default: $FEDMNIST_HOME/data/mnist
    timeouts: TimeoutConfig = TimeoutConfig()
    screening: ScreeningConfig = ScreeningConfig()
    tracking: TrackingConfig = TrackingConfig()
    # the coordinator sees only the sum of a round's updates (fedcore.privacy_config)
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    # DP-SGD on every trainer, epsilon accounted per device (fedcore.privacy_config)
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _check_workers(self) -> ExperimentConfig:
        names = [w.name for w in self.workers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"worker names must be unique, repeated: {dupes}")
        if not self.trainers:
            raise ValueError("at least one worker needs role: trainer")
        if len(self.evaluators) > 1:
            raise ValueError("at most one worker may have role: evaluator")
        if isinstance(self.quorum, int) and self.quorum > len(self.trainers):
            raise ValueError(f"quorum {self.quorum} exceeds the {len(self.trainers)} trainers")
        schedule = self.schedule
        if not schedule.is_sync and self.strategy.root.name == "scaffold":
            raise ValueError(
                f"strategy scaffold needs schedule.mode: sync, not {schedule.mode}: its control "
                "variates assume every update was trained from the current global model and "
                "server variate, which a late (stale) update was not"
            )
        unpaced = [w.name for w in self.trainers if w.step_seconds is None]
        if schedule.clock == "paced" and unpaced:
            raise ValueError(
                f"schedule.clock: paced needs step_seconds on every trainer; missing on {unpaced}"
            )
        if schedule.mode == "semi-sync" and schedule.min_updates > len(self.trainers):
            raise ValueError(
                f"schedule.min_updates {schedule.min_updates} exceeds the "
                f"{len(self.trainers)} trainers"
            )
        check_composition(self)
        return self

    def plan(self, round: int) -> TrainPlan:
        """Round `round`'s train plan: `train.plan(round)` plus DP-SGD's noise multiplier and
        clipping norm when `privacy.enabled` (off, the plan and its request are the seed's)."""
        plan = self.train.plan(round)
        if not self.privacy.enabled:
            return plan
        return dataclasses.replace(
            plan,
            dp_noise_multiplier=self.privacy.noise_multiplier,
            dp_max_grad_norm=self.privacy.max_grad_norm,
        )

    @property
    def trainers(self) -> list[WorkerConfig]:
        return [w for w in self.workers if w.role == "trainer"]

    @property
    def evaluators(self) -> list[WorkerConfig]:
        return [w for w in self.workers if w.role == "evaluator"]

    def digit_groups(self) -> list[list[int]]:
        """Groups whose prediction shares are reported: configured, else the trainers' labels."""
        if self.evaluation.groups is not None:
            return self.evaluation.groups
        groups = [sorted(w.labels) for w in self.trainers if w.labels is not None]
        return groups if len(groups) == len(self.trainers) else []

    def required_updates(self) -> int:
        """Valid updates a round needs (a fraction of the trainers rounds up)."""
        if self.quorum is None:
            return len(self.trainers)
        if isinstance(self.quorum, float):
            return max(1, math.ceil(self.quorum * len(self.trainers) - 1e-9))
        return self.quorum

    def data_dir_for(self, worker: WorkerConfig) -> Path:
        return Path(worker.data_dir or self.data_dir or default_data_dir()).expanduser()

    def recorded(self) -> dict[str, Any]:
        """The config as params, config.json and logs show it: `tracking.uri` without the
        credentials it may carry (`redact_uri`); the real URI is only used to connect."""
        data = self.model_dump(mode="json")
        # the privacy sections left at their defaults (off) are left out, so an experiment
        # without them records the params and hash it recorded before they existed (a resumed
        # run, a registered model's config_hash); reading the dump back gives the same defaults
        if self.secure_aggregation == SecureAggregationConfig():
            del data["secure_aggregation"]
        if self.privacy == PrivacyConfig():
            del data["privacy"]
        if self.tracking.worker_tasks_up_to == TrackingConfig().worker_tasks_up_to:
            del data["tracking"]["worker_tasks_up_to"]  # the same way: what Prefect shows
        if data["tracking"].get("uri"):
            data["tracking"]["uri"] = redact_uri(data["tracking"]["uri"])
        return data

    def config_hash(self) -> str:
        """Short, stable hash of the validated configuration as recorded (a changed password
        does not make another experiment)."""
        text = json.dumps(self.recorded(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


URI_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@]*)@")


def redact_uri(uri: str) -> str:
    """`uri` with any `user[:password]@` replaced by `***@`: the form to record, show and log.

    >>> redact_uri("https://ann:s3cret@mlflow.lan/")
    'https://***@mlflow.lan/'
    """
    return URI_USERINFO.sub(r"\g<scheme>***@", uri, count=1)


def fedmnist_home() -> Path:
    """Where data, the MLflow store and checkpoints live: $FEDMNIST_HOME, else `.fedmnist`
    in the source checkout this package runs from, else ~/.fedmnist."""
    env = os.environ.get("FEDMNIST_HOME")
    if env:
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return checkout / ".fedmnist"
    return Path.home() / ".fedmnist"


def default_data_dir() -> Path:
    return fedmnist_home() / "data" / "mnist"


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling; see configs/seed.yaml for the known ones)"
        got = err.get("input")
        quiet = err["type"] == "extra_forbidden" or isinstance(got, dict) or repr(got) in msg
        shown = "" if quiet else f" (got {got!r})"
        lines.append(f"  {where}: {msg}{shown}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a raw mapping; errors name each bad field. A valid config asking for what this
    version cannot run yet is refused too (`check_available`)."""
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    check_available(config, source)
    return config


def check_available(config: ExperimentConfig, source: str = "config") -> None:
    """Refuse a config whose sections hold together but that this version's round loop does not
    run, rather than train without what it asks for.

    - `privacy.enabled` with a semi-sync or async schedule: the privacy ledger charges each
      device per synchronous round.

    Raises:
        ConfigError: naming the section and the fix.
    """
    if config.privacy.enabled and not config.schedule.is_sync:
        raise ConfigError(
            f"{source}: privacy with schedule.mode: {config.schedule.mode} is not available in "
            "this version: the privacy ledger charges each device per synchronous round; use "
            "schedule.mode: sync (the default)"
        )


def load_config(
    path: str | os.PathLike[str], overrides: dict[str, Any] | None = None
) -> ExperimentConfig:
    """Read an experiment YAML file, apply dotted overrides, validate.

    An `inventory` override (`fedmnist run --inventory`, the flow's `inventory` parameter) puts
    another fleet under the same experiment: it replaces the file's `workers` or `inventory`, so
    any recipe runs on any fleet without editing either file. A relative inventory path is read
    from the config's folder; give callers' paths absolute.

    Raises:
        ConfigError: the file is missing or not YAML, or a field is invalid (named in the message).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (try configs/seed.yaml)")
    raw = load_yaml_file(p) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of fields")
    if "inventory" in (overrides or {}):
        raw.pop("workers", None)  # the fleet given replaces the file's
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    if "inventory" in raw:
        raw = dict(raw)
        inventory = raw.pop("inventory")
        if "workers" in raw:
            raise ConfigError(f"{p}: give either workers or inventory, not both")
        raw["workers"] = load_inventory(resolve_path(str(inventory), p.parent))
    return parse_config(raw, str(p))


def resolve_path(text: str, base: Path) -> Path:
    """`~`, `$FEDMNIST_HOME` (defaulted) and other variables expanded; relative to `base`."""
    env = dict(os.environ)
    env.setdefault("FEDMNIST_HOME", str(fedmnist_home()))
    expanded = os.path.expanduser(
        re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), text)
    )
    path = Path(expanded)
    return path if path.is_absolute() else (base / path).resolve()


def load_inventory(path: Path) -> list[Any]:
    """The worker list of an inventory file: a YAML list, or a mapping with `workers:` (an
    experiment file such as configs/jetsons.yaml serves as the inventory of its workers; its
    other fields are not taken)."""
    if not path.is_file():
        raise ConfigError(
            f"inventory {path} does not exist (for the SSH lab, run `fedmnist lab up` first)"
        )
    data = load_yaml_file(path)
    if isinstance(data, dict):
        data = data.get("workers")
    if not isinstance(data, list):
        raise ConfigError(f"{path}: an inventory is a list of workers (or a mapping with workers:)")
    return data
