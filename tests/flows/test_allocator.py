"""The coordinator's malloc arenas are capped (flows/allocator.py): threads that allocate at the
same time share two arenas instead of getting one each. Counted from glibc's own report."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from conftest import ROOT

PROGRAM = """
import ctypes, sys, threading
if sys.argv[1] == "capped":
    from flows.allocator import limit_arenas
    assert limit_arenas()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
start = threading.Barrier(16)
def work():
    start.wait()
    for _ in range(200):
        blocks = [libc.malloc(64 * 1024) for _ in range(8)]  # below the mmap threshold
        for b in blocks:
            libc.free(b)
threads = [threading.Thread(target=work) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()  # to stderr: one "Arena N:" block per arena
"""


def arenas(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    return sum(1 for line in out.stderr.splitlines() if line.startswith("Arena "))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_threads_share_two_arenas_once_capped() -> None:
    assert arenas("capped") <= 2
    assert arenas("free") > 2  # what the cap prevents: an arena per contending thread
