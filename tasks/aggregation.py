"""The aggregation task: a round's valid updates become the next global model.

A task of its own, `aggregate-r07`, so the Prefect UI shows the server's step of each round
between the workers' `train-*` tasks and the `evaluate-*` task, with its duration. Never retried:
an update the strategy rejects, or an arithmetic error, fails the same way again. Tensors and the
strategy pass by reference, never hashed or persisted (`NO_CACHE`, `persist_result=False`), and
the task runs in the flow's process, so the strategy's state (momentum buffers, control
variates) changes in place as it would without Prefect.

A round whose updates were folded into a running sum as they arrived (flows/rounds.py, `streams`)
ends in `finish_aggregate` instead, under the same task name: the UI shows the same step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from fedcore.protocol import Update
from fedcore.strategies import Failure, Strategy
from fedcore.strategies.streaming import Accumulator


@task(
    name="aggregate",
    task_run_name="aggregate-r{round:02d}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def aggregate(
    strategy: Strategy,
    round: int,
    global_weights: Mapping[str, torch.Tensor],
    updates: Sequence[Update],
    failures: Sequence[Failure],
) -> dict[str, torch.Tensor]:
    """The next global weights: `strategy.aggregate` over the round's updates and failures.

    Args:
        strategy: the training's strategy (its state is updated in place).
        round: the round number, 1-based (names the task run).
        global_weights: the round's starting global model.
        updates: the round's valid updates (at least one).
        failures: the workers that delivered no usable update, and why.

    Returns:
        The next global weights.

    Raises:
        UpdateRejected: an update fails the strategy's check (no state is changed then).
        ValueError: no updates.
    """
    return strategy.aggregate(round, global_weights, updates, failures)


@task(
    name="aggregate",
    task_run_name="aggregate-r{round:02d}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def finish_aggregate(
    folded: Accumulator, round: int, failures: Sequence[Failure], order: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The next global weights from a round folded as its updates arrived (the running sum of a
    strategy that streams, fedcore.strategies.streaming): the server's step of the round, shown
    in the UI like `aggregate`'s.

    Args:
        folded: the round's accumulator, every valid update folded in (at least one).
        round: the round number, 1-based (names the task run).
        failures: the workers that delivered no usable update, and why.
        order: the trainers in the config's order (state kept per worker is applied in it).

    Raises:
        ValueError: nothing was folded.
    """
    return folded.finish(failures, order)
