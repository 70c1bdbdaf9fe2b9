"""Device facts from fake /proc and /sys trees: an x86 server and an arm64 board."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunefleet.agent.config import AgentConfig
from prunefleet.agent.devicefacts import DEFAULT_ACTIVE_POWER_W, derive_class, read_facts
from prunefleet.shared.errors import PrunefleetError
from prunefleet.shared.messages import ReportedState, decode

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
flags\t\t: fpu vme lm sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
flags\t\t: fpu vme lm sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni
"""

ARM_CPUINFO = "".join(f"""processor\t: {i}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0b

""" for i in range(4)) + "Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n"


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_an_x86_server_reports_its_isa_cores_memory_and_a_derived_class(tmp_path) -> None:
    root = tree(tmp_path, {"proc/cpuinfo": X86_CPUINFO,
                           "proc/meminfo": "MemTotal:       16384000 kB\nMemFree: 1 kB\n",
                           "sys/devices/system/cpu/online": "0-1\n"})
    f = read_facts(root, ort_version="1.20.0", providers=["CPUExecutionProvider"])
    assert f.arch == "x86_64"
    assert f.cpu_model == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    assert f.isa == ["avx2", "avx512", "avx512vnni"]
    assert (f.cores, f.memory_mb) == (2, 16000)
    assert f.device_class == "x86_64-avx512vnni-2c"
    assert (f.ort_version, f.providers) == ("1.20.0", ["CPUExecutionProvider"])
    assert f.active_power_w == DEFAULT_ACTIVE_POWER_W["x86_64"]


def test_an_arm64_board_reports_neon_and_dot_product(tmp_path) -> None:
    root = tree(tmp_path, {"proc/cpuinfo": ARM_CPUINFO,
                           "proc/meminfo": "MemTotal:        8245000 kB\n"})
    f = read_facts(root, ort_version=None, providers=[])
    assert f.arch == "aarch64"
    assert f.cpu_model == "Raspberry Pi 5 Model B Rev 1.0"
    assert f.isa == ["dotprod", "fp16", "neon"]
    assert f.cores == 4  # no cpu/online file: the processors listed
    assert f.device_class == "aarch64-dotprod-4c"
    assert f.active_power_w == DEFAULT_ACTIVE_POWER_W["aarch64"]


def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path) -> None:
    root = tree(tmp_path, {"proc/cpuinfo": X86_CPUINFO,
                           "sys/devices/system/cpu/online": "0-15\n",
                           "sys/fs/cgroup/cpu.max": "100000 100000\n"})
    assert read_facts(root, ort_version=None, providers=[]).cores == 1


def test_the_configured_class_and_active_power_win(tmp_path) -> None:
    root = tree(tmp_path, {"proc/cpuinfo": ARM_CPUINFO})
    f = read_facts(root, device_class="rpi5", ort_version=None, providers=[],
                   active_power_by_class={"rpi5": 1.6})
    assert (f.device_class, f.active_power_w) == ("rpi5", 1.6)
    assert read_facts(root, active_power=0.9, ort_version=None,
                      providers=[]).active_power_w == 0.9
    with pytest.raises(PrunefleetError, match="device class"):
        AgentConfig(device_id="d", device_class="no/slash")


def test_a_machine_without_proc_still_has_facts(tmp_path) -> None:
    f = read_facts(tmp_path, ort_version=None, providers=[])
    assert f.cores >= 1 and f.device_class.endswith(f"-{f.cores}c")
    assert derive_class("x86_64", ["avx2"], 8) == "x86_64-avx2-8c"


def test_facts_travel_in_the_reported_state(tmp_path) -> None:
    root = tree(tmp_path, {"proc/cpuinfo": X86_CPUINFO})
    f = read_facts(root, ort_version="1.20.0", providers=["CPUExecutionProvider"])
    r = decode(ReportedState, ReportedState(device_id="d", online=True, facts=f).encode())
    assert r.facts == f
