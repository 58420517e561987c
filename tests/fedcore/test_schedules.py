"""Schedules by hand: the staleness weights, the buffer's weighted updates and the buffered server
step through real strategies, the fleet's record, and its state for resume."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from fedcore.config import load_config
from fedcore.errors import ConfigError
from fedcore.protocol import Update
from fedcore.schedules import ScheduleConfig, StalenessConfig
from fedcore.schedules.fleet import Fleet, Job
from fedcore.strategies import StrategyConfig
from fedcore.training import TrainMetrics


def _staleness(**spec: object) -> StalenessConfig:
    return StalenessConfig.model_validate(spec)


def test_staleness_weights_by_hand() -> None:
    constant = _staleness(name="constant")
    assert [constant.weight(t) for t in (0, 1, 50)] == [1.0, 1.0, 1.0]
    poly = _staleness(name="polynomial", a=0.5)
    assert poly.weight(0) == 1.0
    assert poly.weight(3) == pytest.approx(0.5)  # (1 + 3)^-0.5
    assert poly.weight(8) == pytest.approx(1 / 3)  # (1 + 8)^-0.5
    assert _staleness(name="polynomial", a=1).weight(4) == pytest.approx(0.2)
    hinge = _staleness(name="hinge", a=10, b=4)
    assert [hinge.weight(t) for t in (0, 4)] == [1.0, 1.0]
    assert hinge.weight(5) == pytest.approx(1 / 11)  # 1 / (10 (5 - 4) + 1)
    assert hinge.weight(6) == pytest.approx(1 / 21)
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        poly.weight(-1)
    for bad in (
        {"name": "exponential"},
        {"name": "polynomial", "a": 0},
        {"name": "hinge", "b": -1},
    ):
        with pytest.raises(ValidationError):
            StalenessConfig.model_validate(bad)


def _update(worker: str, value: float, n: int = 10) -> Update:
    return Update(worker, 1, {"w": torch.tensor([value])}, n, TrainMetrics(0.0, n, 1, 0.0))


def _fleet(mode: str = "async", **kw: object) -> tuple[Fleet, list[float]]:
    clock = [0.0]
    schedule = ScheduleConfig.model_validate({"mode": mode, **kw})
    return Fleet(schedule, ["alice", "bob", "charlie"], clock=lambda: clock[0]), clock


def test_buffered_step_weighs_stale_updates_by_hand() -> None:
    fleet, clock = _fleet(buffer_size=2, staleness={"name": "polynomial", "a": 1.0})
    g0 = {"w": torch.tensor([0.0])}
    jobs = {w: fleet.dispatch(w, g0) for w in ("alice", "bob", "charlie")}
    assert [j.number for j in jobs.values()] == [1, 1, 1] and fleet.idle() == []
    # alice and bob return from version 0: a fresh buffer of two -> version 1 = their mean
    clock[0] = 1.0
    for w, v in (("alice", 2.0), ("bob", 4.0)):
        fleet.admit(fleet.jobs[w], _update(w, v))
        fleet.returned(w)
    assert fleet.ready()
    mean = StrategyConfig.model_validate({"name": "mean"}).root.build()
    g1 = mean.aggregate(1, g0, fleet.weighted_updates(g0, fleet.step_arrivals()), [])
    assert g1["w"].item() == pytest.approx(3.0)
    fleet.step(g1)
    assert (fleet.version, fleet.applied) == (1, 2)
    # alice trains again from version 1 (6.0: delta +3); charlie's update from version 0 arrives
    # 1 version stale: weight (1 + 1)^-1 = 0.5 on its delta 10 - 0 -> g1 + 5 = 8
    clock[0] = 1.5
    fleet.dispatch("alice", g1)
    charlie = fleet.jobs["charlie"]
    arrival = fleet.admit(charlie, _update("charlie", 10.0))
    fleet.returned("charlie")
    assert arrival is not None and (arrival.staleness, arrival.weight) == (1, 0.5)
    fleet.admit(fleet.jobs["alice"], _update("alice", 6.0))
    fleet.returned("alice")
    moved = [u.weights["w"].item() for u in fleet.weighted_updates(g1, fleet.step_arrivals())]
    assert moved == pytest.approx([8.0, 6.0])
    g2 = mean.aggregate(2, g1, fleet.weighted_updates(g1, fleet.step_arrivals()), [])
    assert g2["w"].item() == pytest.approx(7.0)  # g1 + (0.5 x 10 + 1 x 3) / 2
    # the same buffer through server momentum 0.9 (fedavgm): the first step is the mean itself
    fedavgm = StrategyConfig.model_validate(
        {"name": "fedavgm", "weighting": "unweighted", "momentum": 0.9}
    ).root.build()
    assert fedavgm.aggregate(2, g1, fleet.weighted_updates(g1, fleet.step_arrivals()), [])[
        "w"
    ].item() == pytest.approx(7)
    # and through the median: median of 8 and 6 (two values: their mean)
    median = StrategyConfig.model_validate({"name": "median"}).root.build()
    assert (
        median.aggregate(2, g1, fleet.weighted_updates(g1, fleet.step_arrivals()), [])["w"].item()
        == 7.0
    )
    taken = fleet.step(g2)
    assert [a.job.worker for a in taken] == ["charlie", "alice"]
    stats = fleet.stats
    assert (stats["charlie"].updates, stats["charlie"].staleness_max) == (1, 1)
    assert stats["alice"].updates == 2 and stats["alice"].staleness_mean == 0.0
    assert stats["alice"].idle_seconds == pytest.approx(0.5)  # returned at 1.0, sent at 1.5
    assert fleet.plan_round() == 2  # 4 updates applied over 3 trainers: round 2's rate
    assert set(fleet.models) == {2}  # nothing in flight needs an older version


def test_too_stale_updates_are_dropped_and_counted() -> None:
    fleet, _ = _fleet(buffer_size=1, max_staleness=1)
    g = {"w": torch.tensor([0.0])}
    job = fleet.dispatch("charlie", g)
    for v in (1, 2):
        fleet.step({"w": torch.tensor([float(v)])})
    assert fleet.admit(job, _update("charlie", 5.0)) is None
    fleet.returned("charlie")
    assert fleet.stats["charlie"].dropped_stale == 1 and not fleet.buffer


def test_fresh_updates_are_used_as_they_are() -> None:
    fleet, _ = _fleet()
    g = {"w": torch.tensor([0.1], dtype=torch.float32)}
    fleet.dispatch("alice", g)
    update = _update("alice", 0.7)
    fleet.admit(fleet.jobs["alice"], update)
    assert (
        fleet.weighted_updates(g, fleet.step_arrivals())[0] is update
    )  # no arithmetic, no rounding


def test_state_round_trip_gives_the_jobs_in_flight_again() -> None:
    fleet, _ = _fleet()
    g = {"w": torch.tensor([0.0])}
    for w in ("alice", "bob"):
        fleet.dispatch(w, g)
    fleet.admit(fleet.jobs["alice"], _update("alice", 1.0))
    fleet.returned("alice")
    with pytest.raises(ValueError, match="empty buffer"):
        fleet.state_dict()
    fleet.step({"w": torch.tensor([1.0])})
    fleet.dispatch("alice", {"w": torch.tensor([1.0])})
    state = fleet.state_dict()
    again, _ = _fleet()
    jobs = again.load_state_dict(state)
    assert sorted(jobs, key=lambda j: j.worker) == [Job("alice", 2, 1), Job("bob", 1, 0)]
    assert (again.version, again.applied, again.stats["alice"].jobs) == (1, 1, 2)
    for job in jobs:
        again.redispatch(job, g)
    assert again.dispatch("charlie", g).number == 1
    with pytest.raises(ValueError, match="not trainers"):
        again.load_state_dict({**state, "jobs": [{"worker": "mallory", "number": 1, "base": 0}]})
    with pytest.raises(ValueError, match="malformed"):
        again.load_state_dict({"version": "x"})


def test_schedule_config_refuses_what_does_not_fit(tmp_path) -> None:
    cfg = load_config("configs/seed.yaml")
    assert cfg.schedule.mode == "sync"  # the seed keeps its barrier
    with pytest.raises(ConfigError, match="scaffold needs schedule.mode: sync"):
        load_config("configs/best.yaml", {"schedule.mode": "async"})
    with pytest.raises(ConfigError, match="min_updates 4 exceeds the 3 trainers"):
        load_config("configs/seed.yaml", {"schedule.mode": "semi-sync", "schedule.min_updates": 4})
    with pytest.raises(ConfigError, match="buffer_size"):
        load_config("configs/seed.yaml", {"schedule.buffer_size": 0})


def test_memory_steps_use_every_devices_latest_update_by_hand() -> None:
    fleet, _ = _fleet(buffer_size=1, memory=True, staleness={"name": "constant"})
    g0 = {"w": torch.tensor([0.0])}
    for w in ("alice", "charlie"):
        fleet.dispatch(w, g0)
    mean = StrategyConfig.model_validate({"name": "mean"}).root.build()

    def step(g: dict) -> dict:
        arrivals = fleet.step_arrivals()
        new = mean.aggregate(fleet.version + 1, g, fleet.weighted_updates(g, arrivals), [])
        fleet.step(new)
        return new

    fleet.admit(fleet.jobs["alice"], _update("alice", 2.0))
    fleet.returned("alice")
    g1 = step(g0)
    assert g1["w"].item() == 2.0  # only alice has an update yet
    fleet.admit(fleet.jobs["charlie"], _update("charlie", 10.0))
    fleet.returned("charlie")
    # alice's delta 2 (now 1 stale) counts again beside charlie's 10: g1 + (2 + 10) / 2
    assert [a.job.worker for a in fleet.step_arrivals()] == ["alice", "charlie"]
    g2 = step(g1)
    assert g2["w"].item() == pytest.approx(8.0)
    assert fleet.stats["alice"].updates == 1  # reused, not counted twice as new work
    state, tensors = fleet.state_dict(), fleet.memory_tensors()
    assert sorted(tensors) == ["alice/w", "charlie/w"] and set(state["memory"]) == {
        "alice",
        "charlie",
    }
    again, _ = _fleet(buffer_size=1, memory=True, staleness={"name": "constant"})
    again.load_state_dict(state, tensors, models=lambda v: {"w": torch.tensor([0.0])})
    again.version = 2
    moved = again.weighted_updates(g2, again.step_arrivals())
    assert [u.weights["w"].item() for u in moved] == pytest.approx([10.0, 18.0])
