"""Device signals for ``--budget auto``: battery, temperatures, Raspberry Pi throttling, load.

Every reader takes a ``root`` (default ``/``) so that tests run on fake sysfs trees, and
never raises: a file that is missing, unreadable or holds garbage makes its signal
``None`` (unknown) and adds a human-readable line to ``notes``. What is read::

    battery     sys/class/power_supply/*/type == Battery (scope Device, e.g. a mouse, skipped)
                  capacity (percent, 0..100), status (Charging|Discharging|Full|Not charging)
    AC          sys/class/power_supply/*/type == Mains|USB → online (1|0)
    on_ac       False if a battery is Discharging, else True if an adapter is online,
                else False if every adapter is offline, else True if a battery is
                Charging|Full|Not charging, else unknown
    thermal     sys/class/thermal/thermal_zone*/temp (millidegrees C) and type;
                readings outside [-40, 150] °C are garbage
    cpu temp    max over CPU-like zones (type contains cpu, soc, pkg, core, tctl, tdie, k10temp),
                or over every zone when none looks like a CPU
    Pi flags    sys/devices/platform/soc*/soc*:firmware/get_throttled (the kernel prints
                hex without 0x: "50005"; a bit other than 0-3, 16-19 means garbage),
                else — only when root is / — `vcgencmd get_throttled`
                ("throttled=0x50005", 1 s timeout)
    load        proc/loadavg first field (0..1e6) / os.cpu_count()

When root is ``/`` and sysfs shows no battery, ``psutil.sensors_battery()`` is asked
too (psutil is optional). An application that knows better (a desktop app with a power
profile) passes its own :class:`SignalSource`: any callable returning a :class:`Snapshot`.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

ROOT = Path("/")

_MAX_READ = 4096  # sysfs attributes are one page at most
_BATTERY_STATUSES = ("Charging", "Discharging", "Full", "Not charging", "Unknown")
_PLUGGED_STATUSES = ("Charging", "Full", "Not charging")
_CELSIUS_RANGE = (-40.0, 150.0)
_MAX_LOAD = 1e6  # a larger load average is garbage
_CPU_ZONE_HINTS = ("cpu", "soc", "pkg", "core", "tctl", "tdie", "k10temp")
_FIRMWARE_GLOB = "sys/devices/platform/soc*/soc*:firmware"  # Pi 4: soc/soc:firmware

# get_throttled bit i (now) and bit 16 + i (has occurred since boot), i = 0..3; a word with
# any other bit set is garbage (e.g. decimal text read as hex).
_THROTTLE_MASK = 0xF000F
THROTTLE_FLAGS = ("under-voltage", "arm frequency capped", "throttled", "soft temperature limit")


@dataclass(frozen=True)
class Power:
    present: bool | None  # a system battery exists; None when power_supply is unreadable
    percent: float | None
    status: str | None
    on_ac: bool | None


@dataclass(frozen=True)
class Zone:
    name: str  # thermal_zone0
    type: str | None  # cpu-thermal, x86_pkg_temp, acpitz, ...
    celsius: float


@dataclass(frozen=True)
class Throttle:
    """The Raspberry Pi firmware's get_throttled word."""

    raw: int

    @property
    def now(self) -> tuple[str, ...]:
        return tuple(name for i, name in enumerate(THROTTLE_FLAGS) if self.raw >> i & 1)

    @property
    def since_boot(self) -> tuple[str, ...]:
        return tuple(name for i, name in enumerate(THROTTLE_FLAGS) if self.raw >> (16 + i) & 1)


@dataclass(frozen=True)
class Snapshot:
    """What the device said at one moment; every field None (or empty) when unknown.

    The policy reads battery_present, battery_percent, on_ac, cpu_celsius and throttle;
    zones, battery_status, load_per_cpu and notes are for display. A custom source sets
    what it knows, e.g. ``Snapshot(on_ac=True, cpu_celsius=61.0)``."""

    battery_present: bool | None = None
    battery_percent: float | None = None
    battery_status: str | None = None
    on_ac: bool | None = None
    zones: tuple[Zone, ...] = ()
    cpu_celsius: float | None = None
    throttle: Throttle | None = None
    load_per_cpu: float | None = None
    mem_available_mb: float | None = None  # MemAvailable of proc/meminfo (the KV cache policy reads it)
    notes: tuple[str, ...] = ()


class SignalSource(Protocol):
    def __call__(self) -> Snapshot: ...


@dataclass(frozen=True)
class SysfsSource:
    """The default source: :func:`read_snapshot` under ``root``."""

    root: Path = ROOT

    def __call__(self) -> Snapshot:
        return read_snapshot(self.root)


# --- low-level reads: text or None, never an exception -------------------------------------

def _read_text(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_READ).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _parse_number(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _show(text: str | None) -> str:
    return "unreadable" if text is None else f"garbage {text[:20]!r}"


# --- readers -------------------------------------------------------------------------------

def read_power(root: Path = ROOT, notes: list[str] | None = None) -> Power:
    notes = [] if notes is None else notes
    base = root / "sys/class/power_supply"
    try:
        supplies = sorted(base.iterdir())
    except OSError:
        supplies = None
        notes.append(f"power: {base} missing or unreadable")
    batteries, percents, statuses, adapters = 0, [], [], []
    for d in supplies or ():
        kind = _read_text(d / "type")
        if kind == "Battery" and _read_text(d / "scope") != "Device":
            batteries += 1
            text = _read_text(d / "capacity")
            value = _parse_number(text)
            if value is not None and 0 <= value <= 100:
                percents.append(value)
            else:
                notes.append(f"power: {d.name}/capacity {_show(text)}")
            status = _read_text(d / "status")
            if status in _BATTERY_STATUSES:
                statuses.append(status)
            else:
                notes.append(f"power: {d.name}/status {_show(status)}")
        elif kind in ("Mains", "USB"):
            online = _read_text(d / "online")
            if online in ("0", "1"):
                adapters.append(online == "1")
            else:
                notes.append(f"power: {d.name}/online {_show(online)}")
    present = None if supplies is None else batteries > 0
    percent = sum(percents) / len(percents) if percents else None
    status = "Discharging" if "Discharging" in statuses else next(iter(statuses), None)
    if status == "Discharging":
        on_ac = False
    elif adapters:
        on_ac = any(adapters)
    elif status in _PLUGGED_STATUSES:
        on_ac = True
    else:
        on_ac = None
    if not present and root == ROOT:
        present, percent, on_ac = _psutil_battery(present, percent, on_ac)
    if present is False and on_ac is None:
        notes.append("power: no battery and no AC adapter listed")
    return Power(present, percent, status, on_ac)


def _psutil_battery(present: bool | None, percent: float | None,
                    on_ac: bool | None) -> tuple[bool | None, float | None, bool | None]:
    try:
        import psutil

        battery = psutil.sensors_battery()
    except Exception:  # psutil missing, or its platform probe failed: keep what sysfs said
        return present, percent, on_ac
    if battery is None:
        return present, percent, on_ac
    plugged = battery.power_plugged
    return True, _parse_number(battery.percent), on_ac if plugged is None else bool(plugged)


def _zone_number(path: Path) -> int:
    digits = path.name.removeprefix("thermal_zone")
    return int(digits) if digits.isdigit() else 1 << 30


def read_thermal(root: Path = ROOT, notes: list[str] | None = None) -> tuple[Zone, ...]:
    notes = [] if notes is None else notes
    paths = sorted((root / "sys/class/thermal").glob("thermal_zone*"), key=_zone_number)
    if not paths:
        notes.append("thermal: no sys/class/thermal/thermal_zone*")
    zones = []
    for z in paths:
        text = _read_text(z / "temp")
        milli = _parse_number(text)
        if milli is None or not _CELSIUS_RANGE[0] <= milli / 1000 <= _CELSIUS_RANGE[1]:
            notes.append(f"thermal: {z.name}/temp {_show(text)}")
            continue
        zones.append(Zone(z.name, _read_text(z / "type") or None, milli / 1000))
    return tuple(zones)


def cpu_celsius(zones: tuple[Zone, ...]) -> float | None:
    cpu = [z.celsius for z in zones if z.type and any(h in z.type.lower() for h in _CPU_ZONE_HINTS)]
    temps = cpu or [z.celsius for z in zones]
    return max(temps) if temps else None


def _parse_throttle(text: str | None) -> Throttle | None:
    if text is None or not re.fullmatch(r"(0x)?[0-9a-fA-F]{1,8}", text) or int(text, 16) & ~_THROTTLE_MASK:
        return None
    return Throttle(int(text, 16))


def read_throttle(root: Path = ROOT, notes: list[str] | None = None) -> Throttle | None:
    notes = [] if notes is None else notes
    for node in (fw / "get_throttled" for fw in sorted(root.glob(_FIRMWARE_GLOB))):
        if not os.path.lexists(node):
            continue
        text = _read_text(node)
        if (found := _parse_throttle(text)) is not None:
            return found
        notes.append(f"pi: {node.relative_to(root)} {_show(text)}")
    if root == ROOT and (found := _vcgencmd_throttled()) is not None:
        return found
    notes.append("pi: no get_throttled flags (not a Raspberry Pi, or vcgencmd unavailable)")
    return None


def _vcgencmd_throttled() -> Throttle | None:
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=1.0).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key, _, value = out.strip().partition("=")
    return _parse_throttle(value) if key == "throttled" else None


def read_load(root: Path = ROOT, notes: list[str] | None = None) -> float | None:
    notes = [] if notes is None else notes
    text = _read_text(root / "proc/loadavg")
    value = _parse_number(text.split()[0] if text else None)
    if value is None or not 0 <= value <= _MAX_LOAD:
        notes.append(f"load: proc/loadavg {_show(text)}")
        return None
    return value / (os.cpu_count() or 1)


def read_memory(root: Path = ROOT, notes: list[str] | None = None) -> float | None:
    """MemAvailable in MB (proc/meminfo), or None."""
    notes = [] if notes is None else notes
    text = _read_text(root / "proc/meminfo")
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            value = _parse_number(parts[1] if len(parts) > 1 else None)
            if value is not None and 0 <= value < 2**40:  # kB; more than a petabyte is garbage
                return value / 1024.0
    notes.append("memory: proc/meminfo " + ("unreadable" if text is None else "has no MemAvailable"))
    return None


def read_snapshot(root: Path = ROOT) -> Snapshot:
    notes: list[str] = []
    power = read_power(root, notes)
    zones = read_thermal(root, notes)
    throttle = read_throttle(root, notes)
    load = read_load(root, notes)
    memory = read_memory(root, notes)
    return Snapshot(battery_present=power.present, battery_percent=power.percent,
                    battery_status=power.status, on_ac=power.on_ac, zones=zones,
                    cpu_celsius=cpu_celsius(zones), throttle=throttle, load_per_cpu=load,
                    mem_available_mb=memory, notes=tuple(notes))
