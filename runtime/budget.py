"""The budget policy: device signals → ``target_bits`` for ``--budget auto`` (docs/design.md, "The budget policy").

Levels, lowest first; bits come from the model's named budgets (defaults shown); ``min`` is the
format's own floor, slice 1 alone, which the default policy never reads (below)::

    min 2 | low 3 | mid 4 | high 6 | max 8

:func:`decide` takes the lowest level that any signal asks for (PolicyConfig defaults)::

    signal                                            level                 skips dwell
    on AC, or no battery in power_supply (mains)      ac_level = max
    battery > 50 % (battery_high_pct)                 high
    battery 20..50 %                                  mid
    battery < 20 % (battery_low_pct)                  low
    power unknown (no sysfs, no psutil)               default_level = mid
    CPU ≥ 70 °C (hot_c)                               one below the power level, not below low
    CPU ≥ 78 °C (critical_c; Pi soft limit 80 °C)     low, and pacing       yes
    CPU ≥ 83 °C (emergency_c; Pi hard limit 85 °C)    low, pacing at most   yes
    Pi under-voltage, capped, throttled or soft
    temperature limit *now*                           throttled_level = low yes

No flapping: a level goes up only if it would still be chosen with every threshold moved
against it by the hysteresis (3 °C cooler, 5 % more charge); any change waits ``dwell_s``
= 10 s after the previous one, except a step down that a "skips dwell" signal demands.
``target_bits`` is the level's bits clamped to ``[floor_bits, ceiling_bits]``. The quality
floor ``floor_bits`` defaults to the model's ``low`` budget — fewer bits make gibberish (SmolLM2 at
2 bits: PPL > 10,000) — so a device too hot for ``low`` cools by **pacing** instead: from
``critical_c`` on, every token is followed by a pause of ``pace_s_per_c`` × (°C − critical_c + 1)
seconds, ``pace_max_s`` from ``emergency_c`` on (defaults: 78 °C 0.05 s, 82 °C 0.25 s, ≥ 83 °C
1 s); ``Decision.pause_s`` carries it to the generation loop. ``--kv-bits auto`` (:func:`kv_bits_for`) picks the KV cache's precision when a generation starts:
8 bits, or 4 when the 8-bit cache of the whole context would take more than ``kv_memory_share`` of
MemAvailable, or the CPU is at ``critical_c``, or the Pi is throttled now. CPU load is shown but not used: while generating, the runtime itself keeps the
cores busy, so load would feed back on the budget it sets.

Config file (:func:`load_config`, TOML, every key optional, unknown keys refused)::

    version = 1
    default_level = "mid"          # min | low | mid | high | max
    ac_level = "max"
    throttled_level = "low"
    battery_high_pct = 50.0
    battery_low_pct = 20.0
    hot_c = 70.0
    critical_c = 78.0
    emergency_c = 83.0
    hysteresis_c = 3.0
    hysteresis_pct = 5.0
    dwell_s = 10.0
    floor_bits = 3.0               # default: the model's low
    ceiling_bits = 8.0
    pace_s_per_c = 0.05
    pace_max_s = 1.0
    kv_memory_share = 0.25         # --kv-bits auto: 4 bits when the 8-bit cache would take more
    [named]                        # all four, non-decreasing, within [2, 8]
    low = 3.0
    mid = 4.0
    high = 6.0
    max = 8.0
"""

from __future__ import annotations

import math
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from .signals import Snapshot, SignalSource, SysfsSource

MIN_BITS, MAX_BITS = 2.0, 8.0
DEFAULT_NAMED = MappingProxyType({"low": 3.0, "mid": 4.0, "high": 6.0, "max": 8.0})
LEVELS = ("min", "low", "mid", "high", "max")
MIN, LOW, MID, HIGH, MAX = range(len(LEVELS))
DEFAULT_REEVALUATE_EVERY = 16  # tokens between two AutoBudget.update() calls in generation
CONFIG_VERSION = 1


class BudgetError(ValueError):
    """A bad ``--budget`` value, policy config or config file."""


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BudgetError(f"[PolicyConfig] expected {name} a finite number; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PolicyConfig:
    """The policy's thresholds (meaning and defaults in the module docstring); validated here."""

    named: Mapping[str, float] = field(default_factory=lambda: DEFAULT_NAMED)
    default_level: str = "mid"
    ac_level: str = "max"
    throttled_level: str = "low"
    battery_high_pct: float = 50.0
    battery_low_pct: float = 20.0
    hot_c: float = 70.0
    critical_c: float = 78.0
    emergency_c: float = 83.0
    hysteresis_c: float = 3.0
    hysteresis_pct: float = 5.0
    dwell_s: float = 10.0
    floor_bits: float | None = None  # None: the named low budget, the model's quality floor
    ceiling_bits: float = MAX_BITS
    pace_s_per_c: float = 0.05
    pace_max_s: float = 1.0
    kv_memory_share: float = 0.25

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_level") and value not in LEVELS:
                raise BudgetError(f"[PolicyConfig] expected {f.name} one of {'|'.join(LEVELS)}; got {value!r}")
            if f.type == "float" or (f.type == "float | None" and value is not None):  # annotations are strings
                object.__setattr__(self, f.name, _number(f.name, value))
        object.__setattr__(self, "named", MappingProxyType(_check_named(self.named)))
        if self.floor_bits is None:
            object.__setattr__(self, "floor_bits", self.named["low"])
        checks = [
            (0 <= self.battery_low_pct < self.battery_high_pct <= 100, "0 <= battery_low_pct < battery_high_pct <= 100",
             (self.battery_low_pct, self.battery_high_pct)),
            (self.hot_c < self.critical_c < self.emergency_c, "hot_c < critical_c < emergency_c",
             (self.hot_c, self.critical_c, self.emergency_c)),
            (min(self.hysteresis_c, self.hysteresis_pct, self.dwell_s) >= 0, "hysteresis_c, hysteresis_pct, dwell_s >= 0",
             (self.hysteresis_c, self.hysteresis_pct, self.dwell_s)),
            (0 <= self.pace_s_per_c and 0 <= self.pace_max_s <= 60, "pace_s_per_c >= 0, 0 <= pace_max_s <= 60",
             (self.pace_s_per_c, self.pace_max_s)),
            (0 < self.kv_memory_share <= 1, "0 < kv_memory_share <= 1", (self.kv_memory_share,)),
            (MIN_BITS <= self.floor_bits <= self.ceiling_bits <= MAX_BITS,
             f"{MIN_BITS:g} <= floor_bits <= ceiling_bits <= {MAX_BITS:g}", (self.floor_bits, self.ceiling_bits)),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise BudgetError(f"[PolicyConfig] expected {expected}; got {', '.join(f'{v:g}' for v in got)}")

    def bits(self, level: str) -> float:
        return MIN_BITS if level == "min" else self.named[level]

    def pause(self, celsius: float | None) -> float:
        """Seconds to pause after each token at ``celsius`` (0 below critical_c)."""
        if celsius is None or celsius < self.critical_c:
            return 0.0
        if celsius >= self.emergency_c:
            return self.pace_max_s
        return min(self.pace_max_s, self.pace_s_per_c * (celsius - self.critical_c + 1))


def _check_named(named: object) -> dict[str, float]:
    if not isinstance(named, Mapping):
        raise BudgetError(f"[PolicyConfig] expected named a mapping low/mid/high/max -> bits; got {named!r}")
    wanted = LEVELS[1:]
    if set(named) != set(wanted):
        raise BudgetError(f"[PolicyConfig] expected named keys {', '.join(wanted)}; got {', '.join(map(str, named))}")
    bits = {k: _number(f"named.{k}", named[k]) for k in wanted}
    values = list(bits.values())
    if not (MIN_BITS <= values[0] and values[-1] <= MAX_BITS and values == sorted(values)):
        raise BudgetError(f"[PolicyConfig] expected {MIN_BITS:g} <= low <= mid <= high <= max <= {MAX_BITS:g}; "
                          f"got {', '.join(f'{k}={v:g}' for k, v in bits.items())}")
    return bits


def load_config(path: str | Path, named: Mapping[str, float] | None = None) -> PolicyConfig:
    """A :class:`PolicyConfig` from the TOML file documented above; ``named`` (the model's named
    budgets) applies when the file has no ``[named]`` table."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BudgetError(f"[load_config] expected a readable TOML file at {path}; got {e}") from e
    version = data.pop("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise BudgetError(f"[load_config] expected version = {CONFIG_VERSION} in {path}; got {version!r}")
    if named is not None:
        data.setdefault("named", dict(named))
    known = [f.name for f in fields(PolicyConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BudgetError(f"[load_config] expected keys among version, {', '.join(known)} in {path}; "
                          f"got unknown {', '.join(unknown)}")
    try:
        return PolicyConfig(**data)
    except BudgetError as e:
        raise BudgetError(f"{e} (in {path})") from e


@dataclass(frozen=True)
class Decision:
    target_bits: float
    level: str  # one of LEVELS
    reason: str  # human readable, e.g. "on battery 12% → low"
    since: float  # the `now` at which this level was entered
    pause_s: float = 0.0  # pacing: seconds to wait after each token (a hot device at its quality floor)


@dataclass(frozen=True)
class _Verdict:
    level: int
    reason: str
    urgent: int | None  # lowest level a dwell-skipping signal asks for, if any


def _power(s: Snapshot, c: PolicyConfig, slack_pct: float) -> tuple[int, str]:
    if s.on_ac:
        return LEVELS.index(c.ac_level), "on AC"
    p = s.battery_percent
    if p is not None:
        where = "on battery" if s.on_ac is False else "battery (charging state unknown)"
        level = HIGH if p > c.battery_high_pct + slack_pct else MID if p >= c.battery_low_pct + slack_pct else LOW
        return level, f"{where} {p:.0f}%"
    if s.on_ac is False:
        return LEVELS.index(c.default_level), "on battery, charge unknown"
    if s.battery_present is False:
        return LEVELS.index(c.ac_level), "no battery (mains)"
    return LEVELS.index(c.default_level), "power source unknown"


def _evaluate(s: Snapshot, c: PolicyConfig, slack_c: float = 0.0, slack_pct: float = 0.0) -> _Verdict:
    """The level the signals ask for, thresholds moved against raising by the slacks."""
    level, why = _power(s, c, slack_pct)
    limits: list[tuple[int, str, bool]] = []  # (level, why, skips dwell)
    t = s.cpu_celsius
    if t is not None:
        for threshold, limit, urgent in ((c.emergency_c, LOW, True), (c.critical_c, LOW, True),
                                         (c.hot_c, max(LOW, level - 1), False)):
            if t >= threshold - slack_c:
                limits.append((limit, f"CPU {t:.0f} °C ≥ {threshold - slack_c:g} °C", urgent))
                break
    if s.throttle is not None and s.throttle.now:
        limits.append((LEVELS.index(c.throttled_level), f"Pi {', '.join(s.throttle.now)} now", True))
    for limit, reason, _ in sorted(limits)[:1]:
        if limit < level:
            level, why = limit, f"{why}; {reason}"
    hyst = " with hysteresis" if slack_c or slack_pct else ""
    urgent = min((limit for limit, _, u in limits if u), default=None)
    return _Verdict(level, f"{why}{hyst} → {LEVELS[level]}", urgent)


def _decision(c: PolicyConfig, level: int, reason: str, since: float, celsius: float | None) -> Decision:
    bits = c.bits(LEVELS[level])
    target = min(max(bits, c.floor_bits), c.ceiling_bits)
    if target != bits:
        reason += f"; {bits:g} bits clamped to [{c.floor_bits:g}, {c.ceiling_bits:g}]"
    pause = c.pause(celsius)
    if pause:
        reason += f"; pacing {pause:.2f} s per token"
    return Decision(target, LEVELS[level], reason, since, pause)


def decide(snapshot: Snapshot, config: PolicyConfig, previous: Decision | None, now: float) -> Decision:
    """The budget for ``snapshot`` at time ``now`` (seconds, any monotonic origin). Pure."""
    raw = _evaluate(snapshot, config)
    t = snapshot.cpu_celsius
    if previous is None:
        return _decision(config, raw.level, raw.reason, now, t)
    if previous.level not in LEVELS:
        raise BudgetError(f"[decide] expected previous.level one of {'|'.join(LEVELS)}; got {previous.level!r}")
    held = LEVELS.index(previous.level)
    if raw.level > held:  # going up must also hold with the thresholds moved by the hysteresis
        careful = _evaluate(snapshot, config, config.hysteresis_c, config.hysteresis_pct)
        if careful.level <= held:
            return _decision(config, held, f"{raw.reason}, held at {previous.level} by hysteresis "
                             f"({config.hysteresis_c:g} °C, {config.hysteresis_pct:g}%)", previous.since, t)
        raw = careful
    if raw.level == held:
        return _decision(config, held, raw.reason, previous.since, t)
    waited = now - previous.since
    urgent = raw.urgent is not None and raw.urgent < held
    if waited < config.dwell_s and not urgent:
        return _decision(config, held, f"{raw.reason}, held at {previous.level} for {config.dwell_s - waited:.0f} s "
                         f"more (dwell {config.dwell_s:g} s)", previous.since, t)
    return _decision(config, raw.level, raw.reason, now, t)


class AutoBudget:
    """``--budget auto`` at run time: the generation loop calls :meth:`update` every
    :data:`DEFAULT_REEVALUATE_EVERY` tokens and feeds ``target_bits`` to the session.
    ``listeners`` are called as ``listener(old, new)`` when the level or the pacing changes (not
    on the first decision). Exceptions from the source or a listener propagate. The runtime calls
    :meth:`update` off the token path (runtime/control.py), never holding a lock of its own."""

    def __init__(self, source: SignalSource | None = None, config: PolicyConfig | None = None) -> None:
        self.source: SignalSource = source or SysfsSource()
        self.config = config or PolicyConfig()
        self.snapshot: Snapshot | None = None
        self.decision: Decision | None = None
        self.listeners: list[Callable[[Decision, Decision], None]] = []

    def update(self, now: float | None = None) -> Decision:
        snapshot = self.source()
        new = decide(snapshot, self.config, self.decision, time.monotonic() if now is None else now)
        old, self.snapshot, self.decision = self.decision, snapshot, new
        if old is not None and (new.level, new.pause_s) != (old.level, old.pause_s):
            for listener in list(self.listeners):
                listener(old, new)
        return new


KV_BITS_AUTO = (8, 4)  # what --kv-bits auto chooses between


def kv_bits_for(s: Snapshot, c: PolicyConfig, cache_mb: Mapping[int, float]) -> tuple[int, str]:
    """The KV cache precision for a generation that starts now (``--kv-bits auto``) and why. ``cache_mb``:
    the cache of the model's whole context in MB at 8 and 4 bits. 8 bits (within 1 % of a float cache's
    perplexity), or 4 bits when the 8-bit cache would take more than ``kv_memory_share`` of the memory
    available, or when the CPU is at ``critical_c`` or throttled now (the cache is then the bytes a long chat
    reads per token: 4 bits halve them). Pure; the precision holds for the whole generation."""
    available = s.mem_available_mb
    if available is not None and cache_mb[8] > c.kv_memory_share * available:
        return 4, (f"8-bit cache {cache_mb[8]:.0f} MB > {c.kv_memory_share:.0%} of {available:.0f} MB available "
                   f"→ 4 bits ({cache_mb[4]:.0f} MB)")
    if s.cpu_celsius is not None and s.cpu_celsius >= c.critical_c:
        return 4, f"CPU {s.cpu_celsius:.0f} °C ≥ {c.critical_c:g} °C → 4 bits"
    if s.throttle is not None and s.throttle.now:
        return 4, f"Pi {', '.join(s.throttle.now)} now → 4 bits"
    memory = f"{available:.0f} MB available" if available is not None else "memory unknown"
    return 8, f"{memory}, {cache_mb[8]:.0f} MB for the context at 8 bits → 8 bits"


def parse_budget(text: str, named: Mapping[str, float]) -> float | Literal["auto"]:
    """``--budget``: auto, a named budget, or bits in [2, 8]. Nothing is clamped."""
    word = text.strip().lower()
    lowered = {k.lower(): float(v) for k, v in named.items()}
    if word == "auto":
        return "auto"
    if word in lowered:
        return lowered[word]
    try:
        bits = float(word)
    except ValueError:
        bits = math.nan
    if MIN_BITS <= bits <= MAX_BITS:  # False for nan
        return bits
    names = ", ".join(f"{k} ({v:g})" for k, v in lowered.items())
    raise BudgetError(f"[--budget] expected auto, {names}, or a number of bits in "
                      f"[{MIN_BITS:g}, {MAX_BITS:g}]; got {text!r}")


def describe(snapshot: Snapshot, decision: Decision) -> str:
    """What ``mobiq-run --signals`` prints: the signals, what is unknown, the choice and why."""
    s = snapshot
    if s.battery_present is False:
        power = "no battery"
    elif s.battery_percent is None and s.battery_status is None:
        power = "battery unknown"
    else:
        pct = "charge unknown" if s.battery_percent is None else f"{s.battery_percent:.0f}%"
        power = f"battery {pct} ({s.battery_status or 'status unknown'})"
    power += {True: ", on AC", False: ", not on AC", None: ", AC unknown"}[s.on_ac]
    zones = ", ".join(f"{z.name} ({z.type or 'type unknown'}) {z.celsius:.1f} °C" for z in s.zones)
    temp = "unknown" if s.cpu_celsius is None else f"CPU {s.cpu_celsius:.1f} °C"
    if zones:
        temp += f"  [{zones}]"
    if s.throttle is None:
        pi = "unknown"
    else:
        pi = (f"0x{s.throttle.raw:x}: now {', '.join(s.throttle.now) or 'none'}; "
              f"since boot {', '.join(s.throttle.since_boot) or 'none'}")
    load = "unknown" if s.load_per_cpu is None else f"{s.load_per_cpu:.2f} per CPU (shown only, not used)"
    memory = "unknown" if s.mem_available_mb is None else f"{s.mem_available_mb:.0f} MB available"
    lines = ["signals:", f"  power        {power}", f"  temperature  {temp}", f"  Pi flags     {pi}",
             f"  load         {load}", f"  memory       {memory}"]
    if s.notes:
        lines += ["unknown or unreadable:"] + [f"  - {n}" for n in s.notes]
    pacing = f", pausing {decision.pause_s:.2f} s after each token" if decision.pause_s else ""
    lines += [f"budget: {decision.level} = {decision.target_bits:g} bits{pacing}", f"  because {decision.reason}"]
    return "\n".join(lines)
