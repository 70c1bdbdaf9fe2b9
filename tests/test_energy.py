"""Energy meters on fake sysfs trees: RAPL counters (with wraparound), board power
monitors (hwmon), the battery gauge (only while discharging), and the choice between them."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunefleet.agent.energy import (
    BatteryMeter,
    HwmonMeter,
    RaplMeter,
    estimate_j,
    find_meter,
)


def write(root: Path, files: dict[str, str | int]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"{text}\n")
    return root


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


RAPL = {
    "class/powercap/intel-rapl:0/name": "package-0",
    "class/powercap/intel-rapl:0/energy_uj": 999_000_000,
    "class/powercap/intel-rapl:0/max_energy_range_uj": 1_000_000_000,
    # A sub-zone (the cores) is part of its package: never counted twice.
    "class/powercap/intel-rapl:0:0/name": "core",
    "class/powercap/intel-rapl:0:0/energy_uj": 5_000_000,
    "class/powercap/intel-rapl:0:0/max_energy_range_uj": 1_000_000_000,
}


def test_rapl_counts_packages_not_their_sub_zones(tmp_path) -> None:
    root = write(tmp_path, RAPL)
    m = RaplMeter.find(root)
    assert m is not None and m.source == "rapl"
    assert m.joules() == 0.0
    write(root, {"class/powercap/intel-rapl:0/energy_uj": 999_500_000,
                 "class/powercap/intel-rapl:0:0/energy_uj": 9_000_000})
    assert m.joules() == pytest.approx(0.5)


def test_rapl_survives_the_counter_wrapping(tmp_path) -> None:
    root = write(tmp_path, RAPL)
    m = RaplMeter.find(root)
    assert m is not None and m.joules() == 0.0
    # 999 J → wraps at 1000 J → 2 J: 3 J were used.
    write(root, {"class/powercap/intel-rapl:0/energy_uj": 2_000_000})
    assert m.joules() == pytest.approx(3.0)
    write(root, {"class/powercap/intel-rapl:0/energy_uj": 2_250_000})
    assert m.joules() == pytest.approx(3.25)


def test_rapl_that_only_root_may_read_is_no_meter(tmp_path) -> None:
    root = write(tmp_path, {"class/powercap/intel-rapl:0/name": "package-0"})
    (root / "class/powercap/intel-rapl:0/energy_uj").mkdir()  # unreadable as a file
    assert RaplMeter.find(root) is None
    assert find_meter(root) is None


def test_psys_alone_when_the_platform_measures_the_whole_soc(tmp_path) -> None:
    root = write(tmp_path, {**RAPL, "class/powercap/intel-rapl:1/name": "psys",
                            "class/powercap/intel-rapl:1/energy_uj": 100,
                            "class/powercap/intel-rapl:1/max_energy_range_uj": 1000})
    m = RaplMeter.find(root)
    assert m is not None and [z.name for z in m.zones] == ["intel-rapl:1"]


def test_hwmon_power_monitors_integrate_microwatts_over_time(tmp_path) -> None:
    root = write(tmp_path, {
        "class/hwmon/hwmon0/name": "ina219",
        "class/hwmon/hwmon0/power1_input": 2_000_000,  # 2 W
        "class/hwmon/hwmon1/name": "amdgpu",  # a GPU's sensor says nothing about our CPU
        "class/hwmon/hwmon1/power1_input": 50_000_000,
    })
    clock = Clock()
    m = HwmonMeter.find(root, clock=clock)
    assert m is not None and m.source == "hwmon"
    assert m.joules() == 0.0
    clock.t = 1.0
    write(root, {"class/hwmon/hwmon0/power1_input": 4_000_000})
    assert m.joules() == pytest.approx(3.0)  # the trapezoid of 2 W → 4 W over 1 s


def test_an_ina3221_counts_its_total_rail(tmp_path) -> None:
    root = write(tmp_path, {
        "class/hwmon/hwmon2/name": "ina3221",
        "class/hwmon/hwmon2/in1_label": "VDD_IN", "class/hwmon/hwmon2/in1_input": 5000,
        "class/hwmon/hwmon2/curr1_input": 1000,  # 5 V times 1 A
        "class/hwmon/hwmon2/in2_label": "VDD_CPU_GPU_CV", "class/hwmon/hwmon2/in2_input": 5000,
        "class/hwmon/hwmon2/curr2_input": 400,  # part of VDD_IN: not added
    })
    clock = Clock()
    m = HwmonMeter.find(root, clock=clock)
    assert m is not None
    assert m.power_w() == pytest.approx(5.0)


BATTERY = {
    "class/power_supply/BAT0/type": "Battery",
    "class/power_supply/BAT0/status": "Discharging",
    "class/power_supply/BAT0/current_now": 500_000,  # 0.5 A
    "class/power_supply/BAT0/voltage_now": 12_000_000,  # 12 V
}


def test_a_discharging_battery_measures_current_times_voltage(tmp_path) -> None:
    root = write(tmp_path, BATTERY)
    clock = Clock()
    m = BatteryMeter.find(root, clock=clock)
    assert m is not None and m.source == "battery"
    assert m.power_w() == pytest.approx(6.0)
    assert m.joules() == 0.0
    clock.t = 2.0
    assert m.joules() == pytest.approx(12.0)
    write(root, {"class/power_supply/BAT0/power_now": 3_000_000})  # power_now when given
    assert m.power_w() == pytest.approx(3.0)


def test_a_charging_battery_is_not_used(tmp_path) -> None:
    root = write(tmp_path, {**BATTERY, "class/power_supply/BAT0/status": "Charging"})
    m = BatteryMeter.find(root, clock=Clock())
    assert m is not None
    assert m.power_w() is None and m.joules() is None


def test_a_peripheral_battery_is_no_meter(tmp_path) -> None:
    root = write(tmp_path, {**BATTERY, "class/power_supply/BAT0/scope": "Device"})
    assert BatteryMeter.find(root) is None


def test_the_best_meter_wins_and_none_means_the_estimate(tmp_path) -> None:
    root = write(tmp_path, {**RAPL, **BATTERY, "class/hwmon/hwmon0/name": "ina226",
                            "class/hwmon/hwmon0/power1_input": 1_000_000})
    assert find_meter(root).source == "rapl"
    assert find_meter(root, prefer="battery").source == "battery"
    assert find_meter(root, prefer="estimate") is None
    assert find_meter(tmp_path / "empty") is None
    assert estimate_j(0.002, 10.0) == pytest.approx(0.02)  # 2 ms of CPU at 10 W
