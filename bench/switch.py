"""Switch latency: preloaded ONNX Runtime sessions (a reference swap) vs a session per switch.

    .venv/bin/python bench/switch.py [--quick] [--json PATH] [--variants DIR]

Two variant sets, each loaded into the agent's :class:`ModelPool`:

* **digits** (the figures in ``--json``): dense, struct50 and struct75 from
  ``prepare_digits`` (trained, real; cached in ``--variants``), 27-378 kB of ONNX;
* **mobilenetv2**: MobileNetV2-CIFAR (3x32x32, random weights), dense and with 50% and 75%
  of channels removed by the same structured pruning, 0.3-9 MB of ONNX: a device-sized
  model, for how the comparison scales (exported once with torch, cached).

Every request goes through the agent's request path: ``ModelPool.run`` reads the table
once, its chooser estimates the input's complexity and calls the real policy
(:func:`decide`) on sensor readings that flip between a full and a critical battery on
every request, so every request switches (dense <-> the smallest; a critical battery acts
without dwell). Measured per switching request, in the same run:

* **swap** (the ``--json`` figures ``switch_*`` and ``reload_p50_ms``): from the policy's
  decision to the chosen variant's session being ready to run. Preloaded, that is the
  table lookup; reloading, it is ``load_session`` (create + smoke test), as an agent
  without preloaded sessions would do on every switch.
* **decision -> served**: the swap plus that first request's inference, which is the
  same work in both designs.
* **whole request**: also the complexity estimate and the policy, which run on every
  request, switching or not; compared with the same variant served without a switch.

Targets (issue #5): switch p99 < 1 ms; >= 100x faster than reloading.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prunefleet.agent.complexity import Ewma, estimate_complexity
from prunefleet.agent.policy import PolicyConfig, VariantInfo, decide
from prunefleet.agent.runtime import ModelPool, load_session
from prunefleet.agent.sensors import Readings
from prunefleet.shared.messages import VariantSpec

DEFAULT_VARIANTS = Path(".prunefleet/bench/variants")
MOBILENET_DIR = Path(".prunefleet/bench/mobilenetv2")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} logical cores, {platform.machine()}, "
            f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}")


@dataclass
class VariantSet:
    name: str
    specs: dict[str, VariantSpec]
    paths: dict[str, Path]
    x: np.ndarray  # one input that counts as complex: a full battery gets the dense variant


def digits_set(out_dir: Path) -> VariantSet:
    """The digits variants (trained once, then cached) and a noisy test digit."""
    from prunefleet.server.fleet import spec_from_file
    from prunefleet.server.prepare import prepare_digits

    t0 = time.perf_counter()
    prepared = prepare_digits(out_dir, progress=False)
    print(f"digits: {', '.join(prepared.names)} in {out_dir} "
          f"({time.perf_counter() - t0:.1f} s; cached after the first run)")
    specs, paths = {}, {}
    for v in prepared.variants:
        specs[v.name] = spec_from_file(
            v.path, name=v.name, input_shape=v.input_shape, num_classes=v.num_classes,
            params=v.params, macs=v.macs, accuracy=v.accuracy, latency_ms=v.latency_ms_p50,
            technique=v.technique, golden=v.golden_spec(),
        )
        paths[v.name] = Path(v.path)
    with np.load(prepared.workload_path) as d:
        x = np.ascontiguousarray(d["x"][:1], dtype=np.float32)
    # A noisy digit (a "busy scene"): complex enough that a full battery gets dense.
    x = (x + np.random.default_rng(0).normal(0, 0.6, x.shape)).astype(np.float32)
    return VariantSet("digits", specs, paths, x)


def mobilenet_set(out_dir: Path) -> VariantSet:
    """MobileNetV2-CIFAR dense, struct50, struct75 (random weights), exported once."""
    from prunefleet.server.fleet import spec_from_file

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = out_dir / "meta.json"
    if not meta.exists():
        import torch

        from prunefleet.server.prepare.export import to_onnx_bytes
        from prunefleet.server.prepare.measure import count_macs, count_params
        from prunefleet.server.prepare.models import mobilenetv2_cifar
        from prunefleet.server.prepare.prune import prune_structured

        t0 = time.perf_counter()
        torch.manual_seed(0)
        dense = mobilenetv2_cifar().eval()
        example = torch.randn(1, 3, 32, 32)
        models = {"dense": dense,
                  "struct50": prune_structured(dense, example, 0.5),
                  "struct75": prune_structured(dense, example, 0.75)}
        info = {}
        for name, m in models.items():
            data, _, _ = to_onnx_bytes(m, example)
            (out_dir / f"{name}.onnx").write_bytes(data)
            info[name] = {"macs": count_macs(m, example), "params": count_params(m)}
        meta.write_text(json.dumps(info))
        print(f"mobilenetv2: exported to {out_dir} in {time.perf_counter() - t0:.1f} s")
    info = json.loads(meta.read_text())
    specs, paths = {}, {}
    for name, m in info.items():
        paths[name] = out_dir / f"{name}.onnx"
        specs[name] = spec_from_file(paths[name], name=name, input_shape=[1, 3, 32, 32],
                                     num_classes=10, params=m["params"], macs=m["macs"])
    x = np.random.default_rng(0).normal(0, 1, (1, 3, 32, 32)).astype(np.float32)
    return VariantSet("mobilenetv2", specs, paths, x)


def pct(a: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(a), q))


class Switcher:
    """The agent's choose step (complexity + policy) with readings set per request."""

    FULL = Readings(battery_percent=100.0, charging=False, cpu_percent=10.0, ts=0.0)
    CRITICAL = Readings(battery_percent=5.0, charging=False, cpu_percent=10.0, ts=0.0)

    def __init__(self, specs: dict[str, VariantSpec]) -> None:
        self.infos = [VariantInfo(s.name, s.macs, s.accuracy, s.latency_ms)
                      for s in specs.values()]
        self.config = PolicyConfig(min_dwell_s=0.0)
        self.ewma = Ewma(0.2)
        self.state = None
        self.readings = self.FULL
        self.decided_at = 0.0
        self.now = 0.0

    def choose(self, x, table):
        c = self.ewma.update(estimate_complexity(x))
        self.now += 0.02
        d = decide(self.readings, self.infos, c, None, None, self.state, self.now, self.config)
        self.state = d.state
        self.decided_at = time.perf_counter()
        return d.variant, d.reason


@dataclass
class Samples:
    decided: list[float]  # decision -> served, ms
    swap: list[float]  # decision -> session ready (served minus its inference), ms
    whole: list[float]  # the whole request, ms
    variant: list[str]

    def whole_of(self, name: str) -> list[float]:
        return [w for w, v in zip(self.whole, self.variant, strict=True) if v == name]


def run_preloaded(pool: ModelPool, sw: Switcher, x: np.ndarray, n: int,
                  readings: Readings | None = None) -> Samples:
    """``n`` requests; with ``readings`` None they alternate, so every request switches."""
    s = Samples([], [], [], [])
    last = None
    for i in range(n):
        sw.readings = readings or (Switcher.CRITICAL if i % 2 else Switcher.FULL)
        t0 = time.perf_counter()
        served = pool.run(x, sw.choose)
        t1 = time.perf_counter()
        if readings is None and served.variant == last:
            raise AssertionError(f"request {i} did not switch (still {last})")
        last = served.variant
        decided = (t1 - sw.decided_at) * 1000.0
        s.decided.append(decided)
        s.swap.append(max(decided - served.latency_ms, 0.0))
        s.whole.append((t1 - t0) * 1000.0)
        s.variant.append(served.variant)
    return s


def run_reload(vs: VariantSet, n: int) -> tuple[Samples, dict[str, list[float]]]:
    """Decision -> served when the chosen variant's session is created on the switch."""
    sw = Switcher(vs.specs)
    s = Samples([], [], [], [])
    by_variant: dict[str, list[float]] = {}
    current = None
    for i in range(n):
        sw.readings = Switcher.CRITICAL if i % 2 else Switcher.FULL
        t0 = time.perf_counter()
        name, _ = sw.choose(vs.x, None)
        t_dec = sw.decided_at
        current = None  # the old session goes, as it would without preloading
        current = load_session(vs.paths[name], vs.specs[name], 1)
        t_ready = time.perf_counter()
        current.session.run(None, {current.input_name: vs.x})
        t1 = time.perf_counter()
        s.decided.append((t1 - t_dec) * 1000.0)
        s.swap.append((t_ready - t_dec) * 1000.0)
        s.whole.append((t1 - t0) * 1000.0)
        s.variant.append(name)
        by_variant.setdefault(name, []).append((t1 - t_dec) * 1000.0)
    return s, by_variant


def measure(vs: VariantSet, n_switch: int, n_reload: int) -> dict[str, float]:
    pool = ModelPool()
    for name, spec in vs.specs.items():
        pool.put(load_session(vs.paths[name], spec, 1))
    sw = Switcher(vs.specs)
    run_preloaded(pool, sw, vs.x, 300)  # warm-up
    gc.collect()
    switching = run_preloaded(pool, sw, vs.x, n_switch)
    # The same requests without switching: on the dense variant, then on the smallest.
    steady = {}
    for readings in (Switcher.FULL, Switcher.CRITICAL):
        sw.readings = readings
        run_preloaded(pool, sw, vs.x, 50, readings)  # settle on that variant
        st = run_preloaded(pool, sw, vs.x, n_switch // 2, readings)
        steady[st.variant[0]] = st.whole
    reload, by_variant = run_reload(vs, n_reload)

    sizes = ", ".join(f"{n} {vs.paths[n].stat().st_size / 1e6:.2f} MB"
                      for n in sorted(vs.specs, key=lambda k: vs.specs[k].macs))
    print(f"\n{vs.name}: {sizes}; batch 1, 1 intra-op thread; dense <-> smallest on every "
          f"request")
    rows = [
        ("preloaded: decision -> served", switching.decided),
        ("preloaded: swap (no inference)", switching.swap),
        ("preloaded: whole switching request", switching.whole),
        *((f"steady: whole request on {k}, no switch", v) for k, v in steady.items()),
        ("reload: decision -> served", reload.decided),
        ("reload: swap (create + smoke test)", reload.swap),
        *((f"reload: decision -> served ({k})", v) for k, v in sorted(by_variant.items())),
    ]
    print(f"{'path':<46} {'n':>6} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for label, v in rows:
        print(f"{label:<46} {len(v):>6} {pct(v, 50):>9.4f} {pct(v, 99):>9.4f} {max(v):>9.4f}")
    r = {
        "switch_p50_ms": pct(switching.decided, 50),
        "switch_p99_ms": pct(switching.decided, 99),
        "reload_p50_ms": pct(reload.decided, 50),
        "swap_p50_ms": pct(switching.swap, 50),
        "swap_p99_ms": pct(switching.swap, 99),
        "reload_swap_p50_ms": pct(reload.swap, 50),
        "added_by_switch_ms": float(np.mean([
            pct(switching.whole_of(k), 50) - pct(v, 50) for k, v in steady.items()])),
    }
    print(f"switching adds {r['added_by_switch_ms'] * 1000:+.1f} us to a request's p50 "
          f"(vs the same variant without a switch)")
    print(f"reload / preloaded, p50: swap {r['reload_swap_p50_ms'] / r['swap_p50_ms']:,.0f}x; "
          f"decision -> served {r['reload_p50_ms'] / r['switch_p50_ms']:,.0f}x")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a reduced run (well under 2 min)")
    p.add_argument("--json", type=Path, help="write the digits swap figures to this file")
    p.add_argument("--variants", type=Path, default=DEFAULT_VARIANTS,
                   help=f"where the digits variants are prepared (default {DEFAULT_VARIANTS})")
    args = p.parse_args(argv)
    n_switch, n_reload = (2000, 60) if args.quick else (20000, 400)

    print(f"machine: {machine()}")
    digits = measure(digits_set(args.variants), n_switch, n_reload)
    mobile = measure(mobilenet_set(MOBILENET_DIR), n_switch // 2, n_reload // 4)

    swap_ratio = digits["reload_swap_p50_ms"] / digits["swap_p50_ms"]
    served_ratio = digits["reload_p50_ms"] / digits["switch_p50_ms"]
    print(f"\ntargets (digits): switch p99 < 1 ms "
          f"{'met' if digits['swap_p99_ms'] < 1 else 'MISSED'} ({digits['swap_p99_ms']:.4f} ms "
          f"swap, {digits['switch_p99_ms']:.4f} ms decision -> served); >= 100x faster than "
          f"reloading: {'met' if swap_ratio >= 100 else 'MISSED'} for the swap "
          f"({swap_ratio:,.0f}x); decision -> served {served_ratio:,.0f}x")
    m_swap = mobile["reload_swap_p50_ms"] / mobile["swap_p50_ms"]
    m_served = mobile["reload_p50_ms"] / mobile["switch_p50_ms"]
    print(f"mobilenetv2: swap {m_swap:,.0f}x faster than reloading, decision -> served "
          f"{m_served:,.0f}x; swap p99 {mobile['swap_p99_ms']:.4f} ms")
    if args.json:
        out = {"switch_p50_ms": round(digits["swap_p50_ms"], 5),
               "switch_p99_ms": round(digits["swap_p99_ms"], 5),
               "reload_p50_ms": round(digits["reload_swap_p50_ms"], 4)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
