"""Staleness functions: how much an update trained from an old global model still counts.

An update trained from global version v that reaches the coordinator at version t is tau = t - v
versions stale; the buffered server step weighs it by s(tau), with s(0) = 1. The three named
choices are those of Xie, Koyejo, Gupta, 2019, "Asynchronous Federated Optimization"
(arXiv:1903.03934, section 5.2), also used by FedBuff (Nguyen et al. 2022, AISTATS):

- `constant`: s(tau) = 1, every update counts fully however old (max_staleness still drops).
- `polynomial`: s(tau) = (1 + tau)^-a, a > 0 (the FedBuff paper's 1/sqrt(1 + tau) is a = 0.5).
- `hinge`: s(tau) = 1 for tau <= b, else 1 / (a (tau - b) + 1): full weight up to b versions,
  then falling off like 1/tau.

Each is a small frozen config model (pydantic, coordinator only) with a `weight(tau)` method.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel


class _Staleness(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def weight(self, tau: int) -> float:
        """s(tau) for an update `tau` >= 0 versions stale.

        Raises:
            ValueError: tau < 0 (an update from a version the coordinator has not made yet).
        """
        if tau < 0:
            raise ValueError(f"staleness must be >= 0, got {tau}")
        return self._weight(tau)

    def _weight(self, tau: int) -> float:
        raise NotImplementedError


class ConstantStaleness(_Staleness):
    """`{name: constant}`: s(tau) = 1."""

    name: Literal["constant"]

    def _weight(self, tau: int) -> float:
        return 1.0


class PolynomialStaleness(_Staleness):
    """`{name: polynomial, a: 0.5}`: s(tau) = (1 + tau)^-a."""

    name: Literal["polynomial"]
    a: Annotated[float, Field(gt=0, le=10)] = 0.5

    def _weight(self, tau: int) -> float:
        return float((1.0 + tau) ** -self.a)


class HingeStaleness(_Staleness):
    """`{name: hinge, a: 10, b: 4}`: s(tau) = 1 for tau <= b, else 1 / (a (tau - b) + 1)."""

    name: Literal["hinge"]
    a: Annotated[float, Field(gt=0, le=1000)] = 10.0
    b: Annotated[int, Field(ge=0)] = 4

    def _weight(self, tau: int) -> float:
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)


class StalenessConfig(
    RootModel[
        Annotated[
            ConstantStaleness | PolynomialStaleness | HingeStaleness, Field(discriminator="name")
        ]
    ]
):
    """One of the named staleness functions, chosen by `name`."""

    model_config = ConfigDict(frozen=True)

    def weight(self, tau: int) -> float:
        return self.root.weight(tau)
