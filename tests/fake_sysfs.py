"""Fake sysfs trees under a root folder, as runtime/signals.py reads them (tests/test_budget.py, tests/test_pi.py)."""

from __future__ import annotations

from pathlib import Path

THROTTLE_NODE = "sys/devices/platform/soc/soc:firmware/get_throttled"


def put(root: Path, rel: str, text: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def battery(root: Path, capacity: str, status: str, name: str = "BAT0", scope: str | None = None) -> None:
    put(root, f"sys/class/power_supply/{name}/type", "Battery\n")
    put(root, f"sys/class/power_supply/{name}/capacity", capacity + "\n")
    put(root, f"sys/class/power_supply/{name}/status", status + "\n")
    if scope:
        put(root, f"sys/class/power_supply/{name}/scope", scope + "\n")


def adapter(root: Path, online: str, name: str = "AC", kind: str = "Mains") -> None:
    put(root, f"sys/class/power_supply/{name}/type", kind + "\n")
    put(root, f"sys/class/power_supply/{name}/online", online + "\n")


def zone(root: Path, index: int, kind: str, millideg: str) -> None:
    put(root, f"sys/class/thermal/thermal_zone{index}/type", kind + "\n")
    put(root, f"sys/class/thermal/thermal_zone{index}/temp", millideg + "\n")


def meminfo(root: Path, available_mb: float, total_mb: float = 8192) -> None:
    put(root, "proc/meminfo", f"MemTotal:       {round(total_mb * 1024)} kB\nMemFree:          123456 kB\n"
                              f"MemAvailable:   {round(available_mb * 1024)} kB\nBuffers:           2048 kB\n")


def laptop(root: Path, capacity: str, status: str, online: str) -> Path:
    battery(root, capacity, status)
    adapter(root, online)
    zone(root, 0, "acpitz", "40000")
    zone(root, 1, "x86_pkg_temp", "45000")
    put(root, "proc/loadavg", "0.52 0.40 0.31 1/123 4567\n")
    return root


def pi5(root: Path, celsius: float, throttled: str = "0", available_mb: float | None = None) -> Path:
    """A Raspberry Pi 5: power_supply lists nothing (mains), one cpu-thermal zone; proc/meminfo when
    ``available_mb`` is given."""
    (root / "sys/class/power_supply").mkdir(parents=True)
    zone(root, 0, "cpu-thermal", str(round(celsius * 1000)))
    put(root, THROTTLE_NODE, throttled + "\n")
    if available_mb is not None:
        meminfo(root, available_mb)
    return root
