"""The `secure_aggregation:` and `privacy:` sections of an experiment, and how they compose.

Secure aggregation (fedcore.privacy.secagg_*): the coordinator learns only the sum of the round's
updates and their count. Everything that needs one device's update therefore cannot run with it,
and the rules below refuse such a config with the reason and the fix instead of silently
weakening either side:

- robust aggregation (median, trimmed-mean, clipped-mean) combines single updates: mutually
  exclusive with secure aggregation;
- screening compares single updates: off under secure aggregation. Each device clips its own
  update (`clip_norm`, `bound`) and the coordinator checks that the sum is one clipped updates
  can make, and that its count reaches the quorum (fedcore.privacy.fixedpoint.check_sum). An
  explicit `screening.norm_factor` above 0 is refused; the default is ignored;
- scoring each worker's returned model (`evaluation.workers`) needs single updates: off under
  secure aggregation; an explicit `true` is refused, the default is ignored;
- `weighting: samples` (and fedavg) weights single updates by their own example counts:
  refused (the seed's and the best recipe are unweighted);
- semi-sync and async schedules buffer and re-weigh single updates by staleness: refused;
- update compression is replaced by the fixed-point encoding of the masked sum: refused;
- SCAFFOLD's control deltas travel in the same masked vector, as a second block with its own
  range (`control_clip_norm`, `control_bound`).

Differential privacy (`privacy:`, fedcore.privacy.dpsgd on the device, fedcore.privacy.accountant
on the coordinator): DP-SGD in every trainer's local steps; epsilon per device at `delta` after
each round; a device whose next round would take it past `target_epsilon` is stopped
(`on_budget_spent: stop-device`) or the training ends (`stop-training`). Both compose with
secure aggregation and with each other.

Coordinator only (pydantic, Python 3.11).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ROBUST = ("median", "trimmed-mean", "clipped-mean")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class SecureAggregationConfig(_Strict):
    """`secure_aggregation:` (Bonawitz et al. 2017; SecAgg+ neighbour graph, Bell et al. 2020)."""

    enabled: bool = False
    # devices whose shares unmask a round: a count, or a fraction of the trainers (rounded up);
    # default: the smallest majority, so up to n - t devices may drop after masking
    threshold: Annotated[int, Field(ge=2)] | Annotated[float, Field(gt=0.5, le=1)] | None = None
    # neighbours each device masks with (SecAgg+; even); default: all the others (SecAgg)
    degree: Annotated[int, Field(ge=2)] | None = None
    # each device clips its model delta to this L2 norm and every coordinate to [-bound, bound]:
    # the range the coordinator's check of the sum relies on (round-1 deltas of the seed's recipe
    # measure 1.1-1.6 in norm, 0.14 at most per coordinate)
    clip_norm: Positive = 5.0
    bound: Positive = 1.0
    # the same for SCAFFOLD's control deltas, the second block of the masked vector
    control_clip_norm: Positive = 20.0
    control_bound: Positive = 5.0

    def threshold_for(self, trainers: int) -> int:
        """t for `trainers` devices: as configured, else the smallest majority."""
        if self.threshold is None:
            return max(2, trainers // 2 + 1)
        if isinstance(self.threshold, float):
            return max(2, math.ceil(self.threshold * trainers - 1e-9))
        return self.threshold

    def degree_for(self, trainers: int) -> int:
        return trainers - 1 if self.degree is None else min(self.degree, trainers - 1)


class PrivacyConfig(_Strict):
    """`privacy:`: DP-SGD on every trainer (Abadi et al. 2016), accounted per device."""

    enabled: bool = False
    noise_multiplier: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0  # sigma
    max_grad_norm: Positive = 1.0  # C: each example's gradient is clipped to this L2 norm
    target_epsilon: Positive = 2.0  # the budget per device
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5  # below 1 / the examples of a device
    on_budget_spent: Literal["stop-device", "stop-training"] = "stop-device"

    @model_validator(mode="after")
    def _noise_when_enabled(self) -> PrivacyConfig:
        if self.enabled and self.noise_multiplier == 0:
            raise ValueError(
                "privacy.noise_multiplier 0 gives no privacy (epsilon is infinite): use 0.5-2, "
                "or turn privacy off"
            )
        return self


def check_composition(config: Any) -> None:
    """Refuse an experiment whose sections cannot hold together (see the module docstring).

    Args:
        config: an ExperimentConfig (read by attribute, so this module imports nothing of
            fedcore.config): its `secure_aggregation`, `strategy`, `screening`, `schedule`,
            `train` and trainers.

    Raises:
        ValueError: with the field names, the reason and the fix (pydantic reports it).
    """
    secagg: SecureAggregationConfig = config.secure_aggregation
    if not secagg.enabled:
        return
    strategy = config.strategy.root
    trainers = len(config.trainers)
    if strategy.name in ROBUST:
        raise ValueError(
            f"secure_aggregation and strategy {strategy.name} are mutually exclusive: a robust "
            "rule needs every single update, and secure aggregation shows the coordinator only "
            "their sum. Choose one: a robust strategy against devices that lie, or secure "
            "aggregation against a curious coordinator (with mean, or fedavgm, fedadam, "
            "fedyogi, fedadagrad, fedprox or scaffold weighted unweighted)"
        )
    weighting = "samples" if strategy.name == "fedavg" else getattr(strategy, "weighting", None)
    if weighting == "samples":
        raise ValueError(
            f"secure_aggregation needs unweighted averaging, not strategy {strategy.name} "
            "weighted by samples: that needs each device's own example count, which secure "
            "aggregation hides (use strategy.weighting: unweighted, or mean instead of fedavg)"
        )
    if "norm_factor" in config.screening.model_fields_set and config.screening.norm_factor > 0:
        raise ValueError(
            "screening.norm_factor needs single updates, which secure aggregation hides: "
            "remove it (or set 0). Under secure aggregation each device clips its update to "
            "secure_aggregation.clip_norm and the coordinator checks the sum's range and count"
        )
    if "workers" in config.evaluation.model_fields_set and config.evaluation.workers:
        raise ValueError(
            "evaluation.workers: true scores each worker's own model, which secure aggregation "
            "never shows the coordinator: remove it (or set false); the federated model is "
            "still evaluated"
        )
    if not config.schedule.is_sync:
        raise ValueError(
            f"secure_aggregation needs schedule.mode: sync, not {config.schedule.mode}: a round "
            "unmasks one sum of the updates trained from the same global model"
        )
    if config.train.compression.name != "none":
        raise ValueError(
            f"secure_aggregation replaces train.compression ({config.train.compression.name}): "
            "updates travel as masked 32-bit fixed point; remove train.compression"
        )
    t = secagg.threshold_for(trainers)
    if trainers < 2:
        raise ValueError("secure_aggregation needs at least 2 trainers: a sum of one is the update")
    hood = secagg.degree_for(trainers) + 1
    if not (2 * t > hood and t <= hood):
        raise ValueError(
            f"secure_aggregation.threshold {t} must be a majority of each device's neighbourhood "
            f"of {hood} (itself and secure_aggregation.degree others): more than {hood // 2}, "
            f"at most {hood}"
        )
    if secagg.degree is not None and secagg.degree < trainers - 1 and secagg.degree % 2:
        raise ValueError(f"secure_aggregation.degree {secagg.degree} must be even")
    required = config.required_updates()
    if required < t:
        raise ValueError(
            f"the quorum ({required} updates) is below secure_aggregation.threshold {t}: a round "
            f"with fewer than {t} devices cannot be unmasked; raise the quorum to at least {t}"
        )


def evaluates_workers(config: Any) -> bool:
    """Whether each worker's returned model is scored: never under secure aggregation."""
    return bool(config.evaluation.workers) and not config.secure_aggregation.enabled


def screening_factor(config: Any) -> float:
    """The screening norm factor in effect: 0 under secure aggregation, else the configured one."""
    return 0.0 if config.secure_aggregation.enabled else float(config.screening.norm_factor)


def secagg_setup(config: Any, round: int, trainers: list[str], spec: Any) -> Any:
    """The round's secure-aggregation `Setup`: the trainers asked this round, the threshold and
    graph of the config, and the blocks of the masked vector: the model delta (`spec`: name ->
    (shape, dtype), as `fedcore.model.weight_spec()`), plus SCAFFOLD's control delta."""
    from .privacy.fixedpoint import Block
    from .privacy.secagg_messages import Setup
    from .seeding import derive_seed

    s: SecureAggregationConfig = config.secure_aggregation
    length = sum(math.prod(shape) for shape, _ in spec.values())
    blocks = [Block("delta", length, s.clip_norm, s.bound)]
    if config.strategy.root.name == "scaffold":
        blocks.append(Block("control_delta", length, s.control_clip_norm, s.control_bound))
    n = len(trainers)
    seed = derive_seed(config.seed, "secagg", round)
    return Setup(round, tuple(trainers), s.threshold_for(n), s.degree_for(n), seed, tuple(blocks))
