"""What a worker program sends outside its frames is bounded: its stderr, and how long it may take
to read a request. Real worker subprocesses through the local transport; the hostile part is a
wrapper script given as the worker's `python`, which writes its flood and then execs the real
interpreter, so the worker that follows is the real one and must still answer."""

from __future__ import annotations

import logging
import os
import re
import signal
import stat
import sys
from pathlib import Path

import pytest
from conftest import ALICE_COUNTS

from fedcore.errors import WorkerTimeout
from fedcore.model import initial_weights
from fedcore.protocol import TrainRequest
from fedcore.session import WorkerSession
from fedcore.shards import ShardSpec
from fedcore.training import TrainPlan
from fedcore.transport.base import WorkerLaunch
from fedcore.transport.local import LocalPipe, LocalTransport
from fedcore.transport.stderr import LogLimits

pytestmark = pytest.mark.slow

ALICE = ShardSpec.by_labels(range(0, 4))


def _noisy_python(tmp_path: Path, flood: str) -> str:
    """A `python` that runs the shell snippet `flood` (its stdout goes to stderr), then the
    real interpreter with the worker's arguments."""
    script = tmp_path / "noisy-python"
    script.write_text(f'#!/bin/sh\n{{ {flood} ; }} >&2\nexec {sys.executable} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _records(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == f"fedcore.worker.{name}"]


def test_a_32_mib_stderr_line_is_cut_to_4_kib_with_a_marker(
    tmp_path: Path, mnist_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    size = 32 * 1024 * 1024
    python = _noisy_python(tmp_path, f"head -c {size} /dev/zero | tr '\\0' a; echo")
    caplog.set_level(logging.INFO, logger="fedcore.worker")
    session = WorkerSession(
        WorkerLaunch("alice", str(mnist_dir), ALICE, threads=1), LocalTransport(python)
    )
    try:
        assert session.hello(timeout=120).label_counts == ALICE_COUNTS  # it goes on
        pipe = session._pipe
        assert isinstance(pipe, LocalPipe)
    finally:
        session.close()
    long = [r for r in _records(caplog, "alice") if r.getMessage().startswith("aaaa")]
    assert len(long) == 1
    msg = long[0].getMessage()
    assert msg.startswith("a" * 4096) and not msg.startswith("a" * 4097)
    assert f"[... {size - 4096} more bytes of this line dropped" in msg
    assert "cut at 4096 bytes" in msg
    assert len(msg) < 4096 + 200
    assert pipe.stderr.bytes_cut == size - 4096


def test_a_flood_of_stderr_lines_is_rate_limited_and_counted(
    tmp_path: Path, mnist_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    python = _noisy_python(tmp_path, "seq 1 20000")
    caplog.set_level(logging.INFO, logger="fedcore.worker")
    limits = LogLimits(rate=1.0, burst=10)
    session = WorkerSession(
        WorkerLaunch("alice", str(mnist_dir), ALICE, threads=1),
        LocalTransport(python, log_limits=limits),
    )
    try:
        assert session.hello(timeout=120).label_counts == ALICE_COUNTS
        pipe = session._pipe
        assert isinstance(pipe, LocalPipe)
    finally:
        session.close()
    fwd = pipe.stderr
    records = _records(caplog, "alice")
    numbers = [int(r.getMessage()) for r in records if r.getMessage().isdigit()]
    # The burst goes through in order; what follows is dropped, counted, and summarised.
    assert numbers[:10] == list(range(1, 11))
    assert fwd.lines_dropped > 0
    assert fwd.lines_forwarded + fwd.lines_dropped == fwd.lines_seen >= 20000
    summaries = [r for r in records if "lines of this worker's stderr" in r.getMessage()]
    assert summaries and {r.levelno for r in summaries} == {logging.WARNING}
    counts = [re.fullmatch(r"dropped (\d+) lines .*", r.getMessage()) for r in summaries]
    reported = sum(int(m.group(1)) for m in counts if m)
    assert reported == fwd.lines_dropped
    assert "more than 1 lines/s" in summaries[0].getMessage()


def test_a_wedged_local_worker_times_out_the_send_naming_it(mnist_dir: Path) -> None:
    session = WorkerSession(
        WorkerLaunch("alice", str(mnist_dir), ALICE, threads=1),
        LocalTransport(send_timeout=1.0),
    )
    try:
        session.hello(timeout=120)
        pipe = session._pipe
        assert isinstance(pipe, LocalPipe)
        os.kill(pipe.proc.pid, signal.SIGSTOP)  # wedged: it reads nothing any more
        request = TrainRequest(1, TrainPlan(steps=1), 1, initial_weights(1))  # ~1.7 MB > a pipe
        with pytest.raises(WorkerTimeout) as info:
            session.train(request, timeout=60)
        msg = str(info.value)
        assert "'alice'" in msg and f"local worker alice (pid {pipe.proc.pid}) took no input" in msg
        assert "took no input for 1s" in msg  # the send's own deadline, not the training's 60 s
        assert not info.value.transient
        assert session._pipe is None  # dropped: the next call starts a fresh worker
        assert pipe.proc.poll() is not None  # and the wedged one was killed
    finally:
        session.close()
