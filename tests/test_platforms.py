"""The agent on 64-bit ARM (system suite: ``make test-system``, ``pytest -m system``).

``test_agent_wheels_aarch64``  every requirement of ``prunefleet[agent]``, and everything they
    pull in, resolves to an aarch64 (or pure Python) wheel for each supported Python:
    ``pip download --only-binary=:all: --platform manylinux…_aarch64`` against the index this
    machine's pip is configured for. No package may need a compiler on a device.
``test_agent_in_debian_arm64_root``  a Debian bookworm arm64 root (debootstrap; qemu-user
    through binfmt_misc on an x86_64 host) gets a venv with ``prunefleet[agent]`` from this
    checkout's wheel and the aarch64 wheels; there the agent's own code loads an installed
    variant from its store (the smoke test on the golden input), refuses one whose golden
    output does not match, and serves one prediction that equals the host's.

Needs root (debootstrap, chroot, mount) and network to the Debian archive and the package
index; ``make test-system`` installs debootstrap, qemu-user-static and binfmt-support.
The root is cached in ``$PRUNEFLEET_ARM64_CACHE`` (default ``~/.cache/prunefleet-arm64-root``)
under a key that changes every month: the first run builds it (a few minutes), later runs
reuse it. The Debian mirror is ``$PRUNEFLEET_DEBIAN_MIRROR``, else the host's own Debian
apt source, else debootstrap's default.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx_models import mlp_spec
from packaging.utils import canonicalize_name, parse_wheel_filename

from prunefleet.agent.runtime import OnnxEngine, load_session
from prunefleet.agent.store import VariantStore
from prunefleet.shared.messages import Golden

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parent.parent

# Pythons the agent supports on a device: Debian 12 / Raspberry Pi OS bookworm ship 3.11,
# Ubuntu 24.04 3.12, Debian 13 / Raspberry Pi OS trixie 3.13.
PYTHONS = ["3.11", "3.12", "3.13"]
# glibc 2.28 or newer (Debian 10+, Ubuntu 20.04+, Raspberry Pi OS bullseye+): pip takes the
# platforms literally, so every manylinux level up to the floor is listed.
AARCH64_PLATFORMS = ["manylinux2014_aarch64"] + [
    f"manylinux_2_{minor}_aarch64" for minor in range(17, 29)
]
# The packages the issue names; the test also checks whatever they depend on.
AGENT_PACKAGES = {"onnxruntime", "numpy", "paho-mqtt", "psutil", "pydantic", "pydantic-core",
                  "cryptography"}

SUITE = "bookworm"
ROOT_RECIPE = 1  # bump when the way the root is built changes: the cache key changes with it
CACHE = Path(os.environ.get("PRUNEFLEET_ARM64_CACHE")
             or Path.home() / ".cache" / "prunefleet-arm64-root")
VENV = "/opt/prunefleet"  # the agent's venv inside the root


def _agent_requirements() -> list[str]:
    """What ``pip install 'prunefleet[agent]'`` asks for, read from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["agent"]]


def _download(dest: Path, requirements: list[str], python: str) -> dict[str, str]:
    """``pip download`` aarch64 wheels (with dependencies) for ``python``; returns
    {canonical name: file name}. Fails the test with pip's output when one is missing."""
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--dest", str(dest)]
    for plat in AARCH64_PLATFORMS:
        cmd += ["--platform", plat]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    try:
        done = subprocess.run([*cmd, *requirements], capture_output=True, text=True,
                              timeout=600, env=env, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip download for Python {python} took over 10 minutes", pytrace=False)
    if done.returncode != 0:
        out = "\n".join(line for line in (done.stdout + done.stderr).splitlines()
                        if "is ignored" not in line)
        pytest.fail(f"no aarch64 wheel set for Python {python}:\n{out[-4000:]}", pytrace=False)
    files: dict[str, str] = {}
    for f in sorted(dest.iterdir()):
        assert f.suffix == ".whl", f"pip download fetched a non-wheel: {f.name}"
        name, _, _, tags = parse_wheel_filename(f.name)
        plats = {t.platform for t in tags}
        assert plats == {"any"} or all("aarch64" in p for p in plats), (
            f"{f.name} is not an aarch64 or pure-Python wheel")
        files[str(canonicalize_name(name))] = f.name
    return files


@pytest.mark.timeout(900)
@pytest.mark.parametrize("python", PYTHONS)
def test_agent_wheels_aarch64(tmp_path: Path, python: str) -> None:
    files = _download(tmp_path, _agent_requirements(), python)
    missing = AGENT_PACKAGES - set(files)
    assert not missing, f"no wheel fetched for {sorted(missing)}: {sorted(files.values())}"
    # Compiled packages must be built for this Python (or its stable ABI), not a fallback.
    for name in ("onnxruntime", "numpy", "pydantic-core", "cryptography", "psutil"):
        _, _, _, tags = parse_wheel_filename(files[name])
        assert any(t.interpreter == f"cp{python.replace('.', '')}" or t.abi == "abi3"
                   for t in tags), files[name]


# -- the Debian arm64 root ----------------------------------------------------------------

def _run(cmd: list[str], timeout: float, what: str, **kw) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False, **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: no result after {timeout:.0f} s ({' '.join(cmd[:4])} …)",
                    pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}):\n"
                    f"{(done.stdout + done.stderr)[-4000:]}", pytrace=False)
    return done


def _apt_sources() -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of every enabled ``deb`` entry in the host's apt sources."""
    base = Path("/etc/apt")
    lists = [base / "sources.list", *sorted((base / "sources.list.d").glob("*.list"))]
    for path in lists:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    yield words[1], [words[2]]
    for path in sorted((base / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ", "\t")):
                        key, value = line.split(":", 1)
                        fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    yield uri, fields.get("suites", "").split()


def debian_mirror() -> str | None:
    """The Debian archive to debootstrap from: ``$PRUNEFLEET_DEBIAN_MIRROR``, else the host's
    own Debian source (``…/debian``, not the security archive), else None (debootstrap's
    default)."""
    if os.environ.get("PRUNEFLEET_DEBIAN_MIRROR"):
        return os.environ["PRUNEFLEET_DEBIAN_MIRROR"]
    for uri, _suites in _apt_sources():
        if re.match(r"https?://", uri) and uri.rstrip("/").rsplit("/", 1)[-1] == "debian":
            return uri
    return None


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target == prefix or target.startswith(prefix + "/"):
            out.append(target)
    return out


def _remove_tree(path: Path) -> None:
    """rm -r, but never through a mount (a bind mount would take host files with it)."""
    if not path.exists():
        return
    mounts = _mounts_under(path)
    if mounts:
        pytest.fail(f"will not remove {path}: still mounted there: {mounts}", pytrace=False)
    shutil.rmtree(path)


def _needs_emulation() -> bool:
    return platform.machine() not in ("aarch64", "arm64")


def _enable_binfmt() -> None:
    """qemu-aarch64 registered with binfmt_misc, with the F flag (the kernel opens the
    interpreter at registration, so it need not exist inside the root)."""
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], 60,
             "mounting binfmt_misc")
    _run(["update-binfmts", "--enable", "qemu-aarch64"], 60,
         "update-binfmts --enable qemu-aarch64 (is qemu-user-static installed?)")
    entry = (misc / "qemu-aarch64").read_text()
    assert entry.startswith("enabled"), entry
    flags = re.search(r"^flags: *(\S*)", entry, re.MULTILINE)
    assert flags is not None and "F" in flags.group(1), (
        f"qemu-aarch64 is registered without the F flag:\n{entry}")


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _root(timings: dict[str, float]) -> Path:
    """The cached arm64 root for this month, built with debootstrap when missing."""
    key = f"{SUITE}-arm64-{time.strftime('%Y-%m')}-r{ROOT_RECIPE}"
    root = CACHE / key
    for old in CACHE.iterdir():  # last month's roots, a build that was interrupted
        if old.is_dir() and old.name != key:
            _remove_tree(old)
    if (root / "usr" / "bin" / "python3").exists():
        return root
    partial = CACHE / f".{key}.partial"
    _remove_tree(partial)
    cmd = ["debootstrap", "--arch=arm64", "--variant=minbase",
           "--include=python3,python3-venv,ca-certificates", SUITE, str(partial)]
    mirror = debian_mirror()
    if mirror:
        cmd.append(mirror)
    t0 = time.monotonic()
    try:
        _run(cmd, 1800, f"debootstrap of a {SUITE} arm64 root from {mirror or 'its default'}")
    except BaseException:
        log = partial / "debootstrap" / "debootstrap.log"
        if log.exists():
            print(log.read_text()[-3000:])
        raise
    timings["debootstrap_s"] = time.monotonic() - t0
    partial.rename(root)
    return root


@contextlib.contextmanager
def _proc_mounted(root: Path) -> Iterator[None]:
    """A fresh procfs in the root (pip and Python want /proc). Never the host's /sys:
    ONNX Runtime's cpuinfo would read the x86 topology and crash under qemu."""
    target = root / "proc"
    _run(["mount", "-t", "proc", "proc", str(target)], 60, "mounting /proc in the root")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True,
                          check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def _chroot(root: Path, argv: list[str], timeout: float, what: str):
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root",
           "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    return _run(["chroot", str(root), *argv], timeout, what, env=env)


# Runs with the root's venv Python, under qemu: only the agent's installed code.
CHECK = r"""
import json, platform, sys, time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from prunefleet.agent.errors import InstallError
from prunefleet.agent.runtime import ModelPool, OnnxEngine
from prunefleet.agent.store import VariantStore
from prunefleet.shared.messages import Reason, VariantSpec

run = Path(sys.argv[1])
t0 = time.monotonic()
store = VariantStore(run / "state")
engine = OnnxEngine()
pool = ModelPool(engine=engine)
for name, spec in store.installed().items():
    pool.put(engine.load(store.path_of(spec.sha256), spec))  # session + smoke test
bad = VariantSpec.model_validate_json((run / "bad.json").read_text())
try:
    engine.load(run / "bad.onnx", bad)
    refused = None
except InstallError as e:
    refused = str(e)
x = np.load(run / "x.npy")
served = pool.run(x, lambda x, specs: ("mlp32", Reason.PINNED))
print(json.dumps({
    "machine": platform.machine(), "python": platform.python_version(),
    "onnxruntime": version("onnxruntime"), "numpy": version("numpy"),
    "loaded": sorted(pool.table), "refused": refused, "variant": served.variant,
    "label": served.label, "logits": served.logits.tolist(),
    "torch_imported": "torch" in sys.modules, "seconds": time.monotonic() - t0,
}))
"""


@pytest.mark.timeout(3600)
def test_agent_in_debian_arm64_root(tmp_path: Path) -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.fail("the arm64 root test needs root on Linux (debootstrap, chroot, mount); "
                    "run `sudo make test-system`", pytrace=False)
    timings: dict[str, float] = {}
    t_start = time.monotonic()
    if _needs_emulation():
        _enable_binfmt()

    # On the host: this checkout's wheel, and the aarch64 wheels it needs.
    wheels = tmp_path / "wheels"
    t0 = time.monotonic()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
          str(REPO)], 600, "building the prunefleet wheel")
    (wheel,) = wheels.glob("prunefleet-*.whl")
    timings["wheel_s"] = time.monotonic() - t0

    # On the host: the variants the agent will find installed, and the expected answer.
    state = tmp_path / "state"
    store = VariantStore(state)
    good = mlp_spec(tmp_path / "mlp32.onnx", "mlp32", 32, seed=3)
    shutil.copy(tmp_path / "mlp32.onnx", store.path_of(good.sha256))
    store.record(good)
    bad = mlp_spec(tmp_path / "bad.onnx", "mlp16", 16, seed=4)
    assert bad.golden is not None
    wrong = np.frombuffer(base64.b64decode(bad.golden.output_b64), np.float32) + 1
    bad = bad.model_copy(update={"golden": Golden(
        input_b64=bad.golden.input_b64, output_b64=base64.b64encode(wrong.tobytes()).decode())})
    x = np.random.default_rng(11).normal(0, 1, (2, 1, 8, 8)).astype(np.float32)
    host = OnnxEngine().infer(load_session(store.path_of(good.sha256), good), x)[0]

    with _cache_lock():
        t0 = time.monotonic()
        root = _root(timings)
        timings["root_s"] = time.monotonic() - t0
        python = os.readlink(root / "usr" / "bin" / "python3").removeprefix("python")
        t0 = time.monotonic()
        deps = _download(wheels, [f"{wheel}[agent]"], python)
        timings["download_s"] = time.monotonic() - t0

        run = root / "tmp" / f"prunefleet-check-{os.getpid()}"
        _remove_tree(run)
        try:
            shutil.copytree(wheels, run / "wheels")
            shutil.copytree(state, run / "state")
            shutil.copy(tmp_path / "bad.onnx", run / "bad.onnx")
            (run / "bad.json").write_text(bad.model_dump_json())
            np.save(run / "x.npy", x)
            (run / "check.py").write_text(CHECK)
            # The host's resolver and CA bundle, so pip or apt in the root reach what the
            # host reaches (the install below is offline, from the wheels fetched here).
            shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
            host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
            if host_ca.exists():
                shutil.copy(host_ca, root / "etc" / "ssl" / "certs" / "ca-certificates.crt")
            inside = f"/{run.relative_to(root)}"
            with _proc_mounted(root):
                # The venv with the dependencies is cached with the root; a different set
                # of dependency wheels builds it again.
                key = hashlib.sha256(
                    "\n".join(sorted(f for n, f in deps.items() if n != "prunefleet"))
                    .encode()).hexdigest()
                marker = root / VENV.lstrip("/") / ".prunefleet-deps"
                t0 = time.monotonic()
                if not marker.exists() or marker.read_text() != key:
                    _remove_tree(root / VENV.lstrip("/"))
                    _chroot(root, ["/usr/bin/python3", "-m", "venv", VENV], 600,
                            "creating the venv in the root")
                    _chroot(root, [f"{VENV}/bin/pip", "install", "-q", "--no-index",
                                   "--find-links", f"{inside}/wheels", "prunefleet[agent]"],
                            1200, "installing prunefleet[agent] in the root")
                    marker.write_text(key)
                    timings["venv_s"] = time.monotonic() - t0
                else:  # the same dependency wheels: only this checkout's code is new
                    _chroot(root, [f"{VENV}/bin/pip", "install", "-q", "--no-index",
                                   "--force-reinstall", "--no-deps",
                                   f"{inside}/wheels/{wheel.name}"],
                            600, "installing this checkout's prunefleet in the root")
                    timings["reinstall_s"] = time.monotonic() - t0
                t0 = time.monotonic()
                done = _chroot(root, [f"{VENV}/bin/python", f"{inside}/check.py", inside],
                               600, "the agent's check in the arm64 root")
                timings["check_s"] = time.monotonic() - t0
        finally:
            _remove_tree(run)

    result = json.loads(done.stdout.strip().splitlines()[-1])
    timings["total_s"] = time.monotonic() - t_start
    print(json.dumps({**{k: v for k, v in result.items() if k != "logits"},
                      **{k: round(v, 1) for k, v in timings.items()}}))
    assert result["machine"] == "aarch64"
    assert result["python"].startswith(python)
    assert result["loaded"] == ["mlp32"]  # the installed variant passed its smoke test
    assert result["refused"] and "differs from the golden output" in result["refused"]
    assert result["variant"] == "mlp32"
    assert result["torch_imported"] is False
    arm = np.asarray(result["logits"], dtype=np.float32)
    assert arm.shape == host.shape
    np.testing.assert_allclose(arm, host, rtol=1e-4, atol=1e-4)
    assert result["label"] == int(np.argmax(host[0]))
