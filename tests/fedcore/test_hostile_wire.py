"""A device that lies on the wire (issue 12): every crafted reply ends in a typed error.

Each test runs the coordinator's real `WorkerSession` over the real `LocalTransport` against a
hostile worker program (HOSTILE below, started in place of the device's Python): for every
request it answers with the next reply queued by the test, crafted bytes sent as they are, and
once the queue is empty it turns into the real worker (`exec python -m fedcore.worker`), which
answers the request still waiting in the pipe. The program logs the pid that sent each reply,
so a test sees whether the session dropped the connection (the next reply comes from a new
process) or kept it (same process, stream still in step).
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedcore import protocol, tensorcodec, wire
from fedcore.errors import UpdateRejected, WorkerFailed
from fedcore.evaluation import EvalResult
from fedcore.model import initial_weights
from fedcore.protocol import Hello, TrainRequest, Update
from fedcore.session import WorkerSession
from fedcore.shards import ShardSpec
from fedcore.training import TrainMetrics, TrainPlan
from fedcore.transport.base import WorkerLaunch
from fedcore.transport.local import LocalTransport

HOSTILE = r"""
import os, select, struct, sys
from pathlib import Path

queue = Path(sys.argv[1])


def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data


while True:
    select.select([0], [], [])  # a request (or the end of input) is waiting
    replies = sorted(queue.glob("*.reply"))
    if not replies:  # honest from now on: the real worker reads the waiting request
        os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
    _, n_json, n_payload = struct.unpack("<4sIQ", read_exact(16))
    read_exact(n_json + n_payload)
    sent = replies[0].with_suffix(".sent")
    replies[0].rename(sent)
    with open(queue / "served.log", "a") as log:
        log.write(f"{os.getpid()}\n")
    os.write(1, sent.read_bytes())
"""

NAME = "dora"
COUNTS = {9: 1009}  # digit 9 of the MNIST test split: the shard below
HELLO = Hello(NAME, "labels 9 (test)", COUNTS, "3.8", "2.1", "cpu", 1, 1)
W = initial_weights(1)
REQUEST = TrainRequest(1, TrainPlan(steps=1, batch_size=8), 7, W)
LIMIT = protocol.reply_limit(W, 0)


class Device:
    """A session with the hostile worker program, and the replies it is to send."""

    def __init__(self, tmp: Path, mnist_dir: Path) -> None:
        self.queue = tmp / "queue"
        self.queue.mkdir()
        program = tmp / "hostile.py"
        program.write_text(HOSTILE)
        python = tmp / "python"
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{program}" "{self.queue}" "$@"\n')
        python.chmod(0o755)
        launch = WorkerLaunch(NAME, str(mnist_dir), ShardSpec.by_labels([9], "test"), threads=1)
        self.session = WorkerSession(launch, LocalTransport(str(python)))
        self._queued = 0

    def queue_replies(self, *frames: bytes) -> None:
        for frame in frames:
            self._queued += 1
            (self.queue / f"{self._queued:03d}.reply").write_bytes(frame)

    def senders(self) -> list[int]:
        """The pid that sent each reply so far."""
        log = self.queue / "served.log"
        return [int(p) for p in log.read_text().split()] if log.exists() else []


@pytest.fixture
def device(tmp_path: Path, mnist_dir: Path) -> Iterator[Device]:
    d = Device(tmp_path, mnist_dir)
    d.queue_replies(protocol.encode_hello(HELLO))
    assert d.session.hello(timeout=30) == HELLO  # the session now knows what the device holds
    yield d
    d.session.kill()


def frame(meta: dict | bytes, payload: bytes = b"") -> bytes:
    """A frame of `meta` as JSON text (which may be crafted) and `payload`: real magic, true
    lengths."""
    text = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return wire.PREFIX.pack(wire.MAGIC, len(text), len(payload)) + text + payload


def update_meta(**fields: object) -> dict:
    meta, _ = wire.decode_frame(
        protocol.encode_update(Update(NAME, 1, W, 1009, TrainMetrics(0.5, 8, 1, 0.1)))
    )
    meta.update(fields)
    return meta


def weights_payload() -> bytes:
    return tensorcodec.dumps(wire.join_prefixed({"weights": W}))


def header_file(entry: bytes, body: bytes = b"") -> bytes:
    """A safetensors file whose one tensor `weights/x` has the raw JSON header `entry`."""
    text = b'{"weights/x":' + entry + b"}"
    return struct.pack("<Q", len(text)) + text + body


def assert_dropped_then_reopened(device: Device) -> None:
    """The connection was dropped: the next call reaches a newly started program, in step."""
    device.queue_replies(protocol.encode_hello(HELLO))
    assert device.session.hello(timeout=30) == HELLO
    first, bad, after = device.senders()[-3:]
    assert first == bad and after != bad


# -- train replies ----------------------------------------------------------------------------

BAD_UPDATES = [
    pytest.param(
        # 256 MiB announced for a 1.7 MB model: refused from the prefix. The program never sends
        # the body, so a session that tried to read it would time out instead.
        wire.PREFIX.pack(wire.MAGIC, 2, 256 << 20) + b"{}",
        rf"sent a bad frame: frame payload announces 268435456 bytes, limit {LIMIT}$",
        id="reply-larger-than-the-model",
    ),
    pytest.param(
        frame(update_meta(), header_file(b'{"dtype":"F32","shape":[' + b"1," * 80_000 + b"1]}")),
        r"sent a bad update: tensor header announces 1600\d\d bytes, limit 65536",
        id="header-of-80k-dims",
    ),
    pytest.param(
        frame(
            update_meta(),
            header_file(
                b'{"dtype":"F32","shape":[' + b",".join([b"7" * 4000] * 12) + b"]}", bytes(64)
            ),
        ),
        "sent a bad update: tensor header is not valid JSON: number 7777.* more than 20 digits",
        id="header-of-4000-digit-dims",
    ),
    pytest.param(
        frame(
            update_meta(),
            header_file(b'{"dtype":"F32","shape":[0,%d],"data_offsets":[0,0]}' % 2**63),
        ),
        r"sent a bad update: tensor 'weights/x': dimensions must be integers in 0\.\.\d+, got "
        r"\[0, 9223372036854775808\]",
        id="empty-tensor-past-int64",
    ),
    pytest.param(
        frame(b'{"type":"update","metrics":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "sent a bad frame: frame metadata is not valid JSON: its brackets nest deeper than 16",
        id="metadata-nested-100k-deep",
    ),
    pytest.param(
        frame(
            json.dumps(update_meta(metrics={"loss": 0, "samples": 8, "steps": 1, "seconds": 0}))
            .replace('"loss": 0', '"loss": NaN')
            .encode(),
            weights_payload(),
        ),
        "sent a bad frame: frame metadata is not valid JSON: NaN is not a number",
        id="nan-loss",
    ),
    pytest.param(
        frame(
            json.dumps(update_meta(num_examples=123456789))
            .replace("123456789", "1" + "0" * 400)
            .encode(),
            weights_payload(),
        ),
        "sent a bad frame: frame metadata is not valid JSON: number 1000.* more than 20 digits",
        id="num-examples-10^400",
    ),
    pytest.param(
        frame(update_meta(num_examples=-11999), weights_payload()),
        r"sent a bad update: update num_examples must be an integer in 0\.\.2147483647, "
        "got -11999",
        id="num-examples-negative",
    ),
    pytest.param(
        frame(update_meta(num_examples=10**12), weights_payload()),
        r"sent a bad update: update num_examples must be an integer in 0\.\.2147483647, "
        "got 1000000000000",
        id="num-examples-10^12",
    ),
    pytest.param(
        frame(update_meta(num_examples=True), weights_payload()),
        r"update num_examples must be an integer in 0\.\.2147483647, got True",
        id="num-examples-bool",
    ),
]


@pytest.mark.parametrize(("reply", "message"), BAD_UPDATES)
def test_a_crafted_update_fails_the_worker_and_drops_the_connection(
    device: Device, reply: bytes, message: str
) -> None:
    device.queue_replies(reply)
    with pytest.raises(WorkerFailed, match=message) as err:
        device.session.train(REQUEST, timeout=30)
    assert str(err.value).startswith(f"worker {NAME!r}: sent a bad")
    assert len(str(err.value)) < 500  # never the whole crafted value
    assert_dropped_then_reopened(device)


def test_the_reply_cap_counts_the_extra_groups_the_strategy_asked_for(device: Device) -> None:
    # SCAFFOLD's reply: weights and a control delta of the same size. Allowed with one group...
    extras = {"control_delta": {k: torch.zeros_like(v) for k, v in W.items()}}
    reply = protocol.encode_update(
        Update(NAME, 1, W, 1009, TrainMetrics(0.5, 8, 1, 0.1), extras=extras)
    )
    device.queue_replies(reply, reply)
    update = device.session.train(REQUEST, timeout=30, reply_groups=1)
    assert set(update.extras) == {"control_delta"}
    # ...refused from the prefix when the request asked for none.
    with pytest.raises(WorkerFailed, match=rf"payload announces \d+ bytes, limit {LIMIT}$"):
        device.session.train(REQUEST, timeout=30)
    assert_dropped_then_reopened(device)


def test_a_well_formed_but_wrong_update_is_rejected_and_the_stream_stays(device: Device) -> None:
    wrong = dict(W, **{"fc2.bias": torch.zeros(11)})
    device.queue_replies(
        protocol.encode_update(Update(NAME, 1, wrong, 1009, TrainMetrics(0.5, 8, 1, 0.1)))
    )
    with pytest.raises(UpdateRejected, match=r"'fc2.bias' has shape \[11\], expected \[10\]"):
        device.session.train(REQUEST, timeout=30)
    # a well-formed frame: the stream is in step, the same program answers the next call
    device.queue_replies(protocol.encode_hello(HELLO))
    assert device.session.hello(timeout=30) == HELLO
    assert len(set(device.senders())) == 1


def test_after_a_crafted_reply_the_real_worker_trains(device: Device) -> None:
    device.queue_replies(wire.PREFIX.pack(wire.MAGIC, 2, 256 << 20) + b"{}")
    with pytest.raises(WorkerFailed, match="payload announces 268435456 bytes"):
        device.session.train(REQUEST, timeout=30)
    # the queue is empty: the session starts the program again, which is now the real worker
    update = device.session.train(REQUEST, timeout=120)
    assert (update.worker, update.round, update.num_examples) == (NAME, 1, 1009)
    assert update.metrics.samples == 8 and update.metrics.steps == 1


# -- hello replies ----------------------------------------------------------------------------


def test_a_hello_claiming_10_to_the_12_examples_is_refused(device: Device) -> None:
    meta, _ = wire.decode_frame(protocol.encode_hello(HELLO))
    meta["label_counts"] = {"9": 10**12}
    device.queue_replies(frame(meta))
    with pytest.raises(WorkerFailed, match=r"sent a bad hello: hello label count of 9 must be"):
        device.session.hello(timeout=30)
    assert device.session.hello_info == HELLO  # what it said before stands
    assert_dropped_then_reopened(device)


# -- evaluation replies -----------------------------------------------------------------------


def honest_result() -> dict:
    confusion = [[0] * 10 for _ in range(10)]
    confusion[9][9], confusion[9][4] = 1000, 9
    return EvalResult(1000, 1009, 0.1, 0.001, confusion, [0.0, 1.0]).to_dict()


def evaluation(raw: tuple[str, str] = ("", ""), **fields: object) -> bytes:
    """An evaluation of model `federated` with `fields` changed, then text `raw[0]` of its JSON
    replaced by `raw[1]`."""
    result = {**honest_result(), **fields}
    text = json.dumps({"type": "evaluation", "results": {"federated": result}})
    return frame(text.replace(*raw).encode() if raw[0] else text.encode())


BAD_EVALUATIONS = [
    pytest.param(
        evaluation(confusion=[[1, 2]] * 10),
        "evaluation of 'federated': confusion must be 10 rows of 10 counts",
        id="short-confusion-rows",
    ),
    pytest.param(
        evaluation(("123456789", "1" + "0" * 400), correct=123456789),
        "sent a bad frame: frame metadata is not valid JSON: number 1000.* more than 20 digits",
        id="correct-10^400",
    ),
    pytest.param(
        evaluation(correct=1009),
        "evaluation of 'federated': correct 1009 and total 1009 disagree with its confusion "
        r"matrix \(diagonal 1000, sum 1009\)",
        id="correct-not-the-diagonal",
    ),
    pytest.param(
        evaluation(confusion=[[1] * 10] * 10, total=100, correct=10),
        "evaluation of 'federated': total 100, but the evaluator's hello reported 1009 test images",
        id="total-not-the-test-set",
    ),
    pytest.param(
        evaluation(confusion=[[-1] * 10] * 10),
        r"evaluation of 'federated': confusion count must be an integer in 0\.\.2147483647, "
        "got -1",
        id="negative-count",
    ),
    pytest.param(
        evaluation(group_shares=[0.5]),
        "evaluation of 'federated': 1 group shares for 2 requested groups",
        id="missing-group-share",
    ),
    pytest.param(
        frame(
            {"type": "evaluation", "results": {"federated": honest_result(), "x": honest_result()}}
        ),
        r"evaluation results are for \['federated', 'x'\], the request carried \['federated'\]",
        id="a-model-not-asked-for",
    ),
]


@pytest.mark.parametrize(("reply", "message"), BAD_EVALUATIONS)
def test_a_crafted_evaluation_fails_the_evaluator_and_drops_the_connection(
    device: Device, reply: bytes, message: str
) -> None:
    device.queue_replies(reply)
    with pytest.raises(WorkerFailed, match=message):
        device.session.evaluate(1, {"federated": W}, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], 30)
    assert_dropped_then_reopened(device)


def test_an_honest_evaluation_passes(device: Device) -> None:
    device.queue_replies(evaluation())
    got = device.session.evaluate(1, {"federated": W}, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], 30)
    assert got["federated"].accuracy == 1000 / 1009
