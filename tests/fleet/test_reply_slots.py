"""At most K worker replies read and decoded at once, into K reused buffers (fedcore.intake).

Real worker programs (local subprocesses, IID parts of MNIST) answer a round all at once: with
the only slot held, every reply waits in its pipe (the workers blocked on their writes); let go,
the replies are read one at a time, into one buffer allocated once, and the updates are the ones
an unbounded read decodes. Over rounds, no tensor and no buffer stays behind.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from waiting import wait_until

from fedcore.errors import WorkerTimeout
from fedcore.intake import ReplySlots
from fedcore.model import initial_weights
from fedcore.protocol import TrainRequest, Update
from fedcore.session import WorkerSession
from fedcore.shards import ShardSpec
from fedcore.strategies.streaming import RunningSum
from fedcore.training import TrainPlan
from fedcore.transport.base import WorkerLaunch
from fedcore.transport.local import LocalTransport

WORKERS = 6
PLAN = TrainPlan(steps=2, batch_size=32, lr=0.1)
MODEL_BYTES = 431_080 * 4


@pytest.fixture(scope="module")
def sessions(mnist_dir: Path) -> Iterator[list[WorkerSession]]:
    launched = [
        WorkerSession(
            WorkerLaunch(f"w{i}", str(mnist_dir), ShardSpec.iid(i, WORKERS, 1), threads=1),
            LocalTransport(),
        )
        for i in range(WORKERS)
    ]
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda s: s.hello(timeout=300), launched))
    yield launched
    for s in launched:
        s.close()


def train_all(
    sessions: list[WorkerSession], slots: ReplySlots, rnd: int, weights: dict[str, torch.Tensor]
) -> list[Update]:
    """Every session trains round `rnd` at once, its replies read through `slots`."""
    for s in sessions:
        s.slots = slots
    with ThreadPoolExecutor(len(sessions)) as pool:
        return list(
            pool.map(
                lambda s: s.train(TrainRequest(rnd, PLAN, 100 + int(s.name[1:]), weights), 300),
                sessions,
            )
        )


def big_tensors() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and o.numel() > 10_000)


def test_replies_wait_in_their_pipes_while_the_only_slot_is_held(
    sessions: list[WorkerSession],
) -> None:
    weights = initial_weights(1)
    slots = ReplySlots(1)
    held = slots.slot(0, None)
    held.__enter__()  # the test holds the only slot: no reply can be read
    released = threading.Event()
    try:
        with ThreadPoolExecutor(1) as runner:
            round_ = runner.submit(train_all, sessions, slots, 1, weights)
            # every worker trained, answered, and its session waits for a slot (its reply in
            # the pipe, the worker blocked writing it)
            wait_until(lambda: slots.waiting == WORKERS, 300, f"{WORKERS} replies waiting")
            assert not round_.done()
            held.__exit__(None, None, None)
            released.set()
            bounded = round_.result()
    finally:
        if not released.is_set():
            held.__exit__(None, None, None)
    assert slots.peak == 1 and slots.held == 0 and slots.waiting == 0
    assert slots.allocations == 1  # one buffer, grown once to a reply's size, reused by all 6
    # the same requests read without a bound decode the very same updates
    unbounded = train_all(sessions, ReplySlots(WORKERS), 1, weights)
    for a, b in zip(bounded, unbounded, strict=True):
        assert a.worker == b.worker
        assert all(torch.equal(a.weights[k], b.weights[k]) for k in weights)
        assert a.wire_bytes_down == b.wire_bytes_down and a.wire_bytes > 2 * MODEL_BYTES


def test_rounds_leave_no_tensor_or_buffer_behind(sessions: list[WorkerSession]) -> None:
    slots = ReplySlots(2)
    weights = initial_weights(1)
    counts = []
    for rnd in range(1, 5):
        total = RunningSum()
        for update in train_all(sessions, slots, rnd, weights):
            total.add(update.weights, update.num_examples)
        weights = total.mean()
        del update, total
        gc.collect()
        counts.append(big_tensors())
    assert counts == [counts[0]] * 4, counts  # the global model only, every round
    assert slots.peak <= 2 and slots.held == 0
    assert slots.allocations <= 2  # 24 replies, at most 2 buffers ever allocated


def test_a_reply_that_gets_no_slot_in_time_is_a_timeout_and_the_next_call_recovers(
    sessions: list[WorkerSession],
) -> None:
    s = sessions[0]
    slots = ReplySlots(1)
    s.slots = slots
    request = TrainRequest(1, PLAN, 7, initial_weights(1))
    with slots.slot(0, None), pytest.raises(WorkerTimeout) as err:
        s.train(request, timeout=20)
    assert "w0" in str(err.value) and "no reply slot came free within 20s" in str(err.value)
    assert slots.held == 0 and slots.waiting == 0
    update = s.train(request, timeout=300)  # the session restarted its worker
    assert update.worker == "w0" and update.metrics.steps == 2


def test_slots_are_given_in_the_order_asked_and_reused() -> None:
    slots = ReplySlots(1)
    order: list[int] = []
    first = slots.slot(100, None)
    first.__enter__()
    threads = []
    for i in range(4):
        t = threading.Thread(target=lambda i=i: _take(slots, i, order))
        t.start()
        wait_until(lambda i=i: slots.waiting == i + 1, 30, f"{i + 1} callers waiting")
        threads.append(t)
    first.__exit__(None, None, None)
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3]
    assert slots.allocations == 1 and slots.peak == 1


def _take(slots: ReplySlots, i: int, order: list[int]) -> None:
    with slots.slot(50 + i, None) as view:
        assert len(view) == 50 + i
        order.append(i)


def test_a_slot_wait_times_out_naming_the_bound() -> None:
    slots = ReplySlots(1)
    with slots.slot(1, None), pytest.raises(TimeoutError) as err, slots.slot(1, 0.05):
        pass
    assert "no reply slot came free within 0.05s (1 replies are read at once)" in str(err.value)
    assert slots.held == 0 and slots.waiting == 0


def test_at_least_one_slot() -> None:
    with pytest.raises(ValueError, match="reply slots must be at least 1, got 0"):
        ReplySlots(0)
