"""The CPU cores a process may use (without importing torch)."""

from __future__ import annotations

import os


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a SLURM allocation), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
