"""Gated rollouts benchmark: a good and a bad pruned variant through waves on real agents.

    python bench/rollout_gate.py [--quick] [--json PATH] [--agents N]

Real parts: one local mosquitto (``deploy/mosquitto/test.conf`` on a free loopback port),
the real server (``FleetService``: MQTT, rollouts, HTTP API, SQLite), and N real agents
(the agent's request path, ONNX Runtime sessions, shadow evaluation) as threads in this
process. A traffic thread sends each agent a stream of the scikit-learn digits test set
(8x8 images); the labels stay here, outside the agents.

Models (trained here with numpy, exported to ONNX):

* ``base``: a 64-128-10 MLP, what every agent runs first;
* ``struct50`` (the good one): ``base`` with half of its hidden units removed (structured
  pruning by L1 norm) and fine-tuned;
* ``struct95`` (the bad one): ``base`` with 95% of its hidden units removed and no
  fine-tuning: it loads and passes its golden smoke test, but answers differently.

Two rollouts with waves 25, 50, 100 (percent of the fleet) and the gate below: the good
one should complete; the bad one should halt in wave 1 with no device outside wave 1 ever serving
it. Every agent has an on-device profile of ``base`` before the stream starts (checked
through the server), and profiles each new variant under the stream; the gate's p95 ratio
(shadow-run p95 over the profile's) is judged wherever a wave's devices had one, and
``p95_ratio`` reports it per wave.

``shadow_overhead``: the agents' mean request latency (wall clock around
``Agent.predict``) with shadow evaluation on over off, measured at the end on the same
agents. Each agent in turn, alone evaluating, gets a paced stream (random arrivals, the
same for on and off) so that the worker finds the idle gaps a device leaves it and runs
its samples between requests, as on a device; on and off alternate in order block by
block. Back-to-back requests would leave the worker no gap: they would measure only the
sampling, never a shadow run.

Targets (issue #12): the good rollout completes; the bad one halts in its first wave with no
device outside it serving the variant; shadow_overhead <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distribution import start_mosquitto

from prunefleet.agent.config import load_config
from prunefleet.agent.errors import NoVariantError
from prunefleet.agent.service import Agent
from prunefleet.agent.shadow import ShadowEvaluator
from prunefleet.server.adminclient import AdminClient
from prunefleet.server.serve import FleetService, ServeOptions
from prunefleet.shared.messages import ShadowSpec

WAVES = [25, 50, 100]
GOOD, BAD = "struct50", "struct95"  # half the hidden units, fine-tuned; 95% gone, not tuned


# -- models -----------------------------------------------------------------------------------
def _data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    cut = int(0.7 * len(x))
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def _forward(w, x):
    h = np.maximum(x @ w["w1"] + w["b1"], 0)
    return h, h @ w["w2"] + w["b2"]


def _train(w, x, y, epochs: int, lr: float = 0.1):
    """Full-batch gradient descent on cross-entropy (small and quick)."""
    w = {k: v.copy() for k, v in w.items()}
    onehot = np.eye(10, dtype=np.float32)[y]
    for _ in range(epochs):
        h, z = _forward(w, x)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(x)
        gh = (g @ w["w2"].T) * (h > 0)
        w["w2"] -= lr * h.T @ g
        w["b2"] -= lr * g.sum(0)
        w["w1"] -= lr * x.T @ gh
        w["b1"] -= lr * gh.sum(0)
    return w


def _prune(w, keep: float):
    """Structured pruning: keep the hidden units with the largest L1 norm of weights in."""
    n = w["w1"].shape[1]
    k = max(1, round(keep * n))
    order = np.argsort(-np.abs(w["w1"]).sum(0))[:k]
    return {"w1": w["w1"][:, order], "b1": w["b1"][order], "w2": w["w2"][order, :],
            "b2": w["b2"].copy()}


def _accuracy(w, x, y) -> float:
    return float((_forward(w, x)[1].argmax(1) == y).mean())


def _export(w, path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"]),
         helper.make_node("Relu", ["h"], ["hr"]),
         helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"])],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w[k].astype(np.float32), k) for k in ("w1", "b1", "w2", "b2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def make_models(work: Path, quick: bool) -> dict:
    xtr, ytr, xte, yte = _data()
    rng = np.random.default_rng(1)
    w0 = {"w1": rng.normal(0, 0.1, (64, 128)).astype(np.float32),
          "b1": np.zeros(128, np.float32),
          "w2": rng.normal(0, 0.1, (128, 10)).astype(np.float32),
          "b2": np.zeros(10, np.float32)}
    base = _train(w0, xtr, ytr, 300 if quick else 600, lr=0.5)
    good = _train(_prune(base, 0.5), xtr, ytr, 150 if quick else 300, lr=0.2)
    bad = _prune(base, 0.05)
    models: dict = {}
    for name, w in (("base", base), (GOOD, good), (BAD, bad)):
        models[name] = {"path": _export(w, work / f"{name}.onnx"),
                        "accuracy": _accuracy(w, xte, yte),
                        "macs": int(w["w1"].size + w["w2"].size)}
    models["test"] = (xte, yte)
    return models


# -- fleet ------------------------------------------------------------------------------------
class Traffic:
    """Live requests on every agent; per device, the variants that served it."""

    def __init__(self, agents: dict[str, Agent], x: np.ndarray) -> None:
        self.agents, self.x = agents, x
        self.served: dict[str, set[str]] = defaultdict(set)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(0.001):
            for d, agent in self.agents.items():
                x = self.x[i % len(self.x)].reshape(1, 1, 8, 8)
                i += 1
                try:
                    self.served[d].add(agent.predict(x).variant)
                except NoVariantError:
                    continue


def wait(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def wait_status(api: AdminClient, rid: int, statuses: set[str], timeout_s: float) -> dict:
    return wait(lambda: (lambda r: r if r["status"] in statuses else None)(api.rollout(rid)),
                timeout_s, f"rollout #{rid} to reach {statuses}")


def overhead(agents: dict[str, Agent], x: np.ndarray, blocks: int, n: int,
             gap_s: float, share: float = 0.05) -> dict:
    """Mean predict latency with shadow evaluation on over off (see the docstring above):
    per block and agent (a pair), ``n`` requests at random arrivals ``gap_s`` apart on
    average, with evaluation on and then off, or off and then on, on the same arrivals and
    inputs. The machine's other work stalls a request now and then for milliseconds, in
    either mode: ``ci90`` (pairs resampled) says how far that alone moves the ratio."""
    lat: dict[bool, list[float]] = {True: [], False: []}
    pairs: list[tuple[float, float]] = []  # (sum on, sum off) per pair
    spec = ShadowSpec(variants=[GOOD], sample_share=share, reference="base")
    evaluated = sampled = dropped = 0
    for b in range(blocks):
        for k, agent in enumerate(agents.values()):
            gaps = np.random.default_rng(1000 * b + k).exponential(gap_s, n)
            sums = {True: 0.0, False: 0.0}
            for mode in ((True, False) if (b + k) % 2 == 0 else (False, True)):
                ev: ShadowEvaluator = agent.shadow
                ev.configure(spec if mode else None, "base")
                if mode:
                    ev.start()
                    e0, s0, d0 = ev.evaluated_total, ev.sampled_total, ev.dropped_total
                due = time.perf_counter()
                for i in range(n):
                    due += gaps[i]
                    if (wait_s := due - time.perf_counter()) > 0:
                        time.sleep(wait_s)
                    xi = x[(b * n + i) % len(x)].reshape(1, 1, 8, 8)
                    t0 = time.perf_counter()
                    agent.predict(xi)
                    lat[mode].append(dt := time.perf_counter() - t0)
                    sums[mode] += dt
                if mode:  # samples still queued at the end are dropped, not counted
                    evaluated += ev.evaluated_total - e0
                    sampled += ev.sampled_total - s0
                    dropped += ev.dropped_total - d0
                ev.configure(None, None)
            pairs.append((sums[True], sums[False]))
    on, off = np.array(lat[True]) * 1e6, np.array(lat[False]) * 1e6
    sums_on, sums_off = np.array(pairs).T
    pick = np.random.default_rng(0).integers(0, len(pairs), (2000, len(pairs)))
    boot = sums_on[pick].sum(1) / sums_off[pick].sum(1)
    return {"ratio": float(on.mean() / off.mean()),
            "ci90": [round(float(v), 4) for v in np.percentile(boot, [5, 95])],
            "p50_ratio": round(float(np.median(on) / np.median(off)), 4),
            "mean_us": {"on": round(float(on.mean()), 2), "off": round(float(off.mean()), 2)},
            "p50_us": {"on": round(float(np.median(on)), 2),
                       "off": round(float(np.median(off)), 2)},
            "p99_us": {"on": round(float(np.percentile(on, 99)), 2),
                       "off": round(float(np.percentile(off, 99)), 2)},
            "requests_per_mode": int(on.size), "mean_gap_ms": gap_s * 1000,
            "sample_share": share, "sampled": sampled,
            "evaluated_between_requests": evaluated, "dropped": dropped}


def p95_ratios(r: dict, name: str) -> list[float | None]:
    """The gate's p95 ratio of ``name`` per wave (None: no profile known in that wave)."""
    return [w["variants"][name].get("p95_ratio") for w in r.get("waves", [])
            if name in w["variants"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer agents, smaller gate")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the figures here")
    p.add_argument("--agents", type=int, default=None, help="default 8 (quick) or 16")
    args = p.parse_args(argv)
    n_agents = args.agents or (8 if args.quick else 16)
    gate = {"min_agreement": 0.97, "max_error_rate": 0.01, "max_p95_ratio": 3.0,
            "min_requests": 150 if args.quick else 500, "observe_s": 90 if args.quick else 300,
            "sample_share": 0.2 if args.quick else 0.05}

    work = Path(tempfile.mkdtemp(prefix="pf-rollout-gate-"))
    models = make_models(work, args.quick)
    xte, _ = models["test"]
    broker, url = start_mosquitto(work)
    prefix = f"b{uuid.uuid4().hex[:8]}"
    svc = FleetService(ServeOptions(state_dir=work / "server", broker_url=url,
                                    listen="127.0.0.1:0", prefix=prefix, tick_s=0.2,
                                    client_id=f"pf-bench-{prefix}")).start()
    api = AdminClient(svc.url, svc.token, timeout_s=30)
    agents: dict[str, Agent] = {}
    stops = []
    try:
        for i in range(n_agents):
            d = f"dev-{i:02d}"
            cfg = load_config(None, env={}, device_id=d, broker_url=url, fleet_prefix=prefix,
                              state_dir=work / "agents" / d,
                              trusted_keys=[work / "server" / "keys" / "public.pem"],
                              telemetry_interval_s=1.0, sensors={"kind": "simulated"})
            agent = Agent(cfg)
            stop = threading.Event()
            threading.Thread(target=agent.run, kwargs={"until": stop}, daemon=True).start()
            agents[d] = agent
            stops.append(stop)
        wait(lambda: {x["device_id"] for x in api.devices() if x["online"]} >= set(agents),
             60, "agents online")
        for name in ("base", GOOD, BAD):
            m = models[name]
            api.register_variant(m["path"], name=name, macs=m["macs"], chunk_bytes=4096,
                                 accuracy=round(m["accuracy"], 4))
        r0 = api.create_rollout({"target": {"kind": "fleet"}, "variants": ["base"]})
        wait_status(api, r0["id"], {"completed"}, 120)
        # Each agent profiles what it installed before the stream starts (the server
        # knows once it is in the device's reported state).
        wait(lambda: all("base" in (api.device_profile(d)["profiles"] or {}) for d in agents),
             120, "profiles of base")

        traffic = Traffic(agents, xte)
        traffic.thread.start()
        t0 = time.monotonic()
        r1 = api.create_rollout({"target": {"kind": "fleet"}, "variants": [GOOD],
                                 "config": {"waves": WAVES, "gate": gate}})
        good = wait_status(api, r1["id"], {"completed", "halted"}, 3 * gate["observe_s"] + 60)
        good_s = time.monotonic() - t0
        # A halted good rollout still holds its devices: the bad one takes them over.
        r2 = api.create_rollout({"target": {"kind": "fleet"}, "variants": [BAD],
                                 "config": {"waves": WAVES, "gate": gate},
                                 "supersede": good["status"] != "completed"})
        bad = wait_status(api, r2["id"], {"completed", "halted"}, 3 * gate["observe_s"] + 60)
        time.sleep(2.0)  # requests in flight while the rollback lands are still counted
        traffic.stop.set()
        traffic.thread.join(10)

        offered = {d["device_id"] for d in bad["devices"] if d["offered_version"]}
        served_bad = {d for d, s in traffic.served.items() if BAD in s}
        halted_wave = bad.get("wave") if bad["status"] == "halted" else None

        def agreement(r: dict, name: str) -> float | None:
            figs = [w["variants"][name] for w in r.get("waves", []) if name in w["variants"]]
            n = sum(f["samples"] for f in figs)
            if not n:
                return None
            return sum((f["agreement"] or 0) * f["samples"] for f in figs) / n

        over = overhead(agents, xte, blocks=8 if args.quick else 16,
                        n=150 if args.quick else 300, gap_s=0.002)
        ratio = over["ratio"]
        out = {
            "good": {"outcome": good["status"], "seconds": round(good_s, 1),
                     "agreement": agreement(good, GOOD), "reason": good["reason"],
                     "p95_ratio": p95_ratios(good, GOOD),
                     "waves": good.get("waves")},
            "bad": {"outcome": bad["status"], "wave": halted_wave,
                    "devices_exposed": len(offered),
                    "served_outside_wave": sorted(served_bad - offered),
                    "agreement": agreement(bad, BAD), "waves": bad.get("waves"),
                    "p95_ratio": p95_ratios(bad, BAD),
                    "accuracy_drop_pp": round(100 * (models["base"]["accuracy"]
                                                     - models[BAD]["accuracy"]), 2),
                    "reason": bad["reason"]},
            "shadow_overhead": round(ratio, 4),
            "shadow_overhead_detail": over,
            "accuracy": {k: round(models[k]["accuracy"], 4) for k in ("base", GOOD, BAD)},
            "agents": n_agents, "waves": WAVES, "gate": gate, "quick": args.quick,
            "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
        }
    finally:
        for s in stops:
            s.set()
        svc.stop()
        broker.terminate()
    print(f"{'rollout':8} {'outcome':10} {'wave':>4} {'agreement':>9} {'exposed':>7} seconds")
    print(f"{'good':8} {out['good']['outcome']:10} {'-':>4} "
          f"{out['good']['agreement'] or 0:9.3f} {n_agents:7d} {out['good']['seconds']}")
    print(f"{'bad':8} {out['bad']['outcome']:10} {out['bad']['wave']!s:>4} "
          f"{out['bad']['agreement'] or 0:9.3f} {out['bad']['devices_exposed']:7d}")
    print(f"accuracy base/good/bad: {out['accuracy']}; bad drop "
          f"{out['bad']['accuracy_drop_pp']} pp; shadow overhead x{out['shadow_overhead']}")
    print(f"p95 ratio per wave: good {out['good']['p95_ratio']}, bad {out['bad']['p95_ratio']}")
    print(f"shadow overhead detail: {json.dumps(over)}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
