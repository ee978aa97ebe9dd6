"""The CPU cores a process may use, and how it keeps freed memory (without importing torch)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a SLURM allocation), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def thread_count(value: int | str) -> int:
    """A config's thread count: `auto` is every core this process may use, an integer itself."""
    return cpu_cores() if value == "auto" else int(value)


def keep_freed_memory(threshold: int = 256 << 20) -> bool:
    """Ask glibc to serve allocations below `threshold` bytes from its heaps and not to hand freed
    memory back to the kernel at once. The loader and the harvest writer allocate and free batches and
    chunks of 10-40 MB many times a second; by default each is a fresh mapping whose every page the
    kernel faults in and zeroes again (measured: about a tenth of the compressed loader's time on 2
    cores). Returns whether it applied (False off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 4 * threshold))
    except (OSError, AttributeError):
        return False
