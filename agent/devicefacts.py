"""What the device is: architecture, CPU, instruction-set features, cores, memory, ONNX
Runtime, and the device class the fleet groups it in.

Read from ``/proc`` and ``/sys`` under a root directory (tests pass a fake tree), once at
start; the agent reports them in the first reported state after each connection. The
device class is derived (``x86_64-avx512vnni-8c``, ``aarch64-dotprod-4c``) unless the
agent configuration names one: devices of one class are expected to run a variant at the
same speed, so the server aggregates their profiles per class.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable
from pathlib import Path

from prunefleet.shared.messages import DeviceFacts

__all__ = ["DEFAULT_ACTIVE_POWER_W", "active_power_w", "derive_class", "read_facts"]

# Flags as /proc/cpuinfo spells them → the names we report. x86 lists ``flags``, arm64
# ``Features`` (``asimd`` is NEON, ``asimddp`` the int8 dot product, ``i8mm`` the int8
# matrix multiply), 32-bit arm lists ``neon`` itself.
_ISA = {
    "avx2": "avx2",
    "avx512f": "avx512",
    "avx512_vnni": "avx512vnni",
    "avx512vnni": "avx512vnni",
    "avx_vnni": "avxvnni",
    "amx_int8": "amx",
    "asimd": "neon",
    "neon": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
    "asimdhp": "fp16",
}
# The best feature names the class, best first.
_CLASS_TIERS = ("amx", "avx512vnni", "avx512", "avxvnni", "avx2", "i8mm", "dotprod", "neon")

# Watts one busy core adds over idle, for the CPU-time estimate of energy where no meter
# measures it (docs/hardware.md says where these come from and how to calibrate them).
DEFAULT_ACTIVE_POWER_W = {
    "x86_64": 10.0,  # a desktop or laptop core at full load
    "aarch64": 1.0,  # Cortex-A72/A76 class (Raspberry Pi 4/5, Jetson CPU cores)
    "armv7l": 0.5,
    "riscv64": 0.5,
}
FALLBACK_ACTIVE_POWER_W = 5.0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _cpuinfo(text: str) -> tuple[dict[str, str], int]:
    """The first value of every key, and the number of ``processor`` entries."""
    fields: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            processors += 1
        fields.setdefault(key, value.strip())
    return fields, processors


def _online_cpus(text: str | None) -> int | None:
    """``0-3,6`` → 5."""
    if not text or not text.strip():
        return None
    n = 0
    try:
        for part in text.strip().split(","):
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
    except ValueError:
        return None
    return n if n > 0 else None


def _cgroup_cpus(root: Path) -> float | None:
    """The CPU quota of the cgroup (v2 ``cpu.max``), in cores; None when unlimited."""
    text = _read(root / "sys/fs/cgroup/cpu.max")
    if not text:
        return None
    quota, _, period = text.strip().partition(" ")
    try:
        return int(quota) / int(period or "100000") if quota != "max" else None
    except (ValueError, ZeroDivisionError):
        return None


def _arch(fields: dict[str, str], isa: set[str]) -> str:
    if "flags" in fields:
        return "x86_64" if " lm " in f" {fields['flags']} " else "i686"
    if "Features" in fields:
        return "aarch64" if "asimd" in fields["Features"].split() else "armv7l"
    if "isa" in fields and fields["isa"].startswith("rv64"):
        return "riscv64"
    return platform.machine() or "unknown"


def _cpu_model(fields: dict[str, str]) -> str | None:
    for key in ("model name", "Model", "Hardware", "cpu model", "uarch"):
        if fields.get(key):
            return fields[key][:128]
    if "CPU implementer" in fields and "CPU part" in fields:
        return f"arm implementer {fields['CPU implementer']} part {fields['CPU part']}"
    return None


def derive_class(arch: str, isa: Iterable[str], cores: int) -> str:
    """``<arch>-<best feature>-<cores>c``, e.g. ``x86_64-avx512vnni-2c``."""
    have = set(isa)
    tier = next((t for t in _CLASS_TIERS if t in have), "base")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{arch}-{tier}-{cores}c")
    return name[:64]


def active_power_w(arch: str, device_class: str, configured: float | None = None,
                   by_class: dict[str, float] | None = None) -> float:
    """Watts per busy core for the CPU-time estimate: the configured value, else the
    value set for the device class, else the architecture's default."""
    if configured is not None:
        return configured
    if by_class and device_class in by_class:
        return by_class[device_class]
    return DEFAULT_ACTIVE_POWER_W.get(arch, FALLBACK_ACTIVE_POWER_W)


def runtime_facts() -> tuple[str | None, list[str]]:
    """ONNX Runtime's version and execution providers (None, [] where it is missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, []
    return str(ort.__version__)[:32], [str(p)[:64] for p in ort.get_available_providers()][:16]


def read_facts(root: str | Path = "/", *, device_class: str | None = None,
               ort_version: str | None = None, providers: list[str] | None = None,
               active_power: float | None = None,
               active_power_by_class: dict[str, float] | None = None) -> DeviceFacts:
    """The device's facts from ``<root>/proc`` and ``<root>/sys``. ``ort_version`` and
    ``providers`` default to the installed ONNX Runtime's; ``device_class`` to the
    derived one; ``active_power`` (watts per busy core) to the class's, then the
    architecture's default."""
    root = Path(root)
    fields, processors = _cpuinfo(_read(root / "proc/cpuinfo") or "")
    raw = set((fields.get("flags") or fields.get("Features") or "").split())
    isa = sorted({_ISA[f] for f in raw if f in _ISA})
    arch = _arch(fields, raw)
    cores = _online_cpus(_read(root / "sys/devices/system/cpu/online")) or processors
    if not cores and root == Path("/"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    quota = _cgroup_cpus(root)
    if quota is not None:
        cores = max(1, min(cores or 1, int(quota + 0.5)))
    cores = max(1, cores or 1)
    memory_mb = None
    meminfo = _read(root / "proc/meminfo") or ""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    if m:
        memory_mb = int(m.group(1)) // 1024
    if ort_version is None and providers is None:
        ort_version, providers = runtime_facts()
    cls = device_class or derive_class(arch, isa, cores)
    return DeviceFacts(
        arch=arch[:32], cpu_model=_cpu_model(fields), isa=isa[:16], cores=cores,
        memory_mb=memory_mb, ort_version=ort_version, providers=list(providers or []),
        device_class=cls,
        active_power_w=active_power_w(arch, cls, active_power, active_power_by_class),
    )
