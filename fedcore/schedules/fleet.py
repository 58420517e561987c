"""The coordinator's bookkeeping of a semi-synchronous or asynchronous fleet (pure, no Prefect).

The global model has a version t: the number of server steps made so far (version 0 is the
initial model). A device is given a *job*: train from the current version. When it returns, its
update is `tau = t - base` versions stale; an update more than `max_staleness` versions stale is
dropped (and counted as such), any other joins the buffer with the weight s(tau) of the
schedule's staleness function. A server step takes the whole buffer and makes version t + 1.

The buffered step reuses the strategies unchanged, as FedBuff does (Nguyen et al. 2022, "Federated
Learning with Buffered Asynchronous Aggregation", AISTATS, Algorithm 1): each buffered update
becomes the model it would be had its device trained from the current global model g_t,

    w'_i = g_t + s(tau_i) (w_i - g_{base_i})

(a fresh update, tau = 0, is used as it is, so no float rounding happens then), and the strategy
aggregates the w'_i against g_t exactly as it aggregates a synchronous round: the mean gives
g_t + mean_i s(tau_i) Delta_i, FedBuff's step with server lr 1; fedavgm and fedadam step their
server optimizer on that mean pseudo-gradient; the median and the trimmed mean take the
coordinate-wise median of the weighted deltas. Screening measures ||w'_i - g_t||.

Every device's n-th job trains with the sampling seed derive_seed(seed, device, n), so a job is
reproducible from (device, n, base version) alone. The state written with every version (see
`state_dict`) holds the jobs in flight, so a resumed training gives each device the same job
again: with the same arrival order, it ends with the same weights. The buffer is always empty
when a version is written (a step empties it), so it needs no file of its own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..protocol import Update
from ..training import TrainMetrics
from .config import ScheduleConfig

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Job:
    """A training in flight: device `worker`'s `number`-th job, from global version `base`;
    under `clock: paced`, `due` is when it completes on the fleet's paced clock."""

    worker: str
    number: int
    base: int
    due: float = 0.0


@dataclass(frozen=True)
class Arrival:
    """A returned update in the buffer, with its staleness and weight."""

    job: Job
    update: Update
    staleness: int
    weight: float


@dataclass
class DeviceStats:
    """What one device did: jobs given, updates that made it into a step, how stale they were,
    updates dropped for staleness, jobs that failed, and seconds spent idle between jobs."""

    jobs: int = 0
    updates: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    dropped_stale: int = 0
    failed: int = 0
    idle_seconds: float = 0.0

    @property
    def staleness_mean(self) -> float:
        return self.staleness_sum / self.updates if self.updates else 0.0


@dataclass
class Fleet:
    """Who trains what from which version, the buffer, and every device's record."""

    schedule: ScheduleConfig
    trainers: Sequence[str]
    clock: Callable[[], float] = time.monotonic
    version: int = 0
    now: float = 0.0  # the paced clock: when the last job taken was due (clock: paced)
    applied: int = 0  # updates that made it into a step (the work done, in updates)
    jobs: dict[str, Job] = field(default_factory=dict)  # in flight, by device
    buffer: list[Arrival] = field(default_factory=list)
    latest: dict[str, Arrival] = field(default_factory=dict)  # memory: each device's last update
    stats: dict[str, DeviceStats] = field(default_factory=dict)
    models: dict[int, Weights] = field(default_factory=dict)  # the versions jobs train from
    _idle_since: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        now = self.clock()
        for name in self.trainers:
            self.stats.setdefault(name, DeviceStats())
            self._idle_since.setdefault(name, now)

    # -- jobs -------------------------------------------------------------------------------

    def idle(self) -> list[str]:
        """The devices without a job, in inventory order."""
        return [w for w in self.trainers if w not in self.jobs]

    def dispatch(self, worker: str, weights: Weights, duration: float = 0.0) -> Job:
        """Give `worker` a new job from the current version (`weights`), due `duration` paced
        seconds from now; returns it."""
        number = self.stats[worker].jobs + 1
        return self._start(worker, number, self.version, weights, self.now + duration)

    def redispatch(self, job: Job, weights: Weights) -> Job:
        """Give `job` (from a resumed state: same device, number, base and due time) again;
        `weights` is its base version's model."""
        return self._start(job.worker, job.number, job.base, weights, job.due)

    def next_due(self) -> Job | None:
        """The job in flight due first on the paced clock (ties: inventory order)."""
        order = {w: i for i, w in enumerate(self.trainers)}
        return min(self.jobs.values(), key=lambda j: (j.due, order[j.worker]), default=None)

    def _start(self, worker: str, number: int, base: int, weights: Weights, due: float) -> Job:
        if worker in self.jobs:
            raise ValueError(f"{worker} is already training job {self.jobs[worker].number}")
        stats = self.stats[worker]
        stats.jobs = max(stats.jobs, number)
        since = self._idle_since.pop(worker, None)
        if since is not None:
            stats.idle_seconds += max(0.0, self.clock() - since)
        self.models.setdefault(base, weights)
        job = Job(worker, number, base, due)
        self.jobs[worker] = job
        return job

    def returned(self, worker: str, failed: bool = False) -> Job:
        """`worker`'s job is over (its update arrived, or it failed); the device is idle."""
        job = self.jobs.pop(worker)
        self.now = max(self.now, job.due)
        self._idle_since[worker] = self.clock()
        if failed:
            self.stats[worker].failed += 1
        self._forget_unused_models()
        return job

    # -- the buffer and the step -------------------------------------------------------------

    def staleness(self, job: Job) -> int:
        return self.version - job.base

    def admit(self, job: Job, update: Update) -> Arrival | None:
        """Buffer `update` (the result of `job`) with its staleness weight; None when it is more
        than `max_staleness` versions stale (counted as dropped)."""
        tau = self.staleness(job)
        if tau > self.schedule.max_staleness:
            self.stats[job.worker].dropped_stale += 1
            return None
        arrival = Arrival(job, update, tau, self.schedule.staleness.weight(tau))
        self.buffer.append(arrival)
        if self.schedule.memory:
            self.latest[job.worker] = arrival
        return arrival

    def base_model(self, job: Job) -> Weights:
        """The global model `job` trained from (kept while a job or a buffered update needs it)."""
        return self.models[job.base]

    def step_arrivals(self) -> list[Arrival]:
        """What the next step combines: the buffer; with `memory`, every device's latest update
        instead (each weighed by its staleness now; one older than `max_staleness` forgotten)."""
        if not self.schedule.memory:
            return list(self.buffer)
        out = []
        for name in self.trainers:
            a = self.latest.get(name)
            if a is None:
                continue
            tau = self.version - a.job.base
            if tau > self.schedule.max_staleness:
                del self.latest[name]
                continue
            out.append(Arrival(a.job, a.update, tau, self.schedule.staleness.weight(tau)))
        return out

    def weighted_updates(
        self, current: Mapping[str, torch.Tensor], arrivals: Sequence[Arrival]
    ) -> list[Update]:
        """`arrivals` as updates from the current model: g_t + s(tau) (w - g_base) each (a
        fresh update as it is)."""
        out = []
        for a in arrivals:
            if a.staleness == 0:
                out.append(a.update)
                continue
            base = self.models[a.job.base]
            moved = {}
            for k, w in a.update.weights.items():
                if w.is_floating_point():
                    g = current[k].to(torch.float64)
                    delta = w.to(torch.float64) - base[k].to(torch.float64)
                    moved[k] = (g + a.weight * delta).to(w.dtype)
                else:
                    moved[k] = current[k].clone()
            out.append(dataclasses.replace(a.update, weights=moved))
        return out

    def step(self, weights: Weights) -> list[Arrival]:
        """Empty the buffer into version t + 1 (`weights`, the strategy's result); returns the
        new arrivals the step took (with `memory` it also reused older ones: `step_arrivals`)."""
        taken, self.buffer = self.buffer, []
        for a in taken:
            stats = self.stats[a.job.worker]
            stats.updates += 1
            stats.staleness_sum += a.staleness
            stats.staleness_max = max(stats.staleness_max, a.staleness)
        self.applied += len(taken)
        self.version += 1
        self.models[self.version] = weights
        self._forget_unused_models()
        return taken

    def discard(self, arrivals: Sequence[Arrival]) -> None:
        """Take `arrivals` out of the buffer and the memory (screened out: they never count)."""
        drop = {a.job for a in arrivals}
        self.buffer = [a for a in self.buffer if a.job not in drop]
        for name in [w for w, a in self.latest.items() if a.job in drop]:
            del self.latest[name]
        self._forget_unused_models()

    def _forget_unused_models(self) -> None:
        needed = {j.base for j in self.jobs.values()} | {a.job.base for a in self.buffer}
        needed |= {a.job.base for a in self.latest.values()}
        needed.add(self.version)
        for v in [v for v in self.models if v not in needed]:
            del self.models[v]

    def ready(self) -> bool:
        """async: the buffer holds `buffer_size` updates; semi-sync: `min_updates`."""
        s = self.schedule
        need = s.buffer_size if s.mode == "async" else s.min_updates
        return len(self.buffer) >= need

    def plan_round(self) -> int:
        """The round whose learning rate a new job uses: 1 + the updates applied so far over the
        number of trainers, so the rate decays per unit of work as in a synchronous run, however
        many versions the buffer size makes of it."""
        return 1 + self.applied // max(1, len(self.trainers))

    # -- the record and resume ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON: the version, the work applied, the jobs in flight, every device's record."""
        if self.buffer:
            raise ValueError("the fleet's state is written after a step, with an empty buffer")
        return {
            "version": self.version,
            "now": self.now,
            "applied": self.applied,
            "jobs": [dataclasses.asdict(j) for j in self.jobs.values()],
            "devices": {w: dataclasses.asdict(s) for w, s in self.stats.items()},
            "memory": {
                w: {
                    "job": dataclasses.asdict(a.job),
                    "num_examples": a.update.num_examples,
                    "metrics": dataclasses.asdict(a.update.metrics),
                }
                for w, a in self.latest.items()
            },
        }

    def memory_tensors(self) -> dict[str, torch.Tensor]:
        """The memory's models, `<device>/<tensor>`: written beside `state_dict`'s JSON."""
        return {f"{w}/{k}": t for w, a in self.latest.items() for k, t in a.update.weights.items()}

    def load_state_dict(
        self,
        state: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor] | None = None,
        models: Callable[[int], Weights] | None = None,
    ) -> list[Job]:
        """Restore a written state (with the memory's `tensors`, and `models(version)` for the
        versions its updates trained from); returns its jobs in flight, to be given again
        (`redispatch`).

        Raises:
            ValueError: the state names a device that is not a trainer, or is malformed.
        """
        try:
            self.version = int(state["version"])
            self.applied = int(state["applied"])
            self.now = float(state.get("now", 0.0))
            jobs = [
                Job(str(j["worker"]), int(j["number"]), int(j["base"]), float(j.get("due", 0)))
                for j in state["jobs"]
            ]
            devices = {str(w): DeviceStats(**s) for w, s in state["devices"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the schedule state is malformed: {exc}") from None
        unknown = sorted(({j.worker for j in jobs} | set(devices)) - set(self.trainers))
        if unknown:
            raise ValueError(f"the schedule state names devices that are not trainers: {unknown}")
        self.stats.update(devices)
        self.jobs.clear()
        self.buffer.clear()
        self.latest.clear()
        for name, entry in dict(state.get("memory") or {}).items():
            self._restore_latest(name, entry, tensors or {}, models)
        return jobs

    def _restore_latest(
        self,
        name: str,
        entry: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        models: Callable[[int], Weights] | None,
    ) -> None:
        if name not in self.trainers or models is None:
            raise ValueError(f"the schedule state's memory names {name!r}, not a trainer")
        try:
            job = Job(**entry["job"])
            metrics = TrainMetrics(**entry["metrics"])
            num_examples = int(entry["num_examples"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the schedule state's memory of {name} is malformed: {exc}") from None
        prefix = f"{name}/"
        weights = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
        if not weights:
            raise ValueError(f"the schedule state's memory of {name} has no tensors")
        self.models.setdefault(job.base, models(job.base))
        update = Update(name, job.number, weights, num_examples, metrics)
        self.latest[name] = Arrival(job, update, self.version - job.base, 1.0)
