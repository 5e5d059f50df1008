"""Resident memory of the exporter process (Linux): what each step's progress line and each command's last line print."""

from __future__ import annotations

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


def summary() -> str:
    return f"resident {current_mb():.0f} MiB, peak {peak_mb():.0f} MiB"
