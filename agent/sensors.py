"""What the device knows about itself: battery, load, memory, temperature, and the clock.

Two seams, each a small Protocol with a real and a simulated implementation:

- the clock: :class:`prunefleet.shared.clock.Clock` (``SystemClock``, or ``FakeClock`` in tests).
- :class:`Sensors`: :class:`SystemSensors` (psutil and Linux sysfs) and
  :class:`SimulatedSensors` (a :class:`SimulatedBattery` drained by the energy of each
  inference, plus load patterns), for tests and the demo.

A reading that cannot be taken is ``None``, never an exception: a desktop has no battery,
a container often has no thermal zones, and the policy treats ``None`` as "no news".
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prunefleet.shared.clock import Clock, SystemClock

__all__ = [
    "Readings",
    "Sensors",
    "SimulatedBattery",
    "SimulatedSensors",
    "SystemSensors",
    "make_sensors",
]


@dataclass(frozen=True, kw_only=True)
class Readings:
    """One snapshot of the device; ``None`` where the value is unknown. ``ts`` is wall time."""

    battery_percent: float | None = None
    charging: bool | None = None
    cpu_percent: float | None = None
    mem_available_percent: float | None = None
    temperature_c: float | None = None
    ts: float


class Sensors(Protocol):
    def read(self) -> Readings: ...


# --- real sensors -----------------------------------------------------------------------

# Thermal zones report millidegrees; values outside this range are a driver's "no reading".
_PLAUSIBLE_C = (-40.0, 150.0)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _read_float(path: Path) -> float | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class SystemSensors:
    """Readings from psutil (CPU, memory) and sysfs (battery, power, temperature).

    ``sysfs_root`` is the directory that holds ``class/power_supply`` and
    ``class/thermal``; tests point it at a fake tree.
    """

    def __init__(self, sysfs_root: str | Path = "/sys", clock: Clock | None = None) -> None:
        # Imported here so the policy and the simulated sensors work without psutil.
        import psutil

        self._psutil = psutil
        self._root = Path(sysfs_root)
        self._clock = clock or SystemClock()
        # The first non-blocking call has no previous sample and returns a meaningless 0.0.
        self._safe(lambda: psutil.cpu_percent(interval=None))

    def read(self) -> Readings:
        battery_percent, charging = self._power()
        return Readings(
            battery_percent=battery_percent,
            charging=charging,
            cpu_percent=self._safe(lambda: float(self._psutil.cpu_percent(interval=None))),
            mem_available_percent=self._safe(self._mem_available_percent),
            temperature_c=self._temperature_c(),
            ts=self._clock.time(),
        )

    @staticmethod
    def _safe(read: Callable[[], float]) -> float | None:
        try:
            return read()
        except Exception:  # psutil raises several types on restricted systems
            return None

    def _mem_available_percent(self) -> float:
        vm = self._psutil.virtual_memory()
        return 100.0 * vm.available / vm.total

    def _power(self) -> tuple[float | None, bool | None]:
        """Mean capacity of system batteries, and whether external power is present."""
        capacities: list[float] = []
        charging: bool | None = None
        try:
            supplies = sorted((self._root / "class" / "power_supply").iterdir())
        except OSError:
            return None, None
        for supply in supplies:
            kind = _read_text(supply / "type")
            if kind == "Battery":
                # Peripherals (a wireless mouse) report scope "Device"; they do not power us.
                if _read_text(supply / "scope") == "Device":
                    continue
                capacity = _read_float(supply / "capacity")
                if capacity is None:
                    capacity = self._capacity_from_energy(supply)
                if capacity is not None:
                    capacities.append(min(max(capacity, 0.0), 100.0))
                status = _read_text(supply / "status")
                if status in ("Charging", "Full"):
                    charging = True
                elif status in ("Discharging", "Not charging") and charging is None:
                    charging = False
            elif kind is not None:
                online = _read_float(supply / "online")
                if online is None:
                    continue
                if online > 0:
                    charging = True
                elif charging is None:
                    charging = False
        battery = sum(capacities) / len(capacities) if capacities else None
        return battery, charging

    @staticmethod
    def _capacity_from_energy(supply: Path) -> float | None:
        for now_name, full_name in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
            now = _read_float(supply / now_name)
            full = _read_float(supply / full_name)
            if now is not None and full:
                return 100.0 * now / full
        return None

    def _temperature_c(self) -> float | None:
        temps: list[float] = []
        for path in (self._root / "class" / "thermal").glob("thermal_zone*/temp"):
            milli = _read_float(path)
            if milli is None:
                continue
            c = milli / 1000.0
            if _PLAUSIBLE_C[0] <= c <= _PLAUSIBLE_C[1]:
                temps.append(c)
        return max(temps) if temps else None


# --- simulated sensors ------------------------------------------------------------------


class SimulatedBattery:
    """A battery holding ``capacity_j`` joules, drained by inference and by idling.

    ``consume`` subtracts the energy of one inference; ``idle_drain_w`` is subtracted for
    the time elapsed on ``clock``. While ``charging`` it gains ``charge_w`` and nothing
    drains it (the charger covers the load). Thread-safe.
    """

    def __init__(
        self,
        capacity_j: float,
        initial_percent: float = 100.0,
        *,
        idle_drain_w: float = 0.0,
        charging: bool = False,
        charge_w: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        if capacity_j <= 0:
            raise ValueError(f"capacity_j must be positive, got {capacity_j}")
        if not 0.0 <= initial_percent <= 100.0:
            raise ValueError(f"initial_percent must be in [0, 100], got {initial_percent}")
        if idle_drain_w < 0 or charge_w < 0:
            raise ValueError("idle_drain_w and charge_w must not be negative")
        self.capacity_j = float(capacity_j)
        self.idle_drain_w = float(idle_drain_w)
        self.charge_w = float(charge_w)
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._energy_j = self.capacity_j * initial_percent / 100.0
        self._charging = charging
        self._consumed_j = 0.0
        self._last = self._clock.monotonic()

    def _settle(self) -> None:
        """Apply idle drain or charge for the time since the last update (lock held)."""
        now = self._clock.monotonic()
        elapsed = max(now - self._last, 0.0)
        self._last = now
        if self._charging:
            self._energy_j = min(self._energy_j + self.charge_w * elapsed, self.capacity_j)
        else:
            self._energy_j = max(self._energy_j - self.idle_drain_w * elapsed, 0.0)

    def consume(self, joules: float) -> None:
        """Take the energy of one unit of work (joules >= 0) from the battery."""
        if joules < 0:
            raise ValueError(f"cannot consume negative energy ({joules} J)")
        with self._lock:
            self._settle()
            self._consumed_j += joules
            if not self._charging:
                self._energy_j = max(self._energy_j - joules, 0.0)

    @property
    def energy_j(self) -> float:
        with self._lock:
            self._settle()
            return self._energy_j

    @property
    def percent(self) -> float:
        return 100.0 * self.energy_j / self.capacity_j

    @property
    def consumed_j(self) -> float:
        """Total energy passed to :meth:`consume`, charging or not (for telemetry)."""
        with self._lock:
            return self._consumed_j

    @property
    def charging(self) -> bool:
        with self._lock:
            return self._charging

    @charging.setter
    def charging(self, value: bool) -> None:
        with self._lock:
            self._settle()
            self._charging = value

    def set_percent(self, percent: float) -> None:
        """Jump to ``percent`` (tests and demo scripts)."""
        with self._lock:
            self._settle()
            self._energy_j = self.capacity_j * min(max(percent, 0.0), 100.0) / 100.0


# A simulated value: constant, unknown (None), or a function of seconds since start.
SimValue = float | None | Callable[[float], float | None]


class SimulatedSensors:
    """Readings from a :class:`SimulatedBattery` and configurable load.

    ``cpu_percent``, ``mem_available_percent`` and ``temperature_c`` each take a constant,
    ``None`` (unknown), or a callable of the seconds elapsed since this object was made,
    for load patterns. Without a battery the readings report none (mains powered).
    """

    def __init__(
        self,
        battery: SimulatedBattery | None = None,
        *,
        cpu_percent: SimValue = 10.0,
        mem_available_percent: SimValue = 60.0,
        temperature_c: SimValue = 45.0,
        clock: Clock | None = None,
    ) -> None:
        self.battery = battery
        self.cpu_percent = cpu_percent
        self.mem_available_percent = mem_available_percent
        self.temperature_c = temperature_c
        self._clock = clock or SystemClock()
        self._start = self._clock.monotonic()

    def _value(self, value: SimValue, elapsed: float) -> float | None:
        v = value(elapsed) if callable(value) else value
        return None if v is None else float(v)

    def read(self) -> Readings:
        elapsed = self._clock.monotonic() - self._start
        cpu = self._value(self.cpu_percent, elapsed)
        mem = self._value(self.mem_available_percent, elapsed)
        return Readings(
            battery_percent=self.battery.percent if self.battery else None,
            charging=self.battery.charging if self.battery else None,
            cpu_percent=None if cpu is None else min(max(cpu, 0.0), 100.0),
            mem_available_percent=None if mem is None else min(max(mem, 0.0), 100.0),
            temperature_c=self._value(self.temperature_c, elapsed),
            ts=self._clock.time(),
        )


# --- factory ----------------------------------------------------------------------------

_SYSTEM_PARAMS = frozenset({"sysfs_root", "clock"})
_BATTERY_PARAMS = frozenset({"initial_percent", "idle_drain_w", "charging", "charge_w"})
_LOAD_PARAMS = frozenset({"cpu_percent", "mem_available_percent", "temperature_c"})
_SIMULATED_PARAMS = _BATTERY_PARAMS | _LOAD_PARAMS | {"capacity_j", "clock"}


def make_sensors(kind: str, **params: Any) -> Sensors:
    """Build the sensors named in the config: ``"system"`` or ``"simulated"``.

    ``system`` takes ``sysfs_root``. ``simulated`` takes the battery's ``capacity_j`` (omit
    it for no battery), ``initial_percent``, ``idle_drain_w``, ``charging`` and ``charge_w``
    (as :class:`SimulatedBattery`), and ``cpu_percent``, ``mem_available_percent`` and
    ``temperature_c`` (as :class:`SimulatedSensors`). Both take ``clock``.
    Unknown kinds or parameters raise ``ValueError`` naming what is accepted.
    """
    if kind == "system":
        _check_params(kind, params, _SYSTEM_PARAMS)
        return SystemSensors(**params)
    if kind == "simulated":
        _check_params(kind, params, _SIMULATED_PARAMS)
        clock = params.get("clock")
        battery = None
        if params.get("capacity_j") is not None:
            battery = SimulatedBattery(
                params["capacity_j"],
                params.get("initial_percent", 100.0),
                idle_drain_w=params.get("idle_drain_w", 0.0),
                charging=params.get("charging", False),
                charge_w=params.get("charge_w", 0.0),
                clock=clock,
            )
        elif set(params) & _BATTERY_PARAMS:
            raise ValueError(
                f"{', '.join(sorted(set(params) & _BATTERY_PARAMS))} given without capacity_j"
            )
        load = {k: params[k] for k in _LOAD_PARAMS if k in params}
        return SimulatedSensors(battery, clock=clock, **load)
    raise ValueError(f"unknown sensors kind {kind!r}: expected 'system' or 'simulated'")


def _check_params(kind: str, params: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) for {kind!r} sensors: {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(allowed))}"
        )
