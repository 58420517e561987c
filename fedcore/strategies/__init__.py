"""Aggregation strategies, one file each; `build_strategy` picks one by its configured name."""

from __future__ import annotations

from .base import Failure, Strategy
from .fedavg import FedAvg
from .mean import UnweightedMean

from typing import Literal

from pydantic import BaseModel, ConfigDict

REGISTRY: dict[str, type[Strategy]] = {"mean": UnweightedMean, "fedavg": FedAvg}


class StrategyConfig(BaseModel):
    """Which aggregation strategy, by name, with its parameters (unknown keys refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["mean", "fedavg"] = "mean"


def build_strategy(config: StrategyConfig | str) -> Strategy:
    """The strategy a config (or a bare name) selects."""
    name = config if isinstance(config, str) else config.name
    try:
        return REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(REGISTRY)}") from None


__all__ = ["REGISTRY", "StrategyConfig", "Failure", "FedAvg", "Strategy", "UnweightedMean", "build_strategy"]
