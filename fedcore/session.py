"""A coordinator's session with one worker program, over any transport.

One session per worker per training (docs/ARCHITECTURE.md, Decisions 2). Calls are serialised by
a lock, so tasks on different threads may share the object but never one pipe at a time. Failures
become typed errors naming the worker: `WorkerUnreachable` (gone; retried, the session reopens),
`WorkerTimeout` (no answer in time; not retried within the round, the session reopens next round),
`WorkerFailed` (answered with an error, or with a reply that does not decode), `UpdateRejected`
(answered with a well-formed update whose values are refused).

A reply is bounded where it arrives: the frame prefix announces its size and a reply larger than
the call can need (nothing for hello and evaluate; the weights and the extra tensor groups asked
for, `protocol.reply_limit`, for train, in the plan's compression codec) is refused before a
byte of its body is read. A compressed update is decoded against the request it answers (its
plan, and its global weights, to which the decoded delta is added: `protocol.decode_update`).
Any decoder failure (`WireError`: a bad frame, header or field) drops the connection, so the
stream can never be out of step; the next call starts the worker program again (within the
round's retry for a transient error, in the next round otherwise).

Memory does not grow with the fleet: a request frame is let go once sent, and a reply's payload
is read inside one of a bounded number of reply slots shared by every session of the process
(`fedcore.intake.ReplySlots`, 4 by default), straight into the slot's reused buffer, then
decoded and checked there on the slots' own threads; the other replies wait in their pipes. So
however many updates arrive at once, at most that many payload buffers and decoded updates
exist inside the sessions.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch

from . import intake, protocol, wire
from .errors import UpdateRejected, WireError, WorkerFailed, WorkerTimeout, WorkerUnreachable
from .evaluation import EvalResult
from .model import weight_spec
from .protocol import Hello, TrainRequest, Update
from .transport.base import Pipe, Transport, WorkerLaunch

log = logging.getLogger("fedcore.session")
T = TypeVar("T")
Payload = bytes | memoryview  # a reply's payload: empty bytes, or a reply slot's buffer


def _copied(meta: wire.Meta, payload: Payload, nbytes: int) -> tuple[wire.Meta, bytes, int]:
    """The reply with its payload copied out of the slot (for a caller that keeps it)."""
    return meta, bytes(payload), nbytes


class WorkerSession:
    """Request/reply with one worker program; (re)started on demand."""

    def __init__(
        self,
        launch: WorkerLaunch,
        transport: Transport,
        max_payload: int = wire.MAX_PAYLOAD,
        extras_spec: Callable[[str], Mapping[str, tuple]] | None = None,
        slots: intake.ReplySlots = intake.SHARED,
    ) -> None:
        self.launch = launch
        self.slots = slots
        self.name = launch.name
        self.transport = transport
        self.max_payload = max_payload
        self.hello_info: Hello | None = None
        self._pipe: Pipe | None = None
        self._lock = threading.Lock()
        self._spec = weight_spec()
        self._abandoned = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker program (returns before it is ready; `hello` waits)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._pipe is not None and self._pipe.alive():
            return
        try:
            self._pipe = self.transport.open(self.launch)
        except ConnectionError as exc:
            raise WorkerUnreachable(self.name, str(exc)) from None

    def close(self, wait: bool = True) -> None:
        """Say bye and stop the worker program; never raises.

        Args:
            wait: wait until the program has exited (else a worker that answered bye exits on
                its own while the caller goes on: `Pipe.close_in_background`).
        """
        with self._lock:
            pipe, self._pipe = self._pipe, None
            if pipe is None:
                return
            try:
                pipe.send(protocol.encode_simple("bye"), 5.0)
                wire.read_frame(lambda n: pipe.read_exact(n, 5.0), 0)
            except (ConnectionError, EOFError, TimeoutError, WireError, OSError):
                wait = True  # no bye answered: stop it here, by force if need be
            if wait:
                pipe.close()
            else:
                pipe.close_in_background()

    def abandon(self) -> None:
        """Stop the worker program now, even while a call waits on it (the training is over
        and its job no longer matters): that call ends with WorkerFailed, which is never
        retried, and the session refuses further calls. Never raises."""
        self._abandoned = True
        self.kill()

    def kill(self) -> None:
        """Drop the connection at once (after a timeout or a protocol error)."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close(timeout=0.5)

    # -- requests ---------------------------------------------------------------------------

    def _call(
        self,
        frames: list[bytes],
        timeout: float | None,
        max_payload: int,
        decode: Callable[[wire.Meta, Payload, int], T],
    ) -> T:
        """Send the request frame `frames` (its parts in order, each let go once sent: the list
        ends empty), read the reply and return `decode(meta, payload, bytes both ways)`. A
        payload is read inside one of `self.slots` (fedcore.intake), into its buffer, and
        decoded there on one of its threads: `decode` must not keep `payload` (nor a view of
        it) past its return."""
        if self._abandoned:
            raise WorkerFailed(self.name, "stopped: the training is over")
        self._start_locked()
        pipe = self._pipe
        assert pipe is not None
        sent = sum(len(part) for part in frames)
        received = 0

        def read_exact(n: int) -> bytes:
            nonlocal received
            data = pipe.read_exact(n, timeout)
            received += len(data)
            return data

        try:
            while frames:
                pipe.send(frames.pop(0), timeout)
            meta, size = wire.read_head(read_exact, max_payload)
            if not size:
                return self._answer(meta, b"", sent + received, decode)
            with self.slots.slot(size, timeout) as payload:
                try:
                    pipe.read_into(payload, timeout)
                except EOFError:
                    raise WireError("frame truncated: stream closed inside a frame") from None
                nbytes = sent + received + size
                return self.slots.decode(lambda: self._answer(meta, payload, nbytes, decode))
        except (TimeoutError, ConnectionError, EOFError, OSError, WireError) as exc:
            self.kill()
            if self._abandoned:
                raise WorkerFailed(self.name, "stopped: the training is over") from None
            if isinstance(exc, TimeoutError):
                raise WorkerTimeout(self.name, f"no answer within {timeout}s ({exc})") from None
            if isinstance(exc, WireError):
                raise WorkerFailed(self.name, f"sent a bad frame: {exc}") from None
            raise WorkerUnreachable(self.name, f"connection lost: {exc}") from None

    def _answer(
        self,
        meta: wire.Meta,
        payload: Payload,
        nbytes: int,
        decode: Callable[[wire.Meta, Payload, int], T],
    ) -> T:
        """`decode(meta, payload, nbytes)`, or WorkerFailed for the worker's error reply."""
        if meta.get("type") == "error":
            error = wire.clip(str(meta.get("error")), 60)
            raise WorkerFailed(self.name, f"{error}: {wire.clip(str(meta.get('message')), 2000)}")
        return decode(meta, payload, nbytes)

    def request(
        self, frame: bytes, timeout: float | None, max_payload: int
    ) -> tuple[wire.Meta, bytes, int]:
        """One request frame and its reply (meta, payload, bytes both ways), under the session's
        lock: for protocols built beside train/evaluate (secure aggregation's phases).

        Raises:
            WorkerUnreachable, WorkerTimeout, WorkerFailed: as `train`.
        """
        with self._lock:
            return self._call([frame], timeout, max_payload, _copied)

    def _decode(self, what: str, decode: Callable[[], T]) -> T:
        """`decode()`, or on a WireError the connection dropped and WorkerFailed raised."""
        try:
            return decode()
        except WireError as exc:
            self.kill()
            raise WorkerFailed(self.name, f"sent a bad {what}: {exc}") from None

    def hello(self, timeout: float | None = 120.0) -> Hello:
        """Wait for the worker to be ready and learn what it holds."""
        with self._lock:
            info = self._call(
                [protocol.encode_hello_request()],
                timeout,
                0,
                lambda meta, _, __: self._decode("hello", lambda: protocol.decode_hello(meta)),
            )
        if info.worker != self.name:
            raise WorkerFailed(
                self.name, f"answered as {wire.quote(info.worker)}: check the inventory"
            )
        self.hello_info = info
        return info

    def train(
        self, request: TrainRequest, timeout: float | None = None, reply_groups: int | None = None
    ) -> Update:
        """One round of local training; the returned update is validated.

        Args:
            request: the round's request.
            timeout: seconds for the answer.
            reply_groups: how many extra tensor groups the reply may carry besides the weights
                (the strategy's `reply_groups`); by default as many as the request carries.

        Raises:
            WorkerUnreachable, WorkerTimeout, WorkerFailed, UpdateRejected.
        """
        groups = len(request.extras) if reply_groups is None else reply_groups
        limit = protocol.reply_limit(request.weights, groups, request.plan)
        frames = list(protocol.encode_train_parts(request))
        down = sum(len(part) for part in frames)

        def decode(meta: wire.Meta, payload: Payload, nbytes: int) -> Update:
            update = self._decode(
                "update",
                lambda: protocol.decode_update(
                    meta,
                    payload,  # type: ignore[arg-type]  # a slot's buffer reads as bytes do
                    wire_bytes=nbytes,
                    wire_bytes_down=down,
                    plan=request.plan,
                    reference=request.weights,
                    max_groups=1 + groups,
                ),
            )
            self._check_update(update, request.round)
            return update

        with self._lock:
            self._check_compression(request)
            return self._call(frames, timeout, limit, decode)

    def _check_update(self, update: Update, round: int) -> None:
        """Refuse an update for another worker or round, or whose tensors are not the model's
        (names, shapes, dtypes) or not finite."""
        if update.worker != self.name or update.round != round:
            raise UpdateRejected(
                self.name,
                f"answered for worker {wire.quote(update.worker)} round {update.round}, "
                f"expected {self.name!r} round {round}",
            )
        wire.validate_tensors(self.name, update.weights, self._spec)
        for group, tensors in update.extras.items():
            for k, t in tensors.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise UpdateRejected(
                        self.name,
                        f"{wire.clip(group, 60)} {wire.clip(repr(k), 60)} has non-finite values",
                    )

    def _check_compression(self, request: TrainRequest) -> None:
        """Refuse to send a compressed request to a worker whose hello says it predates them."""
        info = self.hello_info
        if request.plan.compression == "none" or info is None:
            return
        if info.protocol < protocol.COMPRESSION_PROTOCOL:
            raise WorkerFailed(
                self.name,
                f"runs worker protocol {info.protocol}, which cannot decode train.compression "
                f"{request.plan.compression!r} (protocol {protocol.COMPRESSION_PROTOCOL} and "
                "later can): update the worker's fedcore, or set train.compression.name: none",
            )

    def evaluate(
        self,
        round: int,
        models: Mapping[str, Mapping[str, torch.Tensor]],
        groups: Sequence[Sequence[int]],
        timeout: float | None = None,
    ) -> dict[str, EvalResult]:
        """Score each named model on the worker's data.

        The results are checked against the request (one per model, one share per group) and
        against the evaluator's hello (its test-set size), see `protocol.decode_evaluation`.
        """
        total = self.hello_info.num_examples if self.hello_info is not None else None
        with self._lock:
            return self._call(
                [protocol.encode_evaluate(round, models, groups)],
                timeout,
                0,
                lambda meta, _, __: self._decode(
                    "evaluation",
                    lambda: protocol.decode_evaluation(meta, list(models), len(groups), total),
                ),
            )
