"""--budget auto: signal readers on fake sysfs trees built in tmp_path, and the pure policy.

Expected levels come from the thresholds documented in runtime/budget.py (PolicyConfig
defaults): AC/no battery → max, battery >50 % high, 20..50 % mid, <20 % low, unknown → mid;
CPU ≥70 °C one level down, ≥78 °C low and pacing (0.05 s per °C from 77 °C), ≥83 °C low and 1 s
pauses; Pi flags now → low; hysteresis 3 °C / 5 %, dwell 10 s except urgent step-downs. Bits: min 2,
low 3, mid 4, high 6, max 8; the floor is low (never 2 bits unless floor_bits says so).
"""

from __future__ import annotations

import os
import time
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest

from mobiquant.runtime import signals
from mobiquant.runtime.budget import (DEFAULT_NAMED, DEFAULT_REEVALUATE_EVERY, AutoBudget, BudgetError, Decision,
                                      PolicyConfig, decide, describe, load_config, parse_budget)
from mobiquant.runtime.signals import Snapshot, SysfsSource, Throttle, Zone, read_snapshot
import fake_sysfs
from fake_sysfs import THROTTLE_NODE, adapter, battery, laptop, pi5, put, zone

CFG = PolicyConfig()
def level_of(snapshot: Snapshot, config: PolicyConfig = CFG) -> Decision:
    return decide(snapshot, config, None, 0.0)


# --- battery and AC -----------------------------------------------------------------------

@pytest.mark.parametrize("capacity,status,online,on_ac,level,bits", [
    ("80", "Discharging", "0", False, "high", 6.0),
    ("12", "Discharging", "0", False, "low", 3.0),
    ("35", "Discharging", "0", False, "mid", 4.0),
    ("50", "Discharging", "0", False, "mid", 4.0),   # 20..50 inclusive is mid
    ("20", "Discharging", "0", False, "mid", 4.0),
    ("40", "Charging", "1", True, "max", 8.0),
    ("100", "Full", "1", True, "max", 8.0),
    ("60", "Discharging", "1", False, "high", 6.0),  # weak charger: the battery still drains
    ("80", "Not charging", "1", True, "max", 8.0),
])
def test_laptop(tmp_path, capacity, status, online, on_ac, level, bits):
    snap = read_snapshot(laptop(tmp_path, capacity, status, online))
    assert (snap.battery_present, snap.battery_percent, snap.battery_status, snap.on_ac) == (
        True, float(capacity), status, on_ac)
    assert snap.cpu_celsius == 45.0 and snap.load_per_cpu == pytest.approx(0.52 / os.cpu_count())
    d = level_of(snap)
    assert (d.level, d.target_bits) == (level, bits), d.reason


def test_laptop_reason_names_the_battery(tmp_path):
    assert level_of(read_snapshot(laptop(tmp_path, "12", "Discharging", "0"))).reason == "on battery 12% → low"


def test_desktop_without_battery_with_ac_online(tmp_path):
    adapter(tmp_path, "1")
    snap = read_snapshot(tmp_path)
    assert (snap.battery_present, snap.battery_percent, snap.on_ac) == (False, None, True)
    assert level_of(snap).target_bits == 8.0


def test_desktop_with_empty_power_supply_is_mains_and_ignores_a_mouse_battery(tmp_path):
    battery(tmp_path, "5", "Discharging", name="hidpp_battery_0", scope="Device")
    snap = read_snapshot(tmp_path)
    assert (snap.battery_present, snap.battery_percent, snap.on_ac) == (False, None, None)
    d = level_of(snap)
    assert (d.level, d.target_bits) == ("max", 8.0) and "no battery" in d.reason


def test_two_batteries_average_and_any_discharging_wins(tmp_path):
    battery(tmp_path, "90", "Full", name="BAT0")
    battery(tmp_path, "30", "Discharging", name="BAT1")
    adapter(tmp_path, "0")
    snap = read_snapshot(tmp_path)
    assert (snap.battery_percent, snap.battery_status, snap.on_ac) == (60.0, "Discharging", False)
    assert level_of(snap).level == "high"


def test_battery_without_status_or_adapter_uses_charge_bands(tmp_path):
    put(tmp_path, "sys/class/power_supply/BAT0/type", "Battery")
    put(tmp_path, "sys/class/power_supply/BAT0/capacity", "15")
    snap = read_snapshot(tmp_path)
    assert (snap.battery_present, snap.battery_percent, snap.on_ac) == (True, 15.0, None)
    assert level_of(snap).level == "low"


# --- Raspberry Pi: temperature and throttling ---------------------------------------------

@pytest.mark.parametrize("celsius,level,bits,pause", [
    (60.0, "max", 8.0, 0.0), (69.9, "max", 8.0, 0.0), (70.0, "high", 6.0, 0.0), (72.0, "high", 6.0, 0.0),
    (77.9, "high", 6.0, 0.0), (78.0, "low", 3.0, 0.05), (80.0, "low", 3.0, 0.15), (82.9, "low", 3.0, 0.295),
    (83.0, "low", 3.0, 1.0), (84.0, "low", 3.0, 1.0), (95.0, "low", 3.0, 1.0),
])
def test_pi5_temperature(tmp_path, celsius, level, bits, pause):
    """Hot devices never drop below the quality floor (low); past critical_c they pause between tokens."""
    snap = read_snapshot(pi5(tmp_path, celsius))
    assert snap.zones == (Zone("thermal_zone0", "cpu-thermal", celsius),)
    assert snap.cpu_celsius == celsius and snap.throttle == Throttle(0)
    d = level_of(snap)
    assert (d.level, d.target_bits) == (level, bits), d.reason
    assert d.pause_s == pytest.approx(pause), d.reason
    assert ("pacing" in d.reason) == (pause > 0), d.reason


def test_pacing_is_configurable_and_follows_the_temperature_without_dwell():
    config = replace(CFG, pace_s_per_c=0.1, pace_max_s=0.4)
    assert [level_of(on_ac(t), config).pause_s for t in (77.0, 78.0, 79.0, 81.0, 82.0, 90.0)] == \
        pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4, 0.4])
    first = decide(on_ac(80.0), CFG, None, 0.0)
    hotter = decide(on_ac(82.0), CFG, first, 1.0)  # same level, within the dwell: the pause still follows
    assert (hotter.level, hotter.since, hotter.pause_s) == ("low", 0.0, pytest.approx(0.25))
    with pytest.raises(BudgetError, match="pace_max_s <= 60"):
        PolicyConfig(pace_max_s=120.0)


@pytest.mark.parametrize("text,raw,now,since_boot", [
    ("50005", 0x50005, ("under-voltage", "throttled"), ("under-voltage", "throttled")),
    ("0x50000", 0x50000, (), ("under-voltage", "throttled")),
    ("80008", 0x80008, ("soft temperature limit",), ("soft temperature limit",)),
    ("20002", 0x20002, ("arm frequency capped",), ("arm frequency capped",)),
    ("1", 0x1, ("under-voltage",), ()),
    ("0", 0, (), ()),
])
def test_pi_throttle_bits_are_hex_and_split_now_from_since_boot(tmp_path, text, raw, now, since_boot):
    snap = read_snapshot(pi5(tmp_path, 60.0, text))
    assert (snap.throttle.raw, snap.throttle.now, snap.throttle.since_boot) == (raw, now, since_boot)
    # only the "now" bits lower the budget (to throttled_level = low); history alone does not
    assert level_of(snap).level == ("low" if now else "max")


def test_pi_flags_name_themselves_in_the_reason(tmp_path):
    d = level_of(read_snapshot(pi5(tmp_path, 60.0, "50005")))
    assert d.reason == "no battery (mains); Pi under-voltage, throttled now → low"


def test_pi_hot_and_throttled_takes_the_lower(tmp_path):
    d = level_of(read_snapshot(pi5(tmp_path, 84.0, "50005")))
    assert (d.level, d.pause_s) == ("low", 1.0)


# --- missing, unreadable and garbage inputs -----------------------------------------------

def test_empty_root_knows_nothing_and_falls_back_to_mid(tmp_path):
    snap = read_snapshot(tmp_path)
    assert snap == Snapshot(notes=snap.notes)  # every signal unknown
    assert {n.split(":")[0] for n in snap.notes} == {"power", "thermal", "pi", "load", "memory"}
    d = level_of(snap)
    assert (d.level, d.target_bits, d.reason) == ("mid", 4.0, "power source unknown → mid")


def _directory(path: Path) -> None:
    path.mkdir(parents=True)


def _broken_symlink(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(path.parent / "does-not-exist")


@pytest.mark.parametrize("make_unreadable", [_directory, _broken_symlink], ids=["directory", "broken-symlink"])
def test_unreadable_files_are_unknown(tmp_path, make_unreadable):
    put(tmp_path, "sys/class/power_supply/BAT0/type", "Battery")
    put(tmp_path, "sys/class/power_supply/BAT0/status", "Discharging")
    make_unreadable(tmp_path / "sys/class/power_supply/BAT0/capacity")
    put(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    make_unreadable(tmp_path / "sys/class/thermal/thermal_zone0/temp")
    make_unreadable(tmp_path / THROTTLE_NODE)
    make_unreadable(tmp_path / "proc/loadavg")
    snap = read_snapshot(tmp_path)
    assert (snap.battery_present, snap.battery_percent, snap.on_ac) == (True, None, False)
    assert (snap.zones, snap.cpu_celsius, snap.throttle, snap.load_per_cpu) == ((), None, None, None)
    for fragment in ("BAT0/capacity unreadable", "thermal_zone0/temp unreadable", "get_throttled unreadable",
                     "proc/loadavg unreadable"):
        assert any(fragment in n for n in snap.notes), (fragment, snap.notes)
    assert level_of(snap).level == "mid"  # on battery, charge unknown → default_level


def test_unreadable_power_supply_directory(tmp_path):
    put(tmp_path, "sys/class/power_supply", "not a directory")
    snap = read_snapshot(tmp_path)
    assert (snap.battery_present, snap.on_ac) == (None, None)
    assert level_of(snap).level == "mid"


GARBAGE = ["abc", "", "nan", "inf", "1e999", "99999999999999999999", "12abc", "0x", b"\xff\xfe\x00"]


@pytest.mark.parametrize("junk", GARBAGE, ids=repr)
def test_garbage_is_unknown_not_a_crash(tmp_path, junk):
    put(tmp_path, "sys/class/power_supply/BAT0/type", "Battery")
    put(tmp_path, "sys/class/power_supply/BAT0/capacity", junk)
    put(tmp_path, "sys/class/power_supply/BAT0/status", junk)
    put(tmp_path, "sys/class/power_supply/AC/type", "Mains")
    put(tmp_path, "sys/class/power_supply/AC/online", junk)
    put(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    put(tmp_path, "sys/class/thermal/thermal_zone0/temp", junk)
    put(tmp_path, THROTTLE_NODE, junk)
    put(tmp_path, "proc/loadavg", junk)
    put(tmp_path, "proc/meminfo", b"MemAvailable: " + (junk if isinstance(junk, bytes) else junk.encode()) + b" kB\n")
    snap = read_snapshot(tmp_path)
    assert (snap.battery_percent, snap.battery_status, snap.on_ac) == (None, None, None)
    assert (snap.zones, snap.cpu_celsius, snap.throttle, snap.load_per_cpu) == ((), None, None, None)
    assert snap.mem_available_mb is None
    # capacity, status, online, temp, get_throttled, loadavg, pi summary, meminfo
    assert len(snap.notes) == 8, snap.notes
    assert level_of(snap).level == "mid"


@pytest.mark.parametrize("rel,text", [
    ("sys/class/power_supply/BAT0/capacity", "101"), ("sys/class/power_supply/BAT0/capacity", "-5"),
    ("sys/class/thermal/thermal_zone0/temp", "151000"), ("sys/class/thermal/thermal_zone0/temp", "-273150"),
    ("proc/loadavg", "-1 0 0"),
    (THROTTLE_NODE, "327685"),  # 0x50005 written in decimal: bits outside 0-3/16-19 when read as hex
    (THROTTLE_NODE, "0x1ffffffff"), (THROTTLE_NODE, "throttled=0x5"), (THROTTLE_NODE, "-1"),
])
def test_out_of_range_is_unknown(tmp_path, rel, text):
    put(tmp_path, "sys/class/power_supply/BAT0/type", "Battery")
    put(tmp_path, rel, text)
    snap = read_snapshot(tmp_path)
    assert (snap.battery_percent, snap.zones, snap.load_per_cpu, snap.throttle) == (None, (), None, None)
    assert any(f"{Path(rel).name} garbage {text!r}" in n for n in snap.notes), snap.notes


def test_cpu_zones_win_over_other_zones_and_any_zone_counts_when_none_is_cpu(tmp_path):
    zone(tmp_path, 0, "acpitz", "50000")
    zone(tmp_path, 1, "iwlwifi_1", "90000")
    zone(tmp_path, 10, "x86_pkg_temp", "55000")
    zone(tmp_path, 2, "", "61000")
    snap = read_snapshot(tmp_path)
    assert [z.name for z in snap.zones] == ["thermal_zone0", "thermal_zone1", "thermal_zone2", "thermal_zone10"]
    assert snap.zones[2].type is None
    assert snap.cpu_celsius == 55.0
    assert signals.cpu_celsius(snap.zones[:2]) == 90.0


def test_psutil_is_asked_only_for_the_real_root(tmp_path, monkeypatch):
    psutil = pytest.importorskip("psutil")
    if signals.read_power(Path("/")).present is not False:
        pytest.skip("this machine shows a battery (or no power_supply at all)")
    fake = namedtuple("sbattery", "percent secsleft power_plugged")(42.0, 3600, False)
    monkeypatch.setattr(psutil, "sensors_battery", lambda: fake)
    assert read_snapshot(tmp_path).battery_percent is None
    power = signals.read_power(Path("/"))
    assert (power.present, power.percent, power.on_ac) == (True, 42.0, False)


def _fake_vcgencmd(tmp_path, monkeypatch, body: str) -> None:
    if list(Path("/").glob("sys/devices/platform/soc*/soc*:firmware/get_throttled")):
        pytest.skip("a real get_throttled node exists here and takes precedence")
    exe = put(tmp_path / "bin", "vcgencmd", "#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")


def test_vcgencmd_only_for_the_real_root(tmp_path, monkeypatch):
    _fake_vcgencmd(tmp_path, monkeypatch, 'echo "throttled=0x50005"')
    assert signals.read_throttle(Path("/")) == Throttle(0x50005)
    assert signals.read_throttle(tmp_path) is None


def test_vcgencmd_that_hangs_is_abandoned_after_a_second(tmp_path, monkeypatch):
    _fake_vcgencmd(tmp_path, monkeypatch, "exec sleep 5")
    start = time.monotonic()
    assert signals.read_throttle(Path("/")) is None
    assert time.monotonic() - start < 3.0


# --- the policy over time: hysteresis, dwell, urgent steps --------------------------------

def on_ac(celsius: float | None = None, throttle: int = 0) -> Snapshot:
    return Snapshot(on_ac=True, cpu_celsius=celsius, throttle=Throttle(throttle))


def run(trace, config: PolicyConfig = CFG) -> list[tuple[float, str]]:
    """decide() over (time, snapshot) pairs; returns (time, level) of the first decision and every change."""
    previous, changes = None, []
    for now, snap in trace:
        d = decide(snap, config, previous, now)
        if previous is None or d.level != previous.level:
            assert d.since == now
            changes.append((now, d.level))
        else:
            assert d.since == previous.since
        previous = d
    return changes


def oscillating(seconds: int = 600):
    return [(float(t), on_ac(69.0 if t % 2 == 0 else 71.0)) for t in range(seconds + 1)]


def test_oscillation_around_70C_changes_once_with_hysteresis():
    # 69/71 °C every second: down to high once the 10 s dwell has passed (first 71 °C at t=11),
    # then back up needs < 67 °C, which never comes.
    assert run(oscillating()) == [(0.0, "max"), (11.0, "high")]


def test_oscillation_without_hysteresis_is_limited_by_the_dwell():
    changes = run(oscillating(), replace(CFG, hysteresis_c=0.0))
    times = [t for t, _ in changes[1:]]
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert min(gaps) >= CFG.dwell_s
    assert len(times) <= 600 / CFG.dwell_s
    # a change needs the dwell (10 s) and the right parity of the 2 s cycle: every 11 s
    assert times == [float(t) for t in range(11, 601, 11)]


def test_heat_up_steps_down_immediately_for_emergencies():
    trace = [(float(t), on_ac(60.0 + t)) for t in range(31)]  # +1 °C per second, 60 → 90 °C
    # 70 °C at t=10 is not urgent but the dwell since t=0 has passed; 78 °C (t=18) and
    # 83 °C (t=23) are urgent; the level stays at the floor (low) from 78 °C on, paced harder
    assert run(trace) == [(0.0, "max"), (10.0, "high"), (18.0, "low")]


def test_non_urgent_step_down_waits_for_the_dwell():
    trace = [(0.0, on_ac(60.0)), (5.0, on_ac(60.0)),
             (6.0, Snapshot(on_ac=False, battery_percent=45.0)), (9.9, Snapshot(on_ac=False, battery_percent=45.0)),
             (10.0, Snapshot(on_ac=False, battery_percent=45.0))]
    assert run(trace) == [(0.0, "max"), (10.0, "mid")]


def test_throttle_now_is_immediate_even_right_after_a_change():
    trace = [(0.0, on_ac(60.0)), (10.0, on_ac(72.0)), (11.0, on_ac(72.0, throttle=0x50005))]
    assert run(trace) == [(0.0, "max"), (10.0, "high"), (11.0, "low")]


def test_cool_down_needs_hysteresis_and_dwell():
    trace = [(float(t), on_ac(84.0 - t)) for t in range(31)]  # -1 °C per second
    # low → anything waits 10 s (t=10, 74 °C: below 78-3 so not low; ≥ 70-3 so high, not max);
    # high → max needs < 67 °C (t=18) and 10 s after t=10 (t=20)
    assert run(trace) == [(0.0, "low"), (10.0, "high"), (20.0, "max")]


def test_battery_hysteresis():
    pcts = [51, 49, 51, 54, 56, 24, 21, 26]
    trace = [(20.0 * i, Snapshot(on_ac=False, battery_percent=float(p))) for i, p in enumerate(pcts)]
    # down at ≤50 and <20 are immediate; up needs >55 and ≥25
    assert run(trace) == [(0.0, "high"), (20.0, "mid"), (80.0, "high"), (100.0, "mid")]
    trace = [(0.0, Snapshot(on_ac=False, battery_percent=19.0)), (20.0, Snapshot(on_ac=False, battery_percent=24.0)),
             (40.0, Snapshot(on_ac=False, battery_percent=25.0))]
    assert run(trace) == [(0.0, "low"), (40.0, "mid")]


def test_held_decision_explains_itself():
    first = decide(on_ac(60.0), CFG, None, 0.0)
    held = decide(on_ac(72.0), CFG, first, 4.0)
    assert (held.level, held.since) == ("max", 0.0)
    assert held.reason == "on AC; CPU 72 °C ≥ 70 °C → high, held at max for 6 s more (dwell 10 s)"
    down = decide(on_ac(72.0), CFG, first, 10.0)
    stay = decide(on_ac(68.0), CFG, down, 30.0)
    assert (stay.level, stay.since) == ("high", 10.0)
    assert "held at high by hysteresis" in stay.reason


def test_unknown_previous_level_is_refused():
    with pytest.raises(BudgetError, match=r"\[decide\] expected previous.level"):
        decide(on_ac(), CFG, Decision(5.0, "turbo", "", 0.0), 1.0)


# --- user limits ----------------------------------------------------------------------------

def test_ceiling_and_floor_clamp_the_bits_not_the_level():
    capped = level_of(on_ac(40.0), PolicyConfig(ceiling_bits=5.0))
    assert (capped.level, capped.target_bits) == ("max", 5.0)
    assert "8 bits clamped to [3, 5]" in capped.reason  # the floor defaults to the named low
    raised = level_of(on_ac(84.0), PolicyConfig(floor_bits=3.5))
    assert (raised.level, raised.target_bits) == ("low", 3.5)
    two = level_of(on_ac(60.0, throttle=0x1), PolicyConfig(throttled_level="min", floor_bits=2.0))
    assert (two.level, two.target_bits) == ("min", 2.0)  # 2 bits only when the floor is lowered explicitly
    floored = level_of(on_ac(60.0, throttle=0x1), PolicyConfig(throttled_level="min"))
    assert (floored.level, floored.target_bits) == ("min", 3.0)
    low = level_of(Snapshot(on_ac=False, battery_percent=12.0), PolicyConfig(floor_bits=4.0, ceiling_bits=4.0))
    assert (low.level, low.target_bits) == ("low", 4.0)


def test_model_named_budgets_set_the_bits():
    named = {"low": 2.5, "mid": 3.5, "high": 5.0, "max": 7.0}
    assert level_of(Snapshot(on_ac=False, battery_percent=80.0), PolicyConfig(named=named)).target_bits == 5.0
    assert level_of(on_ac(90.0), PolicyConfig(named=named)).target_bits == 2.5  # the model's low is the floor


# --- --budget parsing -----------------------------------------------------------------------

@pytest.mark.parametrize("text,bits", [("low", 3.0), ("mid", 4.0), ("high", 6.0), ("max", 8.0), ("MAX", 8.0),
                                       (" auto ", "auto"), ("2", 2.0), ("8", 8.0), ("5.5", 5.5), (" 4 ", 4.0)])
def test_parse_budget_accepts(text, bits):
    assert parse_budget(text, DEFAULT_NAMED) == bits


def test_parse_budget_uses_the_model_mapping():
    assert parse_budget("low", {"low": 2.5, "mid": 4, "high": 6, "max": 8}) == 2.5


@pytest.mark.parametrize("text", ["", "9", "1.9", "8.01", "nan", "inf", "-3", "turbo", "4bits", "auto2"])
def test_parse_budget_rejects_without_clamping(text):
    with pytest.raises(BudgetError) as err:
        parse_budget(text, DEFAULT_NAMED)
    message = str(err.value)
    assert message.startswith("[--budget] expected auto, low (3), mid (4), high (6), max (8)")
    assert "[2, 8]" in message and message.endswith(f"got {text!r}")


# --- config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,fragment", [
    (dict(hot_c=80.0), "hot_c < critical_c < emergency_c; got 80, 78, 83"),
    (dict(emergency_c=77.0), "hot_c < critical_c < emergency_c"),
    (dict(battery_low_pct=60.0), "0 <= battery_low_pct < battery_high_pct <= 100; got 60, 50"),
    (dict(battery_high_pct=101.0), "battery_high_pct <= 100"),
    (dict(floor_bits=6.0, ceiling_bits=4.0), "2 <= floor_bits <= ceiling_bits <= 8; got 6, 4"),
    (dict(ceiling_bits=9.0), "floor_bits <= ceiling_bits <= 8"),
    (dict(floor_bits=1.0), "2 <= floor_bits"),
    (dict(dwell_s=-1.0), "dwell_s >= 0"),
    (dict(hysteresis_pct=-0.5), "hysteresis_pct"),
    (dict(hysteresis_c=float("nan")), "hysteresis_c a finite number; got nan"),
    (dict(dwell_s="10"), "dwell_s a finite number; got '10'"),
    (dict(dwell_s=True), "dwell_s a finite number; got True"),
    (dict(default_level="turbo"), "default_level one of min|low|mid|high|max; got 'turbo'"),
    (dict(ac_level="MAX"), "ac_level one of"),
    (dict(named={"low": 3, "mid": 4, "high": 6}), "named keys low, mid, high, max; got low, mid, high"),
    (dict(named={**DEFAULT_NAMED, "turbo": 7}), "named keys"),
    (dict(named={"low": 5, "mid": 4, "high": 6, "max": 8}), "low <= mid <= high <= max <= 8; got low=5"),
    (dict(named={"low": 3, "mid": 4, "high": 6, "max": 9}), "max=9"),
    (dict(named={"low": 1, "mid": 4, "high": 6, "max": 8}), "2 <= low"),
    (dict(named=[3, 4, 6, 8]), "named a mapping"),
])
def test_config_validation(kwargs, fragment):
    with pytest.raises(BudgetError) as err:
        PolicyConfig(**kwargs)
    assert str(err.value).startswith("[PolicyConfig] expected") and fragment in str(err.value)
    assert isinstance(err.value, ValueError)


def test_config_is_frozen_and_normalised():
    c = PolicyConfig(dwell_s=5, named={"low": 3, "mid": 4, "high": 6, "max": 8})
    assert c.dwell_s == 5.0 and isinstance(c.dwell_s, float) and dict(c.named) == dict(DEFAULT_NAMED)
    with pytest.raises(AttributeError):
        c.dwell_s = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.named["low"] = 2.0  # type: ignore[index]


def test_load_config(tmp_path):
    path = put(tmp_path, "budget.toml", 'version = 1\ndwell_s = 5\nceiling_bits = 6\ndefault_level = "low"\n'
                                        "[named]\nlow = 2.5\nmid = 4\nhigh = 5\nmax = 7\n")
    c = load_config(path)
    assert (c.dwell_s, c.ceiling_bits, c.default_level, c.hot_c) == (5.0, 6.0, "low", 70.0)
    assert dict(c.named) == {"low": 2.5, "mid": 4.0, "high": 5.0, "max": 7.0}
    assert load_config(put(tmp_path, "empty.toml", "")) == PolicyConfig()


@pytest.mark.parametrize("text,fragments", [
    ("dwel_s = 5\ncolour = 'red'\n", ["got unknown colour, dwel_s", "expected keys among version, named,"]),
    ("version = 2\n", ["expected version = 1", "got 2"]),
    ("hot_c = 90\n", ["[PolicyConfig] expected hot_c < critical_c < emergency_c", "(in "]),
    ("dwell_s = \n", ["[load_config] expected a readable TOML file"]),
    ("[named]\nlow = 3\n", ["named keys low, mid, high, max; got low"]),
])
def test_load_config_errors(tmp_path, text, fragments):
    path = put(tmp_path, "budget.toml", text)
    with pytest.raises(BudgetError) as err:
        load_config(path)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(BudgetError, match=r"\[load_config\] expected a readable TOML file at .*nope.toml"):
        load_config(tmp_path / "nope.toml")


# --- AutoBudget and describe ----------------------------------------------------------------

def test_auto_budget_rereads_its_source_and_notifies_on_change():
    script = iter([on_ac(60.0), on_ac(60.0), on_ac(79.0), on_ac(79.0)])
    auto = AutoBudget(source=lambda: next(script))
    seen = []
    auto.listeners.append(lambda old, new: seen.append((old.level, new.level, new.target_bits)))
    levels = [auto.update(now=float(t)).level for t in range(4)]
    assert levels == ["max", "max", "low", "low"]
    assert seen == [("max", "low", 3.0)]
    assert auto.snapshot.cpu_celsius == 79.0 and DEFAULT_REEVALUATE_EVERY == 16


def test_auto_budget_on_a_fake_tree_with_the_real_clock(tmp_path):
    auto = AutoBudget(SysfsSource(pi5(tmp_path, 65.0)))
    first = auto.update()
    assert (first.level, first.target_bits) == ("max", 8.0)
    zone(tmp_path, 0, "cpu-thermal", "84000")
    hot = auto.update()
    assert (hot.level, hot.target_bits, hot.pause_s) == ("low", 3.0, 1.0)  # urgent: no dwell


def test_describe_reports_signals_unknowns_and_the_choice(tmp_path):
    snap = read_snapshot(pi5(tmp_path, 84.0, "50005"))
    text = describe(snap, level_of(snap))
    assert "power        no battery, AC unknown" in text
    assert "CPU 84.0 °C  [thermal_zone0 (cpu-thermal) 84.0 °C]" in text
    assert "0x50005: now under-voltage, throttled; since boot under-voltage, throttled" in text
    assert "load         unknown" in text and "  - load: proc/loadavg unreadable" in text
    assert text.endswith("budget: low = 3 bits, pausing 1.00 s after each token\n  because no battery (mains); "
                         "CPU 84 °C ≥ 83 °C → low; pacing 1.00 s per token")


def test_describe_empty_root(tmp_path):
    snap = read_snapshot(tmp_path)
    text = describe(snap, level_of(snap))
    assert "battery unknown, AC unknown" in text and "temperature  unknown" in text and "Pi flags     unknown" in text
    assert "budget: mid = 4 bits\n  because power source unknown → mid" in text


# ---- --kv-bits auto ---------------------------------------------------------------------------------

CACHE_MB = {8: 100.0, 4: 54.0}  # SmolLM2's whole 8,192-position context at 8 and 4 bits


@pytest.mark.parametrize("celsius,throttled,available,bits,why", [
    (55.0, "0", 3000.0, 8, "3000 MB available, 100 MB for the context at 8 bits → 8 bits"),
    (55.0, "0", 399.0, 4, "8-bit cache 100 MB > 25% of 399 MB available → 4 bits (54 MB)"),
    (55.0, "0", 401.0, 8, "401 MB available"),
    (79.0, "0", 3000.0, 4, "CPU 79 °C ≥ 78 °C → 4 bits"),
    (60.0, "0x4", 3000.0, 4, "Pi throttled now → 4 bits"),
    (55.0, "0", None, 8, "memory unknown"),
])
def test_kv_bits_auto_on_fake_pi_trees(tmp_path, celsius, throttled, available, bits, why):
    from mobiquant.runtime.budget import kv_bits_for

    snapshot = read_snapshot(fake_sysfs.pi5(tmp_path, celsius, throttled, available))
    assert snapshot.mem_available_mb == (None if available is None else pytest.approx(available, abs=1e-3))
    got, reason = kv_bits_for(snapshot, PolicyConfig(), CACHE_MB)
    assert got == bits and why in reason, reason


def test_kv_memory_share_is_a_policy_setting(tmp_path):
    from mobiquant.runtime.budget import kv_bits_for

    snapshot = read_snapshot(fake_sysfs.pi5(tmp_path, 50.0, available_mb=300.0))
    assert kv_bits_for(snapshot, PolicyConfig(), CACHE_MB)[0] == 4
    assert kv_bits_for(snapshot, PolicyConfig(kv_memory_share=0.5), CACHE_MB)[0] == 8
    with pytest.raises(BudgetError, match="0 < kv_memory_share <= 1"):
        PolicyConfig(kv_memory_share=0.0)


def test_meminfo_without_memavailable_is_a_note_not_a_guess(tmp_path):
    fake_sysfs.put(tmp_path, "proc/meminfo", "MemTotal: 1000 kB\n")
    snapshot = read_snapshot(tmp_path)
    assert snapshot.mem_available_mb is None
    assert any("has no MemAvailable" in n for n in snapshot.notes)
