"""How many worker replies the coordinator reads and decodes at once, and into what memory.

When a fleet's N updates arrive together, reading and decoding each on its own request thread
means N payload buffers (1.7 MB each for the seed's model, read in pieces and joined) and N
decoded models alive at the same moment, allocated by N threads. The C allocator gives each busy
thread an arena of its own, keeps what was freed there for reuse and rarely returns it to the
system, so the coordinator's resident memory rises with N and keeps the high-water mark of
every round (issue 15's measurement: allocated memory in use flat at ~200 MB from 3 to 30
trainers, memory held free by the allocator 28 MB at 3 and 141 MB at 30 after one round,
220 MB seven rounds later).

`ReplySlots` bounds that: a reply's payload is read only inside a slot, at most `slots` at a
time process-wide, straight into the slot's own buffer (allocated once, grown to the largest
payload it has carried, reused by every later reply), and decoded and checked there, on one of
the object's own `slots` threads (`decode`): the decoded tensors and the checks' temporaries are
allocated by those few threads whatever the fleet's size, so the allocator keeps room for them
in a few arenas, reused round after round, not in one per request thread. The other replies
wait where they are, in the operating system's pipe or socket buffer, their workers blocked on
the write (backpressure). Slots are given in the order they were asked for, so replies are
still taken as they arrive.

The bound is memory for time: a slot is held while its payload is read, so `slots` also bounds
how many slow links are read in parallel. Reading a local pipe or a LAN link takes a few
milliseconds a model, so DEFAULT_SLOTS (4) slots keep up with a fleet of tens while holding at
most 4 payload buffers and 4 decoded updates whatever its size.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

DEFAULT_SLOTS = 4


class ReplySlots:
    """At most `slots` reply payloads read and decoded at once, each into a reused buffer.

    Args:
        slots: how many at once (>= 1).

    Raises:
        ValueError: slots below 1.
    """

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        if slots < 1:
            raise ValueError(f"reply slots must be at least 1, got {slots}")
        self.slots = slots
        self._cond = threading.Condition()
        self._buffers = [bytearray() for _ in range(slots)]  # the free ones
        self._queue: collections.deque[object] = collections.deque()  # waiters, in order
        self.held = 0  # slots in use now
        self.peak = 0  # the most slots ever in use at once
        self.allocations = 0  # buffers allocated or grown, over the object's life
        self._decoders: ThreadPoolExecutor | None = None  # started by the first `decode`

    @property
    def waiting(self) -> int:
        """How many callers wait for a slot now."""
        with self._cond:
            return len(self._queue)

    @contextmanager
    def slot(self, size: int, timeout: float | None) -> Iterator[memoryview]:
        """Wait for a slot (first come, first served), then yield `size` bytes of its buffer
        to read a payload into and decode from; the slot is free again on exit.

        Args:
            size: the payload's length (already bounded by the caller's limit).
            timeout: the most seconds to wait for a slot; None waits for ever.

        Raises:
            TimeoutError: no slot came free within `timeout`.
        """
        buffer = self._acquire(timeout)
        try:
            if len(buffer) < size:
                buffer = bytearray(size)  # the old one is let go; this one stays with the slot
                with self._cond:
                    self.allocations += 1
            view = memoryview(buffer)[:size]
            try:
                yield view
            finally:
                view.release()
        finally:
            with self._cond:
                self._buffers.append(buffer)
                self.held -= 1
                self._cond.notify_all()

    def decode(self, work: Callable[[], T]) -> T:
        """`work()` (a payload's decoding and checks, inside a slot) on one of the object's
        `slots` decoding threads; its result, or what it raised."""
        with self._cond:
            if self._decoders is None:
                self._decoders = ThreadPoolExecutor(self.slots, thread_name_prefix="reply-decode")
            decoders = self._decoders
        return decoders.submit(work).result()

    def _acquire(self, timeout: float | None) -> bytearray:
        deadline = None if timeout is None else time.monotonic() + timeout
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or not self._buffers:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(
                            f"no reply slot came free within {timeout:g}s "
                            f"({self.slots} replies are read at once)"
                        )
                    self._cond.wait(left)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may go now
            self.held += 1
            self.peak = max(self.peak, self.held)
            return self._buffers.pop()


SHARED = ReplySlots()  # the process's: every session's replies count against one bound
