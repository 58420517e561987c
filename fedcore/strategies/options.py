"""Configuration pieces shared by the strategies' pydantic models (each model sits in its file).

Every model is frozen and refuses unknown keys, so `{name: fedavgm, momentun: 0.9}` is an error
naming `momentun`. Each model's `build()` makes its strategy from the fields it holds.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

ServerLR = Annotated[float, Field(gt=0)]  # server learning rate eta (1.0: plain averaging with SGD)
Momentum = Annotated[float, Field(ge=0, lt=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]
Tau = Annotated[float, Field(gt=0)]  # adaptivity tau of Reddi et al. 2021 (torch's eps)


class StrategyOptions(BaseModel):
    """Base of every strategy's configuration: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
