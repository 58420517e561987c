"""Local workers started before Prefect is up (flows/launch.py, tasks/worker_logs.py): the flow
takes the running session of the same launch, a session nobody took is stopped, and a worker's
start-up lines are held until there is a run to file them under. Real worker programs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from conftest import ROOT

from fedcore.config import load_config
from flows.launch import make_session, prestarted
from tasks.worker_logs import HeldLines, hold_worker_logs, release_worker_logs, worker_logger


def smoke(mnist_dir: Path, **over: object):
    return load_config(ROOT / "configs" / "smoke.yaml", {"data_dir": str(mnist_dir), **over})


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_flow_takes_the_prestarted_session_of_the_same_launch(mnist_dir: Path) -> None:
    cfg = smoke(mnist_dir)
    with prestarted(cfg) as names:
        assert names == ["alice", "bob", "charlie", "testing"]
        taken = make_session(cfg, cfg.workers[0])
        try:
            assert taken.name == "alice"
            pid = taken.hello(120).pid  # answered by the program started before
            taken.start()  # already running: nothing new is started
            assert taken.hello(120).pid == pid
            # a second flow in the same process gets a new session: each is taken once
            again = make_session(cfg, cfg.workers[0])
            assert again is not taken and again.hello_info is None
        finally:
            release_worker_logs("alice")
            taken.close()


def test_sessions_nobody_took_are_stopped_when_the_block_ends(mnist_dir: Path) -> None:
    cfg = smoke(mnist_dir)
    with prestarted(cfg):
        bob = make_session(cfg, cfg.workers[1])
        bob_pid = bob.hello(120).pid
        # another launch of alice (a different shard) does not take the prestarted one
        other = cfg.workers[0].model_copy(update={"labels": [0, 1]})
        fresh = make_session(cfg, other)
        assert fresh.hello_info is None and fresh._pipe is None
    # alice, charlie and testing were not taken: their programs are told to stop
    from flows import launch

    assert launch._started == {}
    assert bob.hello(120).pid == bob_pid  # the one taken still runs
    bob.close()
    for name in ("alice", "bob", "charlie", "testing"):
        release_worker_logs(name)


def test_a_workers_start_up_lines_are_held_until_released(mnist_dir: Path) -> None:
    cfg = smoke(mnist_dir)
    seen = Lines()
    logger = worker_logger("charlie")
    logger.addHandler(seen)
    try:
        with prestarted(cfg):
            charlie = make_session(cfg, cfg.workers[2])
            charlie.hello(120)  # its start-up line was written before the hello's answer
            (holding,) = [f for f in logger.filters if isinstance(f, HeldLines)]
            deadline = time.monotonic() + 10  # the stderr reader may trail the reply
            while holding.held == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert seen.messages == []  # nothing reached a handler while held
            held = release_worker_logs("charlie")
            assert [r.getMessage() for r in held] == [
                "[charlie] charlie holds 18065 images (train digits 7-9) on cpu"
            ]
            logger.info("after")  # released: lines pass again
            assert seen.messages == ["after"]
            charlie.close()
    finally:
        logger.removeHandler(seen)
        for name in ("alice", "bob", "testing"):
            release_worker_logs(name)


def test_holding_keeps_at_most_its_bound_and_says_how_many_it_dropped() -> None:
    from tasks import worker_logs

    logger = worker_logger("hold-test")
    hold_worker_logs("hold-test")
    for i in range(worker_logs.MAX_HELD + 5):
        logger.info("line %d", i)
    held = release_worker_logs("hold-test")
    assert len(held) == worker_logs.MAX_HELD + 1
    assert held[0].getMessage() == "line 0"
    assert held[-1].getMessage() == "5 more start-up lines of this worker were not kept"
    assert release_worker_logs("hold-test") == []
