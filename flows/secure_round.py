"""One round under secure aggregation: the coordinator ends it with the sum and the count only.

`run_round` (flows/rounds.py) calls `secure_round` instead of train + aggregate when
`secure_aggregation.enabled`. The exchange (`exchange`) runs the four phases of Bonawitz et al.
2017 over the worker sessions, every device of a phase in parallel, each call under the config's
train deadline; a device that does not answer (gone, past the deadline, an error, a reply that
does not decode or that the coordinator's state machine refuses) counts as dropped from that
phase on, and is a `Failure` of the round:

  secagg_setup  -> AdvertiseKeys     the round's participants, threshold, graph and blocks
  secagg_book   -> EncryptedShares   each device's neighbours' public keys
  secagg_train  -> MaskedInput       the train request (same seed, plan, extras as a plain
                                     round) plus the shares relayed to the device
  secagg_unmask -> UnmaskShares      the survivors; the sum is unmasked (SecAggCoordinator)

Then `aggregate_sum` (fedcore.strategies_sum) turns the sum of the survivors' deltas (and
SCAFFOLD's control deltas) and their count into the next global model, as the strategy would
from the single updates.

What the coordinator never learns: a single update. Worker-model evaluation and screening are
off (fedcore.privacy_config refuses explicit ones); the check of the sum's range and count
(fedcore.privacy.fixedpoint.check_sum) stands in for screening. A device whose hello says it
lacks `cryptography` is refused before it trains, naming the device and the fix. A round below
its quorum stops before anything is unmasked, so a round tried again never reveals a second sum
over other devices (two sums' difference would be one device's update).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from fedcore import wire
from fedcore.errors import (
    FedError,
    QuorumNotReached,
    UpdateRejected,
    WireError,
    WorkerFailed,
    cause_of,
)
from fedcore.model import weight_spec
from fedcore.privacy import secagg_messages as messages
from fedcore.privacy.errors import SecAggAborted, SecAggUnavailable
from fedcore.privacy.fixedpoint import unflatten
from fedcore.privacy.primitives import INSTALL
from fedcore.privacy.secagg_coordinator import SecAggCoordinator, SecAggSum
from fedcore.privacy_config import secagg_setup
from fedcore.protocol import TrainRequest, Update
from fedcore.secagg_worker import DELTA, encode_train
from fedcore.seeding import derive_seed
from fedcore.session import WorkerSession
from fedcore.strategies import Failure
from fedcore.strategies_sum import aggregate_sum
from fedcore.training import TrainPlan

log = logging.getLogger("flows.secure_round")
Weights = dict[str, torch.Tensor]
# (direction "down" coordinator -> device or "up", device, the frame): everything the
# coordinator sends and receives in a round, for a caller that keeps its view (the tests)
Observer = Callable[[str, str, bytes], None]
CONTROL_DELTA = "control_delta"


@dataclass
class SecureRound:
    """What one exchange ended with: the unmasked sum, who failed, the bytes each way."""

    result: SecAggSum
    failures: list[Failure]
    bytes_down: dict[str, int] = field(default_factory=dict)  # coordinator -> device
    bytes_up: dict[str, int] = field(default_factory=dict)  # device -> coordinator
    trained: list[str] = field(default_factory=list)  # devices sent the train request
    control_lost: list[str] = field(default_factory=list)  # SCAFFOLD: in the sum, c_i lost


def check_devices(sessions: Mapping[str, WorkerSession], names: Sequence[str]) -> None:
    """Refuse a device whose hello says it lacks `cryptography` (its `facts`), before it trains.

    A hello without facts (a worker older than them) is let through: such a device answers the
    round's setup with SecAggUnavailable, which `exchange` turns into the same refusal.

    Raises:
        SecAggUnavailable: naming the device, what its Python lacks and how to fix it.
    """
    for name in names:
        hello = sessions[name].hello_info
        facts = getattr(hello, "facts", None)
        if hello is None or facts is None:
            continue
        if not facts.get("cryptography"):
            raise SecAggUnavailable(
                f"device {name!r} cannot take part in secure aggregation: its Python "
                f"({hello.python}) lacks the `cryptography` package; {INSTALL}"
            )


def _ask(
    session: WorkerSession,
    frame: bytes,
    timeout: float,
    max_payload: int,
    length: int | None,
    expected: type,
) -> tuple[Any, int, bytes]:
    """One request to a device: (its decoded reply, bytes received, the reply's frame).

    Raises:
        WorkerUnreachable, WorkerTimeout, WorkerFailed: as any session call.
    """
    meta, payload, total = session.request(frame, timeout, max_payload)
    try:
        msg = messages.decode_meta(meta, payload, length)
        if not isinstance(msg, expected):
            raise WireError(f"answered {type(msg).__name__}, expected {expected.__name__}")
    except WireError as exc:
        session.kill()
        raise WorkerFailed(session.name, f"sent a bad secure-aggregation reply: {exc}") from None
    return msg, total - len(frame), wire.encode_frame(meta, payload)


def _phase(
    sessions: Mapping[str, WorkerSession],
    frames: Mapping[str, bytes],
    timeout: float,
    expected: type,
    length: int | None,
    out: SecureRound,
    failures: dict[str, Failure],
    rnd: int,
    observe: Observer | None,
    logger: Any,
) -> dict[str, Any]:
    """Send every device its frame at once; the replies that came, the others as failures."""
    max_payload = 4 * length if length is not None else 0
    for name, frame in frames.items():
        out.bytes_down[name] = out.bytes_down.get(name, 0) + len(frame)
        if observe is not None:
            observe("down", name, frame)
    replies: dict[str, Any] = {}
    if not frames:
        return replies
    with ThreadPoolExecutor(len(frames), thread_name_prefix="secagg") as pool:
        futures = {
            name: pool.submit(_ask, sessions[name], frame, timeout, max_payload, length, expected)
            for name, frame in frames.items()
        }
        for name, future in futures.items():
            try:
                msg, received, reply = future.result()
            except FedError as exc:
                if "SecAggUnavailable:" in str(exc):
                    raise SecAggUnavailable(
                        f"device {name!r} cannot take part in secure aggregation: {exc}"
                    ) from None
                logger.warning("Round %d: %s dropped (%s): %s", rnd, name, cause_of(exc), exc)
                failures[name] = Failure(name, rnd, cause_of(exc), str(exc))
                continue
            out.bytes_up[name] = out.bytes_up.get(name, 0) + received
            if observe is not None:
                observe("up", name, reply)
            replies[name] = msg
    return replies


def exchange(
    sessions: Mapping[str, WorkerSession],
    setup: messages.Setup,
    requests: Mapping[str, TrainRequest],
    timeout: float,
    observe: Observer | None = None,
    on_train: Callable[[list[str]], None] | None = None,
    quorum: int = 0,
    logger: Any = log,
) -> SecureRound:
    """One secure-aggregation round over `sessions` (the participants of `setup`).

    Args:
        sessions: the devices' sessions, by name.
        setup: the round's parameters (`fedcore.privacy_config.secagg_setup`).
        requests: each participant's train request (as a plain round would send it).
        timeout: seconds each device has for each phase.
        observe: called with every frame sent ("down") and received ("up"), in phase order.
        on_train: called with the devices about to be sent their train request.
        quorum: the fewest masked inputs worth unmasking. Below it the round stops before any
            unmasking share is asked for: a round tried again must not reveal a second sum of
            other devices, whose difference would be one device's update.
        logger: where dropped devices and refused replies are logged (the flow's run logger).

    Returns:
        The unmasked sum with its count and survivors, the failures, the bytes each way.

    Raises:
        SecAggAborted: fewer than the threshold of devices left in some phase.
        SecAggUnavailable: a device lacks `cryptography` (it says so at setup).
        UpdateRejected: the sum is out of the range clipped updates allow.
    """
    rnd = setup.round
    coordinator = SecAggCoordinator(setup)
    failures: dict[str, Failure] = {}
    out = SecureRound(result=None, failures=[])  # type: ignore[arg-type]

    def phase(frames: Mapping[str, bytes], expected: type, length: int | None = None) -> Any:
        return _phase(
            sessions, frames, timeout, expected, length, out, failures, rnd, observe, logger
        )

    def refused() -> None:
        for name, why in coordinator.refused.items():
            if name not in failures:
                logger.warning(
                    "Round %d: %s's secure-aggregation reply refused: %s", rnd, name, why
                )
                failures[name] = Failure(name, rnd, UpdateRejected.cause, why)

    try:
        setup_frame = messages.encode(setup)
        keys = phase({n: setup_frame for n in setup.participants}, messages.AdvertiseKeys)
        books = coordinator.collect_keys(keys)
        refused()
        shares = phase({n: messages.encode(b) for n, b in books.items()}, messages.EncryptedShares)
        relayed = coordinator.collect_shares(shares)
        refused()
        if on_train is not None:
            on_train(sorted(relayed))
        out.trained = sorted(relayed)
        masked = phase(
            {n: encode_train(requests[n], r) for n, r in relayed.items()},
            messages.MaskedInput,
            setup.length,
        )
        unmask = coordinator.collect_masked(masked)
        refused()
        if len(unmask) < quorum:
            raise SecAggAborted(
                f"round {rnd}: {len(unmask)} masked inputs arrived, the quorum is {quorum}; "
                "nothing was unmasked"
            )
        reveals = phase({n: messages.encode(r) for n, r in unmask.items()}, messages.UnmaskShares)
        out.result = coordinator.collect_unmask(reveals)
        refused()
        out.control_lost = [
            n for n in out.result.survivors if n in masked and masked[n].control_lost
        ]
    except SecAggAborted as exc:
        raise SecAggAborted(
            f"{exc}; dropped: "
            + (
                "; ".join(f"{f.worker} ({f.cause}: {f.message})" for f in failures.values())
                or "none"
            )
        ) from None
    for name in setup.participants:
        if name not in out.result.survivors and name not in failures:
            failures[name] = Failure(name, rnd, "failed", "left out of the round's sum")
    out.failures = [failures[n] for n in setup.participants if n in failures]
    return out


def sum_tensors(
    result: SecAggSum, block: str, spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, torch.Tensor]:
    """Block `block` of the sum cut into the model's named tensors (float64)."""
    layout = [(name, tuple(shape), torch.float64) for name, (shape, _) in spec.items()]
    return unflatten(result.sums[block], layout)


# -- the round in the flow ----------------------------------------------------------------------


def secure_round(
    ctx: Any, rnd: int, plan: TrainPlan, weights: Weights
) -> tuple[list[Update], list[Failure], Weights, dict[str, float]]:
    """Round `rnd` under secure aggregation, for `run_round` (flows/rounds.py): the updates
    (none: the coordinator sees none), the failures, the next global weights and the round's
    metrics (`workers_ok`: the devices in the sum; bytes each way per device, `round_bytes`).
    Tried again like a plain round below its quorum when `below_quorum: retry`.

    Raises:
        SecAggUnavailable: a device lacks `cryptography` (before it trains).
        QuorumNotReached: fewer devices in the sum than the quorum (or the threshold), after
            the configured retries.
        UpdateRejected: the sum is out of the range clipped updates allow.
    """
    from prefect import get_run_logger  # noqa: PLC0415 - flows only; the exchange needs none

    cfg = ctx.cfg
    logger = get_run_logger()
    retries = cfg.round_retries if cfg.below_quorum == "retry" else 0
    tries = 0
    while True:
        try:
            return _secure_once(ctx, rnd, plan, weights, logger)
        except (QuorumNotReached, SecAggAborted) as exc:
            tries += 1
            if tries > retries:
                if isinstance(exc, QuorumNotReached):
                    raise
                raise QuorumNotReached(f"round {rnd}: {exc}") from None
            logger.warning("%s; trying round %d again (%d of %d)", exc, rnd, tries, retries)


def _secure_once(
    ctx: Any, rnd: int, plan: TrainPlan, weights: Weights, logger: Any
) -> tuple[list[Update], list[Failure], Weights, dict[str, float]]:
    cfg = ctx.cfg
    names = list(ctx.trainers)
    if ctx.privacy is not None:  # only devices whose next round stays within their budget
        names = ctx.privacy.admit(rnd, plan, ctx.example_counts(), cfg.required_updates())
        for name in ctx.privacy.newly_stopped(rnd):
            logger.warning(
                "Round %d: %s's privacy budget is spent (epsilon %.3f of %g): it trains no more",
                rnd,
                name,
                ctx.privacy.epsilon(name),
                cfg.privacy.target_epsilon,
            )
    check_devices(ctx.sessions, names)
    spec = weight_spec()
    setup = secagg_setup(cfg, rnd, names, spec)
    requests = {
        n: TrainRequest(
            rnd, plan, derive_seed(cfg.seed, n, rnd), weights, ctx.strategy.extras_for(n, rnd)
        )
        for n in names
    }

    def charge(trained: list[str]) -> None:  # asked to train: its budget is spent, answer or not
        if ctx.privacy is not None:
            ctx.privacy.charge(plan, trained, ctx.example_counts())

    started = time.perf_counter()
    done = exchange(
        ctx.sessions,
        setup,
        requests,
        cfg.timeouts.train,
        on_train=charge,
        quorum=cfg.required_updates(),
        logger=logger,
    )
    result = done.result
    if result.count < cfg.required_updates():
        raise QuorumNotReached(
            f"round {rnd}: {result.count} of {len(ctx.trainers)} workers in the secure sum, "
            f"{cfg.required_updates()} needed; failed: "
            + "; ".join(f"{f.worker} ({f.cause}: {f.message})" for f in done.failures)
        )
    control = sum_tensors(result, CONTROL_DELTA, spec) if CONTROL_DELTA in result.sums else None
    absent = [n for n in names if n not in result.survivors]
    aggregated = aggregate_sum(
        ctx.strategy,
        rnd,
        weights,
        sum_tensors(result, DELTA, spec),
        control,
        result.count,
        result.survivors,
        absent,
        lost=done.control_lost,
    )
    logger.info(
        "Round %d: secure sum of %d updates (%s) in %.1fs; %.2f MB down, %.2f MB up per device",
        rnd,
        result.count,
        ", ".join(result.survivors),
        time.perf_counter() - started,
        max(done.bytes_down.values(), default=0) / 1e6,
        max(done.bytes_up.values(), default=0) / 1e6,
    )
    metrics: dict[str, float] = {"workers_ok": result.count}
    metrics.update({f"wire_bytes/{n}": b for n, b in done.bytes_up.items()})
    metrics.update({f"wire_bytes_down/{n}": b for n, b in done.bytes_down.items()})
    metrics.update({f"failed/{n}": 0 for n in result.survivors})
    metrics["round_bytes"] = sum(done.bytes_up.values())
    return [], done.failures, aggregated, metrics
