"""Process-wide tuning, applied once by the CLI before any thread exists."""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_malloc_tuned: list[bool] = []


def keep_buffers() -> None:
    """Let glibc reuse the memory of freed zstd frames instead of returning it to the kernel
    and faulting fresh pages in for the next one: every frame's input and output is a new
    bytes object of a few MiB, and with glibc's defaults the page faults cost a tenth of an
    unpack's CPU. Blocks up to 32 MiB come from the heap, and up to 16 MiB of free heap is
    kept (a few MiB more peak RSS). One arena for all threads: with one per thread, the freed
    frames piled up in each and the peak grew with the data. The measurements behind each
    number are in docs/benchmarks.md ("malloc tuning"). Idempotent; nothing happens without
    glibc."""
    if _malloc_tuned:
        return
    _malloc_tuned.append(True)
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_ARENA_MAX, 1)
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 16 << 20)
