"""What a variant costs: parameters, MACs, bytes on the wire, latency in ONNX Runtime.

Latency follows the field notes: ONNX Runtime on the CPU with ``intra_op_num_threads=1``,
batch 1, a warm-up, then many timed runs reported as p50/p95. When several variants are
compared, :func:`latency_many` interleaves them in rounds, so background noise on a busy
machine lands on all of them alike and their ratio (speedup) stays meaningful.
"""

from __future__ import annotations

import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    mean_ms: float
    runs: int


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass over ``example_input`` (Torch-Pruning)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, example_input)
    model.train(was_training)
    return int(macs)


def compressed_size(data: bytes, level: int = 9) -> int:
    """Size after zlib, the compression artifacts travel with on the wire."""
    return len(zlib.compress(data, level))


def session(model: bytes | str | Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads and no inter-op parallelism."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def run_batched(sess: ort.InferenceSession, x: np.ndarray, batch: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    outs = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def _stats(samples_s: list[float]) -> Latency:
    ms = np.asarray(samples_s) * 1e3
    return Latency(
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        mean_ms=float(ms.mean()),
        runs=len(ms),
    )


def latency_many(
    sessions: dict[str, ort.InferenceSession],
    x1: np.ndarray,
    *,
    warmup: int = 50,
    runs: int = 500,
    rounds: int = 10,
    progress: bool = False,
) -> dict[str, Latency]:
    """Batch-1 latency of each session; runs are interleaved over ``rounds`` rounds."""
    x1 = np.ascontiguousarray(x1, dtype=np.float32)
    if x1.shape[0] != 1:
        raise ValueError(f"latency is measured at batch 1, got shape {x1.shape}")
    feeds = {k: {s.get_inputs()[0].name: x1} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    per_round = max(1, runs // max(1, rounds))
    clock = time.perf_counter
    order = list(sessions)
    from tqdm.auto import tqdm

    bar = tqdm(range(max(1, rounds)), desc="latency", unit="round", disable=not progress,
               file=sys.stderr, leave=False, dynamic_ncols=True)
    for r in bar:
        # Alternate the order, so no variant always runs right after the same neighbour.
        for k in order if r % 2 == 0 else order[::-1]:
            s, feed, out = sessions[k], feeds[k], samples[k]
            for _ in range(per_round):
                t0 = clock()
                s.run(None, feed)
                out.append(clock() - t0)
    return {k: _stats(v) for k, v in samples.items()}



# --------------------------------------------------------------------------- footprint

# Run in a fresh interpreter, so nothing the parent loaded (torch, other sessions) blurs
# the figure: resident memory after importing ONNX Runtime, then after creating the session
# and running it once; then energy per inference from the host's meter, else CPU time x
# the architecture's active power (agent/energy.py, agent/devicefacts.py).
_FOOTPRINT = r"""
import json, sys, time
import numpy as np, onnxruntime as ort, psutil
from prunefleet.agent.devicefacts import read_facts
from prunefleet.agent.energy import estimate_j, find_meter
path, shape, runs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
proc = psutil.Process()
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
opts.log_severity_level = 3
before = proc.memory_info().rss
s = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
feed = {s.get_inputs()[0].name: x}
s.run(None, feed)
after = proc.memory_info().rss
for _ in range(min(20, runs)):
    s.run(None, feed)
c0 = time.thread_time()
for _ in range(runs):
    s.run(None, feed)
cpu_s = (time.thread_time() - c0) / runs
facts = read_facts(ort_version="", providers=[])
energy_j, source = None, "cpu_time_estimate"
meter = find_meter()
if meter is not None:
    window = max(2 * meter.min_window_s, 0.2)
    j0, t0 = meter.joules(), time.perf_counter()
    time.sleep(window)
    j1, t1 = meter.joules(), time.perf_counter()
    n = 0
    while time.perf_counter() - t1 < window or n < 10:
        s.run(None, feed)
        n += 1
    j2, t2 = meter.joules(), time.perf_counter()
    if None not in (j0, j1, j2) and t1 > t0:
        idle_w = (j1 - j0) / (t1 - t0)
        above = (j2 - j1) - idle_w * (t2 - t1)
        if above > 0:
            energy_j, source = above / n, meter.source
if energy_j is None:
    energy_j = estimate_j(cpu_s, facts.active_power_w or 5.0)
print(json.dumps({"memory_mb": (after - before) / 2**20, "cpu_ms": cpu_s * 1e3,
                  "energy_mj": energy_j * 1e3, "energy_source": source,
                  "active_power_w": facts.active_power_w}))
"""


def footprint(onnx_path: str | Path, input_shape: list[int], runs: int = 200,
              timeout_s: float = 120.0) -> dict[str, object]:
    """What a variant's ONNX Runtime session adds to a process's resident memory (MB;
    measured in a child process: before and after creating the session and one run), its
    CPU time and energy per inference on this host, and the energy's source."""
    import json
    import subprocess

    try:
        done = subprocess.run(
            [sys.executable, "-c", _FOOTPRINT, str(onnx_path), json.dumps(input_shape),
             str(runs)], capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"footprint not measured: {e}"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"footprint not measured: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])
