"""Sensors: sysfs and psutil readers against a fake tree, the simulated battery, the factory."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from prunefleet.agent.sensors import (
    Readings,
    SimulatedBattery,
    SimulatedSensors,
    SystemSensors,
    make_sensors,
)
from prunefleet.shared.clock import FakeClock, SystemClock


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


LAPTOP = {
    "class/power_supply/BAT0/type": "Battery",
    "class/power_supply/BAT0/capacity": "57",
    "class/power_supply/BAT0/status": "Discharging",
    "class/power_supply/AC/type": "Mains",
    "class/power_supply/AC/online": "0",
    "class/thermal/thermal_zone0/temp": "45000",
    "class/thermal/thermal_zone1/temp": "61500",
    "class/thermal/thermal_zone2/temp": "garbage",
    "class/thermal/thermal_zone3/temp": "-273000",  # a driver's "no reading"
}


def test_reads_battery_power_and_hottest_zone(tmp_path: Path) -> None:
    clock = FakeClock(wall=1_700_000_123.0)
    r = SystemSensors(write_tree(tmp_path, LAPTOP), clock=clock).read()
    assert (r.battery_percent, r.charging, r.temperature_c) == (57.0, False, 61.5)
    assert r.ts == 1_700_000_123.0
    assert r.cpu_percent is not None and 0.0 <= r.cpu_percent <= 100.0
    assert r.mem_available_percent is not None and 0.0 < r.mem_available_percent <= 100.0


@pytest.mark.parametrize(
    ("changes", "charging"),
    [
        ({"class/power_supply/AC/online": "1"}, True),
        ({"class/power_supply/BAT0/status": "Charging"}, True),
        ({"class/power_supply/BAT0/status": "Full"}, True),
        ({"class/power_supply/BAT0/status": "Not charging"}, False),
        ({"class/power_supply/usb/type": "USB", "class/power_supply/usb/online": "1"}, True),
    ],
)
def test_charging_from_status_or_external_supply(
    tmp_path: Path, changes: dict[str, str], charging: bool
) -> None:
    root = write_tree(tmp_path, {**LAPTOP, **changes})
    assert SystemSensors(root).read().charging is charging


def test_batteries_are_averaged_and_peripherals_ignored(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "class/power_supply/BAT0/type": "Battery",
            "class/power_supply/BAT0/capacity": "40",
            # No capacity file: computed from energy.
            "class/power_supply/BAT1/type": "Battery",
            "class/power_supply/BAT1/energy_now": "30000000",
            "class/power_supply/BAT1/energy_full": "50000000",
            # A wireless mouse's battery does not power the device.
            "class/power_supply/hidpp_battery_0/type": "Battery",
            "class/power_supply/hidpp_battery_0/scope": "Device",
            "class/power_supply/hidpp_battery_0/capacity": "5",
        },
    )
    r = SystemSensors(root).read()
    assert r.battery_percent == pytest.approx(50.0)
    assert r.charging is None


def test_missing_sysfs_gives_none_not_errors(tmp_path: Path) -> None:
    r = SystemSensors(tmp_path / "does-not-exist").read()
    assert (r.battery_percent, r.charging, r.temperature_c) == (None, None, None)


def test_unreadable_entries_give_none(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "class/power_supply/BAT0/type": "Battery",
            "class/power_supply/BAT0/capacity": "n/a",
            "class/power_supply/AC/type": "Mains",  # no "online"
            "class/thermal/thermal_zone0/temp": "",
        },
    )
    (tmp_path / "class/thermal/thermal_zone1/temp").mkdir(parents=True)  # a directory
    r = SystemSensors(root).read()
    assert (r.battery_percent, r.charging, r.temperature_c) == (None, None, None)


def test_readings_are_immutable() -> None:
    r = Readings(battery_percent=50.0, ts=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.battery_percent = 10.0  # type: ignore[misc]
    assert r.cpu_percent is None


# --- clocks -------------------------------------------------------------------------------


def test_fake_clock_moves_only_when_advanced() -> None:
    clock = FakeClock(monotonic=5.0, wall=100.0)
    assert (clock.monotonic(), clock.time()) == (5.0, 100.0)
    clock.advance(2.5)
    assert (clock.monotonic(), clock.time()) == (7.5, 102.5)
    with pytest.raises(ValueError):
        clock.advance(-1.0)


def test_system_clock() -> None:
    clock = SystemClock()
    assert clock.monotonic() <= clock.monotonic()
    assert clock.time() > 1_600_000_000


# --- simulated battery --------------------------------------------------------------------


def test_battery_drains_by_consumed_energy() -> None:
    battery = SimulatedBattery(200.0, 50.0, clock=FakeClock())
    battery.consume(20.0)
    assert battery.percent == pytest.approx(40.0)
    assert battery.energy_j == pytest.approx(80.0)
    battery.consume(500.0)
    assert battery.percent == 0.0
    assert battery.consumed_j == pytest.approx(520.0)
    with pytest.raises(ValueError):
        battery.consume(-1.0)


def test_battery_idle_drain_follows_the_clock() -> None:
    clock = FakeClock()
    battery = SimulatedBattery(100.0, 100.0, idle_drain_w=2.0, clock=clock)
    assert battery.percent == 100.0
    clock.advance(10.0)
    assert battery.percent == pytest.approx(80.0)
    battery.consume(5.0)
    clock.advance(5.0)
    assert battery.percent == pytest.approx(65.0)
    clock.advance(1000.0)
    assert battery.percent == 0.0


def test_charging_battery_gains_and_is_not_drained() -> None:
    clock = FakeClock()
    battery = SimulatedBattery(100.0, 50.0, idle_drain_w=1.0, charge_w=2.0, clock=clock)
    battery.charging = True
    clock.advance(10.0)
    battery.consume(10.0)
    assert battery.percent == pytest.approx(70.0)
    clock.advance(100.0)
    assert battery.percent == 100.0
    battery.charging = False
    clock.advance(10.0)
    assert battery.percent == pytest.approx(90.0)


def test_battery_consume_is_thread_safe() -> None:
    battery = SimulatedBattery(1000.0, 100.0, clock=FakeClock())

    def work() -> None:
        for _ in range(2000):
            battery.consume(2**-6)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert battery.consumed_j == 250.0
    assert battery.energy_j == 750.0


def test_battery_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SimulatedBattery(0.0)
    with pytest.raises(ValueError):
        SimulatedBattery(10.0, 120.0)
    with pytest.raises(ValueError):
        SimulatedBattery(10.0, idle_drain_w=-1.0)


# --- simulated sensors --------------------------------------------------------------------


def test_simulated_sensors_follow_patterns_and_battery() -> None:
    clock = FakeClock()
    battery = SimulatedBattery(100.0, 80.0, clock=clock)
    sensors = SimulatedSensors(
        battery,
        cpu_percent=lambda t: 95.0 if t >= 5 else 150.0 if t >= 3 else 10.0,
        mem_available_percent=None,
        temperature_c=70.0,
        clock=clock,
    )
    r = sensors.read()
    assert (r.cpu_percent, r.battery_percent, r.charging) == (10.0, 80.0, False)
    assert (r.mem_available_percent, r.temperature_c) == (None, 70.0)
    clock.advance(3.0)
    assert sensors.read().cpu_percent == 100.0  # clamped
    battery.consume(30.0)
    battery.charging = True
    clock.advance(2.0)
    r = sensors.read()
    assert (r.cpu_percent, r.battery_percent, r.charging) == (95.0, 50.0, True)
    assert r.ts == clock.time()


def test_simulated_sensors_without_battery_report_none() -> None:
    r = SimulatedSensors(clock=FakeClock()).read()
    assert (r.battery_percent, r.charging) == (None, None)
    assert r.cpu_percent == 10.0


# --- factory ------------------------------------------------------------------------------


def test_factory_builds_system_sensors(tmp_path: Path) -> None:
    sensors = make_sensors("system", sysfs_root=write_tree(tmp_path, LAPTOP))
    assert isinstance(sensors, SystemSensors)
    assert sensors.read().battery_percent == 57.0


def test_factory_builds_simulated_sensors() -> None:
    clock = FakeClock()
    sensors = make_sensors(
        "simulated",
        capacity_j=100.0,
        initial_percent=60.0,
        idle_drain_w=1.0,
        cpu_percent=85.0,
        clock=clock,
    )
    assert isinstance(sensors, SimulatedSensors) and sensors.battery is not None
    clock.advance(10.0)
    r = sensors.read()
    assert (r.battery_percent, r.cpu_percent) == (pytest.approx(50.0), 85.0)
    assert make_sensors("simulated").read().battery_percent is None


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("sysfs", {}, "unknown sensors kind 'sysfs'"),
        ("system", {"capacity_j": 1.0}, "unknown parameter.*capacity_j"),
        ("simulated", {"sysfs_root": "/sys"}, "unknown parameter.*sysfs_root"),
        ("simulated", {"initial_percent": 50.0}, "without capacity_j"),
    ],
)
def test_factory_errors_name_the_problem(kind: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_sensors(kind, **params)
