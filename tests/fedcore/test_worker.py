"""The worker program, run for real as a subprocess: shards, hello, train, evaluate, bad input."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALICE_COUNTS, BOB_COUNTS, ROOT

from fedcore import protocol, wire
from fedcore.errors import WorkerFailed
from fedcore.model import initial_weights
from fedcore.protocol import TrainRequest
from fedcore.session import WorkerSession
from fedcore.shards import ShardSpec
from fedcore.training import TrainPlan
from fedcore.transport.base import WorkerLaunch
from fedcore.transport.local import LocalTransport
from fedcore.worker import Worker


def test_worker_loads_only_its_digits(mnist_dir: Path) -> None:
    w = Worker("alice", str(mnist_dir), ShardSpec.by_labels([0, 1, 2, 3]), "cpu")
    assert w.counts == ALICE_COUNTS
    assert set(w.labels.unique().tolist()) == {0, 1, 2, 3}
    assert w.images.shape == (24754, 1, 28, 28)
    # normalised with the seed's (0.1307, 0.3081): background pixels map to -0.4242
    assert abs(w.images.min().item() - (-0.1307 / 0.3081)) < 1e-5


def test_iid_parts_partition_the_split(mnist_dir: Path) -> None:
    sizes = [
        Worker(f"p{i}", str(mnist_dir), ShardSpec.iid(i, 3, seed=5), "cpu").labels.numel()
        for i in range(3)
    ]
    assert sizes == [20000, 20000, 20000]


@pytest.fixture
def bob(mnist_dir: Path):
    s = WorkerSession(
        WorkerLaunch("bob", str(mnist_dir), ShardSpec.by_labels([4, 5, 6]), threads=1),
        LocalTransport(),
    )
    s.start()
    yield s
    s.close()


def test_subprocess_worker_hello_train_evaluate(bob: WorkerSession) -> None:
    hello = bob.hello(timeout=120)
    assert hello.worker == "bob" and hello.label_counts == BOB_COUNTS
    assert hello.num_examples == 17181 and hello.threads == 1 and hello.device == "cpu"
    w0 = initial_weights(1)
    req = TrainRequest(1, TrainPlan(steps=3, batch_size=16, lr=0.1), 123, w0)
    u1 = bob.train(req, timeout=60)
    assert u1.metrics.samples == 48 and u1.metrics.steps == 3 and u1.num_examples == 17181
    assert not torch.equal(u1.weights["fc2.bias"], w0["fc2.bias"])
    u2 = bob.train(req, timeout=60)  # same request, same seed: identical update
    assert all(torch.equal(u1.weights[k], u2.weights[k]) for k in w0)
    assert u1.wire_bytes > 2 * 431080 * 4  # weights went both ways
    res = bob.evaluate(1, {"federated": u1.weights}, [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]], 60)
    r = res["federated"]
    assert r.total == 17181 and abs(sum(r.group_shares) - 1.0) < 1e-9
    assert sum(map(sum, r.confusion)) == 17181


def test_missing_data_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    s = WorkerSession(
        WorkerLaunch("alice", str(missing), ShardSpec.by_labels([0])), LocalTransport()
    )
    s.start()
    with pytest.raises(WorkerFailed) as err:
        s.hello(timeout=60)
    s.close()
    assert "alice" in str(err.value) and str(missing) in str(err.value)
    assert "fedmnist data" in str(err.value)


def test_garbage_on_stdin_is_rejected_cleanly(mnist_dir: Path) -> None:
    launch = WorkerLaunch("charlie", str(mnist_dir), ShardSpec.by_labels([9]), threads=1)
    proc = subprocess.run(
        [sys.executable, *launch.argv()],
        input=b"\x00garbage that is not a frame" * 3,
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    meta, _ = wire.decode_frame(proc.stdout)
    assert meta["type"] == "error" and "magic" in meta["message"]
    assert b"rejected a bad frame" in proc.stderr


def test_a_hostile_coordinator_gets_error_frames_not_a_crash(mnist_dir: Path) -> None:
    """A crafted tensor header is answered with an error and the worker serves on (the frame
    was read whole); metadata nested 100,000 deep is answered once, then the worker stops (the
    payload after it was not read: the stream is out of step)."""
    launch = WorkerLaunch("charlie", str(mnist_dir), ShardSpec.by_labels([9]), threads=1)
    meta = {"type": "train", "round": 1, "plan": TrainPlan().to_dict(), "sample_seed": 1}
    text = b'{"global/x":{"dtype":"F32","shape":[' + b"1," * 80_000 + b"1]}}"
    header = struct.pack("<Q", len(text)) + text
    nested = b"[" * 100_000 + b"]" * 100_000
    frames = [
        wire.encode_frame(meta, header),
        protocol.encode_hello_request(),
        wire.PREFIX.pack(wire.MAGIC, len(nested), 0) + nested,
        protocol.encode_hello_request(),  # never read
    ]
    proc = subprocess.run(
        [sys.executable, *launch.argv()],
        input=b"".join(frames),
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    read = wire.stream_reader(io.BytesIO(proc.stdout))
    replies = [wire.read_frame(read)[0] for _ in range(3)]
    assert [r["type"] for r in replies] == ["error", "hello", "error"]
    assert replies[0]["error"] == "WireError"
    assert replies[0]["message"].startswith(
        f"tensor header announces {len(text)} bytes, limit 65536"
    )
    assert "nest deeper than 16 levels" in replies[2]["message"]
    with pytest.raises(EOFError):
        wire.read_frame(read)


def test_evaluate_rejects_wrong_shapes(bob: WorkerSession) -> None:
    bad = initial_weights(1)
    bad["fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(WorkerFailed, match="fc1.weight.*shape"):
        bob.evaluate(1, {"federated": bad}, [], 60)
    # the worker survives a bad request and still answers
    assert bob.hello(timeout=30).worker == "bob"


def test_protocol_errors_name_the_message() -> None:
    with pytest.raises(protocol.RemoteError, match="ShardError: gone"):
        protocol.expect({"type": "error", "error": "ShardError", "message": "gone"}, "hello")


def test_diverged_training_is_an_error_reply_not_a_crash(bob: WorkerSession) -> None:
    req = TrainRequest(1, TrainPlan(steps=2, batch_size=8, lr=1e30), 1, initial_weights(1))
    with pytest.raises(WorkerFailed, match="bob.*train failed"):
        bob.train(req, timeout=60)
    assert bob.hello(timeout=30).worker == "bob"  # still serving
