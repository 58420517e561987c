"""The typed parameters of the `federated-mnist` flow, and how they become config overrides.

A deployment's parameters are checked by the Prefect server against the flow's JSON schema before
a run is created (`enforce_parameter_schema`, on by default for `to_deployment`), so each typed
parameter carries its constraint: `prefect deployment run federated-mnist/seed --param rounds=-1`
is refused with "Validation failed for field 'rounds'" and no run starts. The experiment config
(fedcore.config) is still validated in full inside the run.

What a flow parameter may change is limited to training: anyone who can reach the Prefect API
(every user of the host, with the default unauthenticated server) can start a run with any
parameter, so `overrides` accepts only the dotted keys of `TRAINING_FIELDS` (rounds, seed, the
local training, the strategy, evaluation, the quorum, the deadlines). The inventory, interpreters,
ssh settings, names, screening, data directories and the tracking store come only from files on
the coordinator, which the operator writes (`fedmnist run --set` may change them: it writes a
derived config file, see flows/cli.py); the `inventory` parameter only picks such a file
(`check_inventory_path`), whose workers replace the experiment's. A refused key is a
`ConfigError` naming it, its value and the way to change it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from fedcore.errors import ConfigError
from fedcore.strategies import NAMES
from fedcore.yamlfile import load_yaml_file

CHECKOUT = Path(__file__).resolve().parents[1]

# Constraints only: Prefect takes each parameter's description from the flow's docstring (Args).
Rounds = Annotated[int | None, Field(gt=0)]
StrategyName = Literal[NAMES] | None  # type: ignore[valid-type]  # the registered strategy names
LearningRate = Annotated[float | None, Field(gt=0)]
Seed = int | None
DataDir = Annotated[str | None, Field(min_length=1)]
ConfigPath = Annotated[str, Field(min_length=1)]
InventoryPath = Annotated[str | None, Field(min_length=1)]
Overrides = dict[str, Any] | None


# Top-level sections and fields a flow run's `overrides` may set (a section: all of its keys).
# `screening` is a defence and `tracking`, `workers`, `inventory`, `name`, `data_dir` say where
# code, data and the record live: those stay in the files.
TRAINING_FIELDS = (
    "rounds",
    "seed",
    "train",
    "strategy",
    "evaluation",
    "quorum",
    "below_quorum",
    "round_retries",
    "timeouts",
    "schedule",
)
_DOTTED = r"^[a-z_]+(\.[a-z_]+)*$"


def is_training_field(key: str) -> bool:
    """Whether dotted key `key` is (inside) one of `TRAINING_FIELDS`."""
    return bool(re.match(_DOTTED, key)) and key.split(".", 1)[0] in TRAINING_FIELDS


def check_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`overrides` when every key is a training field.

    Raises:
        ConfigError: a key outside `TRAINING_FIELDS` (named, with its value and the fix).
    """
    for key, value in (overrides or {}).items():
        if not is_training_field(str(key)):
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ConfigError(
                f"overrides: {str(key)[:80]!r} (= {shown}) cannot be set by a flow parameter; "
                f"a run may change only {', '.join(TRAINING_FIELDS)} (and their fields). Set it in "
                "the config file on the coordinator (or with `fedmnist run --set` there)"
            )
    return dict(overrides or {})


def config_roots() -> list[Path]:
    """The folders a flow run reads experiment files from: the checkout's `configs/` and
    `$FEDMNIST_HOME/configs` (where `fedmnist run` writes derived configs)."""
    from fedcore.config import fedmnist_home

    return [(CHECKOUT / "configs").resolve(), (fedmnist_home() / "configs").resolve()]


def is_trusted_config(path: Path) -> bool:
    """Whether `path` lies in one of `config_roots()` (symlinks resolved)."""
    real = path.expanduser().resolve()
    return any(real.is_relative_to(root) for root in config_roots())


def check_config_path(path: Path) -> Path:
    """`path` when a flow run may read it: inside `config_roots()` and not writable by everyone.

    A config names the workers' interpreters, hosts and ssh settings, so a file any user of the
    host could write (in /tmp, say) would let them run code as the coordinator's user.

    Raises:
        ConfigError: `path` is elsewhere or world-writable (the message says where to put it).
    """
    roots = " or ".join(str(r) for r in config_roots())
    if not is_trusted_config(path):
        raise ConfigError(
            f"config_path {str(path)!r} is outside {roots}: a flow run reads experiment files "
            "only from there; copy the file into one of them (`fedmnist run FILE` does this "
            "itself for a file elsewhere)"
        )
    if path.is_file() and path.stat().st_mode & 0o002:
        raise ConfigError(
            f"config_path {str(path)!r} is writable by every user of this host; "
            f"`chmod o-w {path}` first"
        )
    return path


def check_inventory_path(inventory: str) -> Path:
    """The inventory file a run puts under its experiment (`--inventory`, the flow's `inventory`
    parameter): an existing file in `config_roots()` or `$FEDMNIST_HOME/lab` (where `fedmnist lab
    up` writes its inventory), not writable by everyone. It names interpreters, hosts and ssh
    settings, so, like `config_path`, it comes only from files the operator wrote on the
    coordinator, never from a parameter's content.

    Raises:
        ConfigError: the file is missing, elsewhere or world-writable (the message says the fix).
    """
    from fedcore.config import fedmnist_home

    path = resolve_config_path(inventory).expanduser().resolve()
    lab = (fedmnist_home() / "lab").resolve()
    if not path.is_file():
        raise ConfigError(
            f"inventory {inventory!r} does not exist (looked at {path}); give a file in "
            f"{CHECKOUT / 'configs'}, e.g. configs/jetsons.yaml"
        )
    if not is_trusted_config(path) and not path.is_relative_to(lab):
        raise ConfigError(
            f"inventory {inventory!r} is outside "
            f"{' or '.join(str(r) for r in [*config_roots(), lab])}: a run reads inventories "
            "only from there; copy the file into one of them"
        )
    return check_config_path(path) if is_trusted_config(path) else _not_world_writable(path)


def _not_world_writable(path: Path) -> Path:
    if path.stat().st_mode & 0o002:
        raise ConfigError(
            f"{str(path)!r} is writable by every user of this host; `chmod o-w {path}` first"
        )
    return path


def resolve_config_path(config_path: str) -> Path:
    """`config_path` as given when it exists (or is absolute), else under the checkout, so a
    served deployment finds `configs/seed.yaml` whatever directory `fedmnist serve` started in."""
    path = Path(config_path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    in_checkout = CHECKOUT / path
    return in_checkout if in_checkout.exists() else path


def config_overrides(
    config_path: Path,
    overrides: dict[str, Any] | None,
    *,
    rounds: int | None = None,
    strategy: str | None = None,
    lr: float | None = None,
    seed: int | None = None,
    data_dir: str | None = None,
    inventory: str | None = None,
) -> dict[str, Any]:
    """Merge the typed parameters into dotted overrides for `fedcore.config.load_config`.

    Order: a strategy section replaced by name (only when the name differs from the file's, so the
    file's options for the same strategy survive), then `overrides`, then the typed scalars, which
    win over the same keys in `overrides`. `inventory`, checked by `check_inventory_path`,
    becomes the absolute path that replaces the file's workers.
    """
    merged: dict[str, Any] = {}
    if strategy is not None and strategy != _file_strategy(config_path):
        merged["strategy"] = {"name": strategy}
    merged.update(check_overrides(overrides))
    typed = {"rounds": rounds, "train.lr": lr, "seed": seed, "data_dir": data_dir}
    merged.update({k: v for k, v in typed.items() if v is not None})
    if inventory is not None:
        merged["inventory"] = str(check_inventory_path(inventory))
    return merged


def _file_strategy(config_path: Path) -> str | None:
    """The strategy name the YAML file itself selects (None if unreadable; load_config says why)."""
    try:
        raw = load_yaml_file(config_path)
    except ConfigError:
        return None
    section = raw.get("strategy") if isinstance(raw, dict) else None
    return section.get("name") if isinstance(section, dict) else None
