"""Energy meters: where the device can measure its own energy, and the estimate where not.

Every figure carries its source (:data:`~prunefleet.shared.messages.EnergySource`):

- ``rapl``: the CPU package's energy counters (``/sys/class/powercap/*/energy_uj``,
  Intel and AMD), cumulative microjoules that wrap at ``max_energy_range_uj``. The
  package only, not the board; often readable by root alone.
- ``hwmon``: a power monitor on the board (``/sys/class/hwmon/*/power*_input``, microwatts:
  the INA219/INA226 of Raspberry Pi power HATs; the INA3221 of Jetson boards reports volts
  and amperes per rail). The whole board or rail, sampled and integrated over time.
- ``battery``: the battery's own gauge (``power_now``, or ``current_now * voltage_now``),
  only while it is discharging: a charging battery says nothing about the load.
- ``cpu_time_estimate``: no meter: CPU time times the device's active power (watts per busy
  core, from the configuration or the defaults in :mod:`.devicefacts`).

A meter is a cumulative counter of joules since it was made (:meth:`EnergyMeter.joules`);
the profiler reads it around its measurement slices and subtracts the idle power it
measured before. Readers take the sysfs root so tests run them on fake trees. A reading
that cannot be taken is ``None``, never an exception.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from prunefleet.shared.messages import EnergySource

__all__ = [
    "BatteryMeter",
    "EnergyMeter",
    "HwmonMeter",
    "RaplMeter",
    "estimate_j",
    "find_meter",
]

# Chips whose power sensors measure a GPU, not what runs our inference.
_GPU_HWMON = frozenset({"amdgpu", "radeon", "nouveau", "i915", "xe"})


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii", errors="replace").strip())
    except (OSError, ValueError):
        return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def estimate_j(cpu_s: float, active_power_w: float) -> float:
    """Energy of ``cpu_s`` seconds of CPU time on a core that draws ``active_power_w``
    over idle while busy."""
    return max(cpu_s, 0.0) * active_power_w


class EnergyMeter(Protocol):
    source: EnergySource
    # Shortest busy window whose energy the meter resolves (its update interval).
    min_window_s: float

    def joules(self) -> float | None:
        """Joules since the meter was made; None when it cannot be read now."""
        ...


class RaplMeter:
    """The CPU package's RAPL counters, summed over packages, with wraparound.

    Only top-level zones count (``intel-rapl:0``, not its sub-zones ``intel-rapl:0:0``,
    which are part of it); ``psys`` (the whole SoC) alone when the platform has it.
    """

    source: EnergySource = "rapl"
    min_window_s = 0.05

    def __init__(self, zones: list[Path]) -> None:
        self.zones = zones
        self._last: dict[Path, int] = {}
        self._range: dict[Path, int] = {z: _read_int(z / "max_energy_range_uj") or 0
                                        for z in zones}
        self._total_uj = 0
        for z in zones:
            raw = _read_int(z / "energy_uj")
            if raw is not None:
                self._last[z] = raw

    @classmethod
    def find(cls, sysfs_root: str | Path = "/sys") -> RaplMeter | None:
        base = Path(sysfs_root) / "class" / "powercap"
        try:
            dirs = sorted(base.iterdir())
        except OSError:
            return None
        top = [d for d in dirs if d.name.startswith("intel-rapl:") and d.name.count(":") == 1
               and _read_int(d / "energy_uj") is not None]
        psys = [d for d in top if _read_text(d / "name") == "psys"]
        zones = psys or top
        return cls(zones) if zones else None

    def joules(self) -> float | None:
        for z in self.zones:
            raw = _read_int(z / "energy_uj")
            if raw is None:
                return None
            last = self._last.get(z)
            self._last[z] = raw
            if last is None:
                continue
            delta = raw - last
            if delta < 0:  # the counter wrapped
                delta += self._range[z]
            self._total_uj += max(delta, 0)
        return self._total_uj / 1e6


class _PowerIntegrator:
    """A power sensor (watts now) integrated over time into joules (trapezoids)."""

    source: EnergySource
    min_window_s: float

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.monotonic
        self._total_j = 0.0
        self._last: tuple[float, float] | None = None  # (t, watts)

    def power_w(self) -> float | None:
        raise NotImplementedError

    def joules(self) -> float | None:
        p = self.power_w()
        t = self._clock()
        if p is None:
            self._last = None
            return None
        if self._last is not None:
            t0, p0 = self._last
            self._total_j += (p0 + p) / 2.0 * max(t - t0, 0.0)
        self._last = (t, p)
        return self._total_j


class HwmonMeter(_PowerIntegrator):
    """Board power monitors: ``power*_input`` (µW) of every chip but GPUs, summed; an
    INA3221 (volts and amperes per rail) by its ``VDD_IN`` rail, else all rails."""

    source: EnergySource = "hwmon"
    min_window_s = 0.5

    def __init__(self, power_files: list[Path], rails: list[tuple[Path, Path]],
                 clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.power_files = power_files
        self.rails = rails  # (in*_input mV, curr*_input mA)

    @classmethod
    def find(cls, sysfs_root: str | Path = "/sys", clock: Callable[[], float] | None = None,
             chips: list[str] | None = None) -> HwmonMeter | None:
        """``chips``: only these hwmon names (the configuration's ``hwmon_chips``)."""
        base = Path(sysfs_root) / "class" / "hwmon"
        try:
            dirs = sorted(base.iterdir())
        except OSError:
            return None
        power: list[Path] = []
        rails: list[tuple[Path, Path]] = []
        for d in dirs:
            name = _read_text(d / "name") or ""
            if name in _GPU_HWMON or (chips and name not in chips):
                continue
            files = sorted(f for f in d.glob("power*_input") if _read_int(f) is not None)
            if files:
                power.extend(files)
                continue
            if name == "ina3221":
                chans = [(d / f"in{i}_input", d / f"curr{i}_input", _read_text(d / f"in{i}_label"))
                         for i in (1, 2, 3) if _read_int(d / f"curr{i}_input") is not None]
                total = [c for c in chans if c[2] == "VDD_IN"]
                rails.extend((v, a) for v, a, _ in (total or chans))
        return cls(power, rails, clock) if power or rails else None

    def power_w(self) -> float | None:
        total = 0.0
        for f in self.power_files:
            uw = _read_int(f)
            if uw is None:
                return None
            total += uw / 1e6
        for v, a in self.rails:
            mv, ma = _read_int(v), _read_int(a)
            if mv is None or ma is None:
                return None
            total += mv * ma / 1e6
        return total


class BatteryMeter(_PowerIntegrator):
    """System batteries' discharge power; no reading while any of them is not
    discharging (on a charger the battery does not see the load)."""

    source: EnergySource = "battery"
    min_window_s = 5.0  # fuel gauges update every few seconds

    def __init__(self, supplies: list[Path], clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.supplies = supplies

    @classmethod
    def find(cls, sysfs_root: str | Path = "/sys",
             clock: Callable[[], float] | None = None) -> BatteryMeter | None:
        base = Path(sysfs_root) / "class" / "power_supply"
        try:
            dirs = sorted(base.iterdir())
        except OSError:
            return None
        bats = [d for d in dirs if _read_text(d / "type") == "Battery"
                and _read_text(d / "scope") != "Device"
                and ((d / "power_now").exists() or (d / "current_now").exists())]
        return cls(bats, clock) if bats else None

    def power_w(self) -> float | None:
        total = 0.0
        for d in self.supplies:
            if _read_text(d / "status") != "Discharging":
                return None
            uw = _read_int(d / "power_now")
            if uw is None:
                ua, uv = _read_int(d / "current_now"), _read_int(d / "voltage_now")
                if ua is None or uv is None:
                    return None
                uw = round(abs(ua) * uv / 1e6)
            total += abs(uw) / 1e6
        return total


def find_meter(sysfs_root: str | Path = "/sys", prefer: str = "auto",
               hwmon_chips: list[str] | None = None) -> EnergyMeter | None:
    """The best meter this device has: RAPL, then a board monitor, then the battery; or
    the one ``prefer`` names (``"estimate"``: none). None: use the CPU-time estimate."""
    finders: dict[str, Callable[[], EnergyMeter | None]] = {
        "rapl": lambda: RaplMeter.find(sysfs_root),
        "hwmon": lambda: HwmonMeter.find(sysfs_root, chips=hwmon_chips),
        "battery": lambda: BatteryMeter.find(sysfs_root),
    }
    if prefer == "estimate":
        return None
    order = [prefer] if prefer in finders else list(finders)
    for name in order:
        meter = finders[name]()
        # A battery on its charger reads nothing now and may discharge later.
        if meter is not None and (meter.source == "battery" or meter.joules() is not None):
            return meter
    return None
