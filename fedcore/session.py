"""A coordinator's session with one worker program, over any transport.

One session per worker per training (docs/ARCHITECTURE.md, Decisions 2). Calls are serialised by
a lock, so tasks on different threads may share the object but never one pipe at a time. Failures
become typed errors naming the worker: `WorkerUnreachable` (gone; retried, the session reopens),
`WorkerTimeout` (no answer in time; not retried within the round, the session reopens next round),
`WorkerFailed` (answered with an error), `UpdateRejected` (answered with bad tensors).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence

import torch

from . import protocol, wire
from .errors import UpdateRejected, WireError, WorkerFailed, WorkerTimeout, WorkerUnreachable
from .evaluation import EvalResult
from .model import weight_spec
from .protocol import Hello, TrainRequest, Update
from .transport.base import Pipe, Transport, WorkerLaunch

log = logging.getLogger("fedcore.session")


class WorkerSession:
    """Request/reply with one worker program; (re)started on demand."""

    def __init__(
        self,
        launch: WorkerLaunch,
        transport: Transport,
        max_payload: int = wire.MAX_PAYLOAD,
        extras_spec: Callable[[str], Mapping[str, tuple]] | None = None,
    ) -> None:
        self.launch = launch
        self.name = launch.name
        self.transport = transport
        self.max_payload = max_payload
        self.hello_info: Hello | None = None
        self._pipe: Pipe | None = None
        self._lock = threading.Lock()
        self._spec = weight_spec()

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

    def close(self) -> None:
        """Say bye and stop the worker program; never raises."""
        with self._lock:
            pipe, self._pipe = self._pipe, None
            if pipe is None:
                return
            try:
                pipe.send(protocol.encode_simple("bye"))
                wire.read_frame(lambda n: pipe.read_exact(n, 5.0))
            except (ConnectionError, EOFError, TimeoutError, WireError, OSError):
                pass
            pipe.close()

    def kill(self) -> None:
        """Drop the connection at once (after a timeout or a protocol error)."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close(timeout=0.5)

    # -- requests ---------------------------------------------------------------------------

    def _call(self, frame: bytes, timeout: float | None) -> tuple[wire.Meta, bytes, int]:
        self._start_locked()
        pipe = self._pipe
        assert pipe is not None
        try:
            pipe.send(frame)
            received = 0

            def read_exact(n: int) -> bytes:
                nonlocal received
                data = pipe.read_exact(n, timeout)
                received += len(data)
                return data

            meta, payload = wire.read_frame(read_exact, self.max_payload)
        except TimeoutError as exc:
            self.kill()
            raise WorkerTimeout(self.name, f"no answer within {timeout}s ({exc})") from None
        except (ConnectionError, EOFError, OSError) as exc:
            self.kill()
            raise WorkerUnreachable(self.name, f"connection lost: {exc}") from None
        except WireError as exc:
            self.kill()
            raise WorkerFailed(self.name, f"sent a bad frame: {exc}") from None
        if meta.get("type") == "error":
            raise WorkerFailed(self.name, f"{meta.get('error')}: {meta.get('message')}")
        return meta, payload, len(frame) + received

    def hello(self, timeout: float | None = 120.0) -> Hello:
        """Wait for the worker to be ready and learn what it holds."""
        with self._lock:
            meta, _, _ = self._call(protocol.encode_hello_request(), timeout)
        try:
            info = protocol.decode_hello(meta)
        except WireError as exc:
            raise WorkerFailed(self.name, str(exc)) from None
        if info.worker != self.name:
            raise WorkerFailed(self.name, f"answered as {info.worker!r}: check the inventory")
        self.hello_info = info
        return info

    def train(self, request: TrainRequest, timeout: float | None = None) -> Update:
        """One round of local training; the returned update is validated.

        Raises:
            WorkerUnreachable, WorkerTimeout, WorkerFailed, UpdateRejected.
        """
        with self._lock:
            meta, payload, nbytes = self._call(protocol.encode_train(request), timeout)
        try:
            update = protocol.decode_update(meta, payload, wire_bytes=nbytes)
        except WireError as exc:
            raise UpdateRejected(self.name, str(exc)) from None
        if update.worker != self.name or update.round != request.round:
            raise UpdateRejected(
                self.name,
                f"answered for worker {update.worker!r} round {update.round}, "
                f"expected {self.name!r} round {request.round}",
            )
        wire.validate_tensors(self.name, update.weights, self._spec)
        for group, tensors in update.extras.items():
            for k, t in tensors.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise UpdateRejected(self.name, f"{group} {k!r} has non-finite values")
        return update

    def evaluate(
        self,
        round: int,
        models: Mapping[str, Mapping[str, torch.Tensor]],
        groups: Sequence[Sequence[int]],
        timeout: float | None = None,
    ) -> dict[str, EvalResult]:
        """Score each named model on the worker's data."""
        with self._lock:
            meta, _, _ = self._call(protocol.encode_evaluate(round, models, groups), timeout)
        try:
            return protocol.decode_evaluation(meta)
        except WireError as exc:
            raise WorkerFailed(self.name, str(exc)) from None
