"""What every transport provides: open a byte pipe to a started worker program."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from ..shards import ShardSpec


@dataclass(frozen=True)
class WorkerLaunch:
    """How to start one worker program: its name, where its data is, which shard, how."""

    name: str
    data_dir: str
    shard: ShardSpec
    threads: int = 0
    device: str = "auto"

    def argv(self) -> list[str]:
        """Arguments after the interpreter: `-m fedcore.worker ...`."""
        return [
            "-m",
            "fedcore.worker",
            "--name",
            self.name,
            "--data-dir",
            self.data_dir,
            "--shard",
            self.shard.to_json(),
            "--threads",
            str(self.threads),
            "--device",
            self.device,
        ]


class Pipe(abc.ABC):
    """A bidirectional byte stream to one running worker program."""

    description: str = "worker"

    @abc.abstractmethod
    def send(self, data: bytes) -> None:
        """Write all of `data`; raises ConnectionError when the worker is gone."""

    @abc.abstractmethod
    def read_exact(self, n: int, timeout: float | None) -> bytes:
        """Read exactly n bytes within `timeout` seconds.

        Raises EOFError when the stream ends before any byte, ConnectionError when it ends in
        the middle, TimeoutError when the time runs out.
        """

    @abc.abstractmethod
    def alive(self) -> bool:
        """Whether the worker program still runs."""

    @abc.abstractmethod
    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker program (politely first) and release the stream."""


class Transport(abc.ABC):
    """Starts worker programs and hands back pipes to them."""

    @abc.abstractmethod
    def open(self, launch: WorkerLaunch) -> Pipe:
        """Start the worker program described by `launch`; returns at once (no hello yet)."""
