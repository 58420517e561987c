"""Aggregation strategies; `build_strategy` makes the one a config names.

A strategy is composed, not inherited: a weighting (`weighting.py`: "unweighted" or "samples",
always named) plus, optionally, a server optimizer (`server_optimizer.py`: a torch optimizer
stepping the global model on the pseudo-gradient) plus what the workers do locally (the plan's
`prox_mu` for FedProx, `scaffold` for SCAFFOLD's control variates). Every averaging strategy is a
configuration of `FedOpt` (`fedopt.py`); SCAFFOLD (`scaffold.py`) holds a FedOpt for its model
step. `base.py` is the interface the flow uses, `aggregate.py` the arithmetic. Configured by name:

    {name: mean}                                     the seed's unweighted mean
    {name: fedavg}                                   sample-weighted FedAvg
    {name: fedavgm, weighting, server_lr, momentum, nesterov}
    {name: fedadam, weighting, server_lr, beta1, beta2, tau, bias_correction}
    {name: fedyogi, weighting, server_lr, beta1, beta2, tau, bias_correction}
    {name: fedadagrad, weighting, server_lr, tau}
    {name: fedprox, weighting, mu, server_lr, momentum, nesterov}
    {name: scaffold, weighting, server_lr, momentum, nesterov}
    {name: median, server_lr, momentum, nesterov}
    {name: trimmed-mean, beta, server_lr, momentum, nesterov}
    {name: clipped-mean, weighting, bound, center, server_lr, momentum, nesterov}

Every strategy checks the counts an update reports before using it (`base.check_counts`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, RootModel, model_validator

from .base import ExpectedCounts, Failure, Strategy, StrategyState, Weights, check_counts
from .fedopt import (
    FedAdagradConfig,
    FedAdamConfig,
    FedAvg,
    FedAvgConfig,
    FedAvgMConfig,
    FedOpt,
    FedProxConfig,
    FedYogiConfig,
    MeanConfig,
    UnweightedMean,
)
from .robust import ClippedMeanConfig, MedianConfig, TrimmedMeanConfig
from .scaffold import Scaffold, ScaffoldConfig

AnyStrategyConfig = Annotated[
    MeanConfig
    | FedAvgConfig
    | FedAvgMConfig
    | FedAdamConfig
    | FedYogiConfig
    | FedAdagradConfig
    | FedProxConfig
    | ScaffoldConfig
    | MedianConfig
    | TrimmedMeanConfig
    | ClippedMeanConfig,
    Field(discriminator="name"),
]
CONFIGS = {
    "mean": MeanConfig,
    "fedavg": FedAvgConfig,
    "fedavgm": FedAvgMConfig,
    "fedadam": FedAdamConfig,
    "fedyogi": FedYogiConfig,
    "fedadagrad": FedAdagradConfig,
    "fedprox": FedProxConfig,
    "scaffold": ScaffoldConfig,
    "median": MedianConfig,
    "trimmed-mean": TrimmedMeanConfig,
    "clipped-mean": ClippedMeanConfig,
}
NAMES = tuple(CONFIGS)


class StrategyConfig(RootModel[AnyStrategyConfig]):
    """Which strategy, by `name`, with that strategy's own parameters (unknown keys refused).

    `StrategyConfig()` is the seed's `{name: mean}`; `StrategyConfig(name="fedavgm",
    weighting="samples", momentum=0.9)` and `StrategyConfig.model_validate({...})` both work.
    The selected strategy's model is `.root`.
    """

    model_config = ConfigDict(frozen=True)

    root: AnyStrategyConfig = MeanConfig()

    @model_validator(mode="before")
    @classmethod
    def _needs_a_name(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "name" not in raw:
            raise ValueError(f"a strategy needs a name, one of {list(NAMES)}")
        return raw

    @property
    def name(self) -> str:
        return self.root.name


def build_strategy(config: StrategyConfig | str) -> Strategy:
    """The strategy a config (or a bare name that needs no parameters: "mean", "fedavg") selects.

    Raises:
        ValueError: an unknown name, or a bare name whose strategy needs parameters.
    """
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown strategy {config!r}; choose one of {list(NAMES)}")
        try:
            config = StrategyConfig.model_validate({"name": config})
        except ValueError as exc:
            raise ValueError(f"strategy {config!r} needs parameters: {exc}") from None
    return config.root.build()


__all__ = [
    "CONFIGS",
    "NAMES",
    "AnyStrategyConfig",
    "ExpectedCounts",
    "Failure",
    "FedAvg",
    "FedOpt",
    "Scaffold",
    "Strategy",
    "StrategyConfig",
    "StrategyState",
    "UnweightedMean",
    "Weights",
    "build_strategy",
    "check_counts",
]
