"""What a hostile worker's stderr costs the coordinator, now that it is bounded.

Before issue 12, 32 MiB of stderr without a newline took 13 s and became one 32 MiB log line.
Measures:

- the forwarder alone (`fedcore.transport.stderr.StderrForwarder`, logging to a null handler):
  32 MiB without a newline, and 200,000 short lines, fed in 64 KiB chunks as the pumps read them;
- the real path: starting a local worker and getting its hello, plain and behind a `python`
  wrapper that first writes 32 MiB without a newline to stderr (median of `--starts`).

Usage: python benchmarks/transport_bounds.py [--starts 3] [--data-dir .fedmnist/data/mnist]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcore.session import WorkerSession  # noqa: E402
from fedcore.shards import ShardSpec  # noqa: E402
from fedcore.transport.base import WorkerLaunch  # noqa: E402
from fedcore.transport.local import LocalTransport  # noqa: E402
from fedcore.transport.stderr import StderrForwarder  # noqa: E402


def feed_seconds(data: bytes) -> tuple[float, StderrForwarder]:
    log = logging.getLogger("bench.stderr")
    log.propagate = False
    log.addHandler(logging.NullHandler())
    fwd = StderrForwarder(log)
    start = time.perf_counter()
    for i in range(0, len(data), 65536):
        fwd.feed(data[i : i + 65536])
    fwd.close()
    return time.perf_counter() - start, fwd


def hello_seconds(python: str | None, data_dir: str) -> float:
    launch = WorkerLaunch("alice", data_dir, ShardSpec.by_labels(range(4)), threads=1)
    start = time.perf_counter()
    session = WorkerSession(launch, LocalTransport(python))
    try:
        session.hello(timeout=300)
    finally:
        session.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--data-dir", default=str(ROOT / ".fedmnist" / "data" / "mnist"))
    args = parser.parse_args()
    logging.getLogger("fedcore.worker").setLevel(logging.WARNING)

    secs, fwd = feed_seconds(b"a" * (32 << 20))
    print(f"forwarder, 32 MiB without newline: {secs * 1000:.1f} ms, {fwd.bytes_cut} bytes cut")
    secs, fwd = feed_seconds(b"".join(b"%d\n" % i for i in range(200_000)))
    print(
        f"forwarder, 200,000 short lines: {secs * 1000:.1f} ms, {fwd.lines_forwarded} "
        f"forwarded, {fwd.lines_dropped} dropped"
    )
    with tempfile.TemporaryDirectory() as tmp:
        noisy = Path(tmp) / "noisy-python"
        flood = f"head -c {32 << 20} /dev/zero | tr '\\0' a >&2"
        noisy.write_text(f'#!/bin/sh\n{flood}\nexec {sys.executable} "$@"\n')
        noisy.chmod(0o755)
        for label, python in (("plain", None), ("32 MiB stderr first", str(noisy))):
            times = [hello_seconds(python, args.data_dir) for _ in range(args.starts)]
            print(f"local worker start to hello, {label}: {statistics.median(times):.2f} s median")


if __name__ == "__main__":
    main()
