"""What this x86 CPU can run, from /proc/cpuinfo: the attention kernels' variants (tests force each with
MOBIQ_ATTENTION_KERNEL; the library refuses one the CPU lacks)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

def x86_flags() -> set[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    return set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[1].split())


def attention_kernels() -> list[str]:
    """The attention variants this CPU runs, slowest first (the last is the one the library picks)."""
    flags, ran = x86_flags(), ["attention__portable"]
    if {"avx2", "fma", "f16c"} <= flags:
        ran.append("attention__avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            ran.append("attention__avx512")
            if {"avx512_vnni", "avx512vbmi"} <= flags:
                ran.append("attention__avx512vnni")
    return ran


# The variants that score 8- and 4-bit keys against int8-coded queries (mobiq/attention.h, integer_dot).
INT8_QUERY_KERNELS = {"attention__avx512vnni"}
