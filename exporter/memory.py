"""Resident memory of the exporter process (Linux): what each step's progress line and each command's last line print."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource


def current_mb() -> float:
    """Resident set size now, MiB (0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def peak_mb() -> float:
    """Largest resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release() -> None:
    """Hand the heap's freed memory back to the system (glibc ``malloc_trim``; nothing elsewhere). After a pass that
    freed large blocks glibc keeps them resident (its mmap threshold rises), and the next step's peak adds to them."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def summary() -> str:
    return f"resident {current_mb():.0f} MiB, peak {peak_mb():.0f} MiB"
