"""The coordinator's C allocator: a few shared arenas, not one per thread, and what a round
freed given back to the system at its end.

glibc's malloc gives threads that allocate at the same time arenas of their own (up to 8 per
core) and keeps what is freed in each for reuse. The coordinator moves megabytes per worker per
round on many threads (a task or a reply reader per worker), so its freed round buffers piled up
in tens of arenas: at 30 local trainers the process grew by about 2 MB per worker-round while the
memory in use stayed at ~200 MB (benchmarks/results/fleet_scale.md, read with `mallinfo2`).
Two arenas hold the same work with the freed memory reused across threads; this is glibc's own
tunable (`M_ARENA_MAX`, the `MALLOC_ARENA_MAX` environment variable), set here for the process
unless the operator set that variable.

Within the two arenas the rounds still leave freed memory behind, in holes between live blocks
that glibc only hands back when they lie at an arena's top: at 10 local trainers the memory in
use stayed at ~207 MB from round 2 on while the free memory kept inside the arenas grew from 14
to 45 MB over 10 rounds, and the process's resident memory with it. `release_free_memory`
(glibc's `malloc_trim(0)`, which also gives back the whole free pages inside the holes) runs at
every round's end; it costs 1-4 ms. Elsewhere than glibc (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_ARENA_MAX = -8  # mallopt's parameter number (glibc malloc.h)
ARENAS = 2


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's glibc, looked up once (`find_library` runs `ldconfig`); None elsewhere."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process; returns whether it was set. Call it before
    the threads that allocate start."""
    libc = _glibc()
    if libc is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def release_free_memory() -> bool:
    """Give the free pages glibc's arenas hold back to the system (`malloc_trim(0)`); returns
    whether any were. Called at the end of every round (flows/round_record.py)."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
