"""The coordinator's malloc arenas are capped (flows/allocator.py): threads that allocate at the
same time share two arenas instead of getting one each. Counted from glibc's own report. And
the free memory left in holes between live blocks goes back to the system when asked (what
every round's end does): read from the process's resident memory."""

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


HOLES = """
import ctypes, sys
from flows.allocator import release_free_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 64 KiB blocks from the heap, as a round's are
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
blocks = [libc.malloc(64 * 1024) for _ in range(3200)]  # 200 MiB, touched
for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
for i, b in enumerate(blocks):
    if i % 16:
        libc.free(b)  # 15 of every 16 freed: holes between live blocks, none at the top
before = rss_mb()
released = release_free_memory()
print(before, rss_mb(), released)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_free_memory_in_holes_goes_back_to_the_system() -> None:
    out = subprocess.run(
        [sys.executable, "-c", HOLES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MALLOC_TOP_PAD_": "0"},
    )
    before, after, released = out.stdout.split()
    assert released == "True"
    assert float(before) - float(after) > 150  # of the ~187 MiB freed in holes
