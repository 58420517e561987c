"""The `schedule:` section of an experiment: when the coordinator makes a new global model.

    schedule:
      mode: sync          # sync | semi-sync | async
      min_updates: 2      # semi-sync: a round closes once this many updates arrived...
      grace: 2.0          # ...and then at most this many seconds more (or at timeouts.train)
      buffer_size: 2      # async: updates per server step (1 is FedAsync)
      staleness: {name: polynomial, a: 0.5}   # constant | polynomial (a) | hinge (a, b)
      max_staleness: 10   # an update trained more than this many versions ago is dropped
      clock: wall         # wall | paced: take arrivals in the order of each device's pace
      memory: false       # true: every step uses each device's latest update (MIFA)

- `sync` (the default, the seed's): every round waits for every trainer; nothing here applies.
- `semi-sync`: a round still has a number, but it closes early; a device still training when it
  closes keeps its connection and its work, and its update joins a later round weighed by its
  staleness.
- `async` (FedBuff, Nguyen et al. 2022): no rounds at all; every device is kept busy and every
  `buffer_size` arrivals make one server step. `rounds` then counts server steps (versions).

With `clock: paced` every trainer must have a `step_seconds` pace: a job is due `steps x
step_seconds x slowdown` seconds after the job before it, and the coordinator takes the jobs in
the order they are due (waiting for the real one when it is late), so the arrival order, and
with it every version, is the same in every run and after a resume: a reproducible fleet for
tests and experiments. `wall` (the default) takes them as they really come.

With `memory: true` every server step combines the latest update of EVERY device, not only the
buffered new ones (each re-weighed by its staleness at that step), as MIFA does (Gu, Huang,
Zhang, Zhang, 2021, "Fast Federated Learning in the Presence of Arbitrary Device
Unavailability", NeurIPS): on a label-skewed fleet a slow device's digits then count in every
step instead of only in the rare steps its update lands in. It costs one model per device in the
coordinator's memory (and in each version's state, for resume).

SCAFFOLD is refused with a non-sync schedule: its control-variate correction assumes every
update was trained from the current global model and the current server variate, which a stale
update was not (the config error says so and names `sync`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from .staleness import StalenessConfig


class ScheduleConfig(BaseModel):
    """When a new global model is made: `sync`, `semi-sync` or `async` (see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["sync", "semi-sync", "async"] = "sync"
    min_updates: PositiveInt = 1
    grace: Annotated[float, Field(ge=0)] = 2.0
    buffer_size: PositiveInt = 2
    staleness: StalenessConfig = StalenessConfig.model_validate({"name": "polynomial", "a": 0.5})
    max_staleness: Annotated[int, Field(ge=0)] = 10
    clock: Literal["wall", "paced"] = "wall"
    memory: bool = False

    @property
    def is_sync(self) -> bool:
        return self.mode == "sync"
