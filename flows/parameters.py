"""The typed parameters of the `federated-mnist` flow, and how they become config overrides.

A deployment's parameters are checked by the Prefect server against the flow's JSON schema before
a run is created (`enforce_parameter_schema`, on by default for `to_deployment`), so each typed
parameter carries its constraint: `prefect deployment run federated-mnist/seed --param rounds=-1`
is refused with "Validation failed for field 'rounds'" and no run starts. The experiment config
(fedcore.config) is still validated in full inside the run: the typed parameters are only the
overrides people reach for; `overrides` takes any dotted config field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

from fedcore.strategies import NAMES

CHECKOUT = Path(__file__).resolve().parents[1]

# Constraints only: Prefect takes each parameter's description from the flow's docstring (Args).
Rounds = Annotated[int | None, Field(gt=0)]
StrategyName = Literal[NAMES] | None  # type: ignore[valid-type]  # the registered strategy names
LearningRate = Annotated[float | None, Field(gt=0)]
Seed = int | None
DataDir = Annotated[str | None, Field(min_length=1)]
ConfigPath = Annotated[str, Field(min_length=1)]
Overrides = dict[str, Any] | None


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
) -> dict[str, Any]:
    """Merge the typed parameters into dotted overrides for `fedcore.config.load_config`.

    Order: a strategy section replaced by name (only when the name differs from the file's, so the
    file's options for the same strategy survive), then `overrides`, then the typed scalars, which
    win over the same keys in `overrides`.
    """
    merged: dict[str, Any] = {}
    if strategy is not None and strategy != _file_strategy(config_path):
        merged["strategy"] = {"name": strategy}
    merged.update(overrides or {})
    typed = {"rounds": rounds, "train.lr": lr, "seed": seed, "data_dir": data_dir}
    merged.update({k: v for k, v in typed.items() if v is not None})
    return merged


def _file_strategy(config_path: Path) -> str | None:
    """The strategy name the YAML file itself selects (None if unreadable; load_config says why)."""
    try:
        raw = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    section = raw.get("strategy") if isinstance(raw, dict) else None
    return section.get("name") if isinstance(section, dict) else None
