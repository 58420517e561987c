"""Schedules: when the coordinator makes a new global model (sync, semi-sync, async).

`config` is the experiment's `schedule:` section, `staleness` the named weights of a late
update, `fleet` the coordinator's bookkeeping of who trains what from which version (pure: the
flow drives it with arrivals and asks it when to step).
"""

from .config import ScheduleConfig
from .staleness import StalenessConfig

__all__ = ["ScheduleConfig", "StalenessConfig"]
