"""The round steps without Prefect or workers: the below-quorum retry policy, and the resume
guarantee (a round's state is on disk before anything records it, also when the writing is
done on the writer thread while the next round trains)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT

import flows.round_record as round_record
import flows.rounds as rounds
from fedcore.config import load_config
from fedcore.errors import QuorumNotReached
from fedcore.model import initial_weights
from fedcore.protocol import Update
from fedcore.strategies import Failure, build_strategy
from fedcore.training import TrainMetrics


@pytest.fixture(autouse=True)
def plain_logger(monkeypatch) -> None:
    for module in (rounds, round_record):
        monkeypatch.setattr(module, "get_run_logger", lambda: logging.getLogger("test.rounds"))


def _ctx(tmp_path: Path, tracker: Any = None, artifacts: Any = None, **overrides: Any):
    cfg = load_config(ROOT / "configs" / "smoke.yaml", overrides)
    return rounds.RunContext(
        cfg=cfg,
        sessions={},
        strategy=build_strategy(cfg.strategy),
        tracker=tracker,
        run_dir=tmp_path,
        artifacts=artifacts,
        groups=cfg.digit_groups(),
    )


def _below_quorum_then(monkeypatch, shortfalls: int) -> list[int]:
    calls: list[int] = []

    def train_once(ctx, rnd, plan, weights):
        calls.append(rnd)
        if len(calls) <= shortfalls:
            raise QuorumNotReached(f"round {rnd}: 0 of 3 workers returned an update")
        return ["update"], []

    monkeypatch.setattr(rounds, "train_once", train_once)
    return calls


@pytest.mark.parametrize(("shortfalls", "tries"), [(0, 1), (1, 2), (2, 3)])
def test_retry_trains_the_round_again_up_to_round_retries(
    tmp_path: Path, monkeypatch, caplog, shortfalls: int, tries: int
) -> None:
    calls = _below_quorum_then(monkeypatch, shortfalls)
    ctx = _ctx(tmp_path, below_quorum="retry", round_retries=2)
    with caplog.at_level(logging.WARNING, "test.rounds"):
        assert rounds.train_round(ctx, 3, ctx.cfg.train.plan(3), {}) == (["update"], [])
    assert calls == [3] * tries
    assert [r.getMessage() for r in caplog.records] == [
        f"round 3: 0 of 3 workers returned an update; trying round 3 again ({i} of 2)"
        for i in range(1, tries)
    ]


def test_retry_gives_up_after_round_retries(tmp_path: Path, monkeypatch) -> None:
    calls = _below_quorum_then(monkeypatch, 99)
    ctx = _ctx(tmp_path, below_quorum="retry", round_retries=2)
    with pytest.raises(QuorumNotReached, match="round 1: 0 of 3"):
        rounds.train_round(ctx, 1, ctx.cfg.train.plan(1), {})
    assert len(calls) == 3


def test_fail_never_trains_the_round_again(tmp_path: Path, monkeypatch) -> None:
    calls = _below_quorum_then(monkeypatch, 1)
    ctx = _ctx(tmp_path, below_quorum="fail", round_retries=2)
    with pytest.raises(QuorumNotReached):
        rounds.train_round(ctx, 1, ctx.cfg.train.plan(1), {})
    assert calls == [1]


class Recorder:
    """Tracker and artifacts in one: notes, at every call, the round state.json names."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.calls: list[tuple[str, int | None]] = []

    def _on_disk(self) -> int | None:
        state = self.run_dir / "state.json"
        return json.loads(state.read_text())["round"] if state.exists() else None

    def run_id_or_none(self) -> str:
        return "run-1"

    def __getattr__(self, name: str):
        def call(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, self._on_disk()))

        return call


def test_a_round_is_on_disk_before_it_is_recorded(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    ctx = _ctx(tmp_path, tracker=rec, artifacts=rec)
    weights = initial_weights(1)
    update = Update("alice", 2, weights, 64, TrainMetrics(1.5, 64, 2, 0.1))
    result = rounds.RoundResult(
        2,
        ctx.cfg.train.plan(2),
        [update],
        [Failure("bob", 2, "timeout", "late")],
        weights,
        None,
        0.5,
    )
    rounds.record_round(ctx, result)
    ctx.writer.flush()  # the round is written, then recorded, on the run's writer thread
    assert rec.calls == [("log_artifact", 2), ("log_metrics", 2), ("round_done", 2)]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["mlflow_run_id"] == "run-1"
    assert state["metrics"]["failed/bob"] == 1 and state["metrics"]["round_seconds"] == 0.5


def test_recorded_state_is_a_copy_taken_when_the_round_ended(tmp_path: Path) -> None:
    """The next round changes the weights in place while the writer may still be busy: the
    file holds the round's own values, and its timeline line names the round's phases."""
    from fedcore.checkpoint import load_weights
    from fedcore.timeline import read

    rec = Recorder(tmp_path)
    ctx = _ctx(tmp_path, tracker=rec, artifacts=rec)
    weights = initial_weights(1)
    update = Update("alice", 1, weights, 64, TrainMetrics(1.5, 64, 2, 0.1))
    phases = {"train": 0.3, "compute": 0.2, "aggregate": 0.01, "evaluate": 0.0}
    result = rounds.RoundResult(1, ctx.cfg.train.plan(1), [update], [], weights, None, 0.5, phases)
    before = {k: t.clone() for k, t in weights.items()}
    rounds.record_round(ctx, result)
    for t in weights.values():
        t.add_(1.0)
    ctx.writer.flush()
    written, _ = load_weights(tmp_path / "global-r001.safetensors")
    assert all(torch.equal(written[k], before[k]) for k in before)
    (line,) = read(tmp_path)
    assert line["round"] == 1 and line["updates"] == ["alice"]
    assert {k: line["phases"][k] for k in phases} == phases and line["phases"]["write"] >= 0


def test_a_round_that_cannot_be_written_is_never_recorded_and_stops_the_next(
    tmp_path: Path,
) -> None:
    from fedcore.resume import RoundWriter

    writer = RoundWriter()
    recorded: list[object] = []

    def fail() -> None:
        raise OSError("disk full")

    writer.submit(lambda: 1, recorded.append)
    writer.submit(fail, recorded.append)
    writer.submit(lambda: 3, recorded.append)  # after a failed round nothing more is written
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    assert recorded == [1]
    writer.close()
