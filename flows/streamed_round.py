"""A round whose updates are folded into the aggregate as they arrive, for fleets of tens.

Held, a round keeps every update (1.7 MB each for the seed's model) until the last one is in:
memory grows with the fleet. Streamed, each update is checked and added to the strategy's running
sum (fedcore.strategies.streaming) the moment its `train-<worker>-rNN` task finishes, then let go,
and the round's `aggregate-rNN` task only finishes the sum. Only when nothing needs the single
updates afterwards (`streams`): the rest of the round (quorum, retries, record) is the held
round's, in flows/rounds.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import torch
from prefect.futures import PrefectConcurrentFuture

from fedcore.errors import UpdateRejected
from fedcore.protocol import Update
from fedcore.strategies import Failure
from fedcore.strategies.streaming import Accumulator
from fedcore.training import TrainPlan
from flows.rounds import (
    RunContext,
    TrainingFuture,
    check_quorum,
    rejection,
    submit_training,
    task_outcome,
)

Weights = dict[str, torch.Tensor]


def streams(ctx: RunContext) -> bool:
    """Whether round updates are folded into the aggregate as they arrive (flat memory), not
    held until the round ends: only when nothing needs the single updates afterwards, that is
    screening off (`screening.norm_factor: 0`: its bounds compare every update with the round's
    median) and no worker model scored (`evaluation.workers: false`, or no evaluator), under a
    strategy that can (every averaging strategy and SCAFFOLD; not the robust rules, which need
    every update at once: `Strategy.accumulator`)."""
    cfg = ctx.cfg
    scored = ctx.evaluator is not None and cfg.evaluation.workers
    held = cfg.screening.norm_factor > 0 or scored
    return not held and ctx.strategy.accumulator(0, {}) is not None


def train_streamed(
    ctx: RunContext, rnd: int, plan: TrainPlan, weights: Weights
) -> tuple[list[Update], list[Failure], Accumulator]:
    """One try at round `rnd`, each update checked and folded into the strategy's running
    aggregate as its task completes, then let go (see `streams`).

    Returns:
        The updates without their tensors (worker, counts, metrics, bytes: what the round's
        record reads), the failures, both in the trainers' order, and the accumulator.

    Raises:
        QuorumNotReached: fewer valid updates than the config's quorum.
    """
    folded = ctx.strategy.accumulator(rnd, weights)
    assert folded is not None  # `streams` said so
    futures = submit_training(ctx, rnd, plan, weights)
    kept: dict[str, Update] = {}
    failed: dict[str, Failure] = {}
    for name in arrivals(futures):
        got = task_outcome(rnd, name, futures.pop(name))
        if isinstance(got, Update):
            try:
                folded.add(got, ctx.expected_counts(name, plan))
            except UpdateRejected as exc:
                got = rejection(rnd, name, exc.reason, shown=exc)
            else:
                got = dataclasses.replace(got, weights={}, extras={})
        if isinstance(got, Failure):
            failed[name] = got
        else:
            kept[name] = got
        del got  # its tensors are in the sum now, its future gone: nothing holds them
    order = {n: i for i, n in enumerate(ctx.trainers)}
    failures = sorted(failed.values(), key=lambda f: order.get(f.worker, len(order)))
    check_quorum(ctx, rnd, len(kept), failures)
    return sorted(kept.values(), key=lambda u: order.get(u.worker, len(order))), failures, folded


def arrivals(futures: Mapping[str, TrainingFuture]) -> Iterator[str]:
    """The names of `futures` as their trainings finish (a future of another task runner than
    the thread pool's: in the given order). Holds no finished future, so an update is let go as
    soon as its caller has folded it."""
    pending: dict[Future[Any], str] = {}
    for name, f in futures.items():
        if isinstance(f, Future):  # an answer within a fleet's round task
            pending[f] = name
        elif isinstance(f, PrefectConcurrentFuture):
            pending[f.wrapped_future] = name
    if len(pending) < len(futures):
        yield from list(futures)
        return
    while pending:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        names = [pending.pop(wrapped) for wrapped in done]
        del done
        yield from names
