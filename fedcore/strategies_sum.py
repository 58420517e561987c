"""Aggregation from a sum: the next global model when the coordinator knows only the sum of a
round's deltas (and SCAFFOLD's control deltas) and their count, as under secure aggregation
(flows/secure_round.py).

`aggregate_sum` gives what the strategy's `aggregate` gives from the single updates, up to float
rounding: the unweighted average is global + sum / count (mean, fedavg unweighted, fedprox),
stepped to by the server optimizer when there is one (fedavgm, fedadam, fedyogi, fedadagrad);
SCAFFOLD's server control variate c = (1/N) sum_j c_j is kept as N c plus the round's control
deltas, since no single c_j is ever seen, and every device in the sum is acknowledged (its
`control_base` names the round, so its c_i stays in step); when a device in the sum says it lost
its c_i (a new process), c and every c_i start again at 0. A strategy that needs single updates
(a robust rule, sample weighting) is refused by name.

It works on the strategy objects from outside (FedOpt's weighting, rule and server optimizer;
SCAFFOLD's control state) because the strategies' `aggregate` takes single updates: a method
`Strategy.aggregate_sum(...)` on each class would say it better, and this module is its stand-in
until then.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from .model import Weights
from .strategies import Strategy
from .strategies.aggregate import floating_spec
from .strategies.fedopt import FedOpt
from .strategies.scaffold import Scaffold

log = logging.getLogger(__name__)


def aggregate_sum(
    strategy: Strategy,
    round: int,
    global_weights: Mapping[str, torch.Tensor],
    delta_sum: Mapping[str, torch.Tensor],
    control_sum: Mapping[str, torch.Tensor] | None,
    count: int,
    survivors: Sequence[str] = (),
    absent: Sequence[str] = (),
    lost: Sequence[str] = (),
) -> Weights:
    """The next global weights from the sum of `count` devices' deltas, as `strategy.aggregate`
    would give from their single updates (up to float rounding).

    Args:
        strategy: a FedOpt without a robust rule, weighted `unweighted` (mean, fedavgm, fedadam,
            fedyogi, fedadagrad, fedprox), or SCAFFOLD around one.
        delta_sum: sum over the devices of (trained - global), tensor by tensor.
        control_sum: SCAFFOLD: the sum of their control deltas; else None.
        count: how many devices the sums hold (>= 1).
        survivors: SCAFFOLD: the devices in the sum (their deltas are acknowledged).
        absent: SCAFFOLD: the round's devices that are not (they still count in N).
        lost: SCAFFOLD: survivors that no longer hold the c_i the server counts for them (a
            new process); c and every device's c_i then start again at 0.

    Raises:
        ValueError: a strategy that needs single updates, a missing or unexpected control sum,
            a count below 1.
    """
    if count < 1:
        raise ValueError(f"round {round}: a sum of {count} updates")
    if isinstance(strategy, Scaffold):
        if control_sum is None:
            raise ValueError(f"round {round}: SCAFFOLD needs the sum of the control deltas")
        weights = _fedopt_step(strategy.model_step, global_weights, delta_sum, count)
        _scaffold_control(strategy, round, global_weights, control_sum, survivors, absent)
        if lost:
            _scaffold_restart(strategy, round, lost)
        return weights
    if isinstance(strategy, FedOpt):
        if control_sum is not None:
            raise ValueError(f"strategy {strategy.name!r} takes no control deltas")
        return _fedopt_step(strategy, global_weights, delta_sum, count)
    raise ValueError(
        f"strategy {strategy.name!r} cannot aggregate a sum of updates: use mean, fedavgm, "
        "fedadam, fedyogi, fedadagrad, fedprox or scaffold (unweighted) with secure aggregation"
    )


def _fedopt_step(
    fedopt: FedOpt,
    global_weights: Mapping[str, torch.Tensor],
    delta_sum: Mapping[str, torch.Tensor],
    count: int,
) -> Weights:
    """FedOpt.combine from a sum: the unweighted average is global + sum / count; the server
    optimizer (if any) steps on global - average as usual."""
    if fedopt.rule is not None:
        raise ValueError(f"strategy {fedopt.name!r} combines single updates (a robust rule)")
    if fedopt.weighting != "unweighted":
        raise ValueError(
            f"strategy {fedopt.name!r} weights updates by {fedopt.weighting}: a sum has no "
            "per-device weights (use weighting: unweighted)"
        )
    average = {
        k: (g.to(torch.float64) + delta_sum[k].to(torch.float64) / count).to(g.dtype)
        if g.is_floating_point()
        else g.clone()
        for k, g in global_weights.items()
    }
    if fedopt.server is None:
        return average
    return fedopt.server.step(dict(global_weights), average)


def _scaffold_control(
    strategy: Scaffold,
    round: int,
    global_weights: Mapping[str, torch.Tensor],
    control_sum: Mapping[str, torch.Tensor],
    survivors: Sequence[str],
    absent: Sequence[str],
) -> None:
    """SCAFFOLD's c = (1/N) sum_j c_j without single c_j: the sum N_old c_old plus the round's
    control deltas, over the new population N; every survivor's delta acknowledged. The records
    of single c_j stay empty: the server never sees one."""
    spec = floating_spec(dict(global_weights))
    population = strategy._population
    before = len(population)
    population.update(survivors)
    population.update(absent)
    old = strategy._c
    c = {}
    for k, (shape, dtype) in spec.items():
        total = torch.zeros(shape, dtype=torch.float64)
        if old is not None:
            total += old[k].to(torch.float64) * before
        total += control_sum[k].to(torch.float64)
        c[k] = (total / len(population)).to(dtype)
    strategy._c = c
    for name in survivors:
        strategy._bases[name] = round


def _scaffold_restart(strategy: Scaffold, round: int, lost: Sequence[str]) -> None:
    """Start SCAFFOLD's control variates again at 0 on every side. Device(s) `lost` no longer
    hold the c_i that the server's sum still counts (a new process starts from 0), and no single
    c_i can be taken out of a sum the server never saw in parts: left there, it would bias every
    device's correction for the rest of the training. With c = 0 and every base 0, each device
    drops its c_i on its next request (`control_base` 0, fedcore.local_algorithms) and
    c = mean c_j holds again, at the cost of the correction built so far."""
    log.warning(
        "round %d: %s lost its SCAFFOLD control variate (new process?); under secure "
        "aggregation one device's share cannot be taken out of the server's c, so every "
        "device's control variate starts again at 0",
        round,
        ", ".join(lost),
    )
    strategy._c = None
    for name in strategy._population:
        strategy._bases[name] = 0
