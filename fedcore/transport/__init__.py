"""Transports: ways to get a byte stream to a worker program.

`local` spawns it as a subprocess on this machine (the embedded default); `ssh` starts it on a
device over an SSH channel. Same worker, same protocol, two pipes.
"""

from .base import Pipe, Transport, WorkerLaunch

__all__ = ["Pipe", "Transport", "WorkerLaunch"]
