"""Sessions for every installed variant, and the request path's inference.

All installed variants stay loaded, so switching is a reference swap: a request reads the
current table once and runs on the session it picked, whatever is installed meanwhile.

An :class:`Engine` creates and runs sessions: :class:`OnnxEngine` with ONNX Runtime on a
device; the fleet simulator passes a simulated engine (``prunefleet.agent.simengine``)
so that everything around inference is the agent's own code.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from prunefleet.shared.messages import Reason, VariantSpec

from .errors import BadInputError, InstallError, NoVariantError

log = logging.getLogger(__name__)

# A variant whose session failed to load is asked for again at most this often.
LOAD_RETRY_S = 60.0


@dataclass(frozen=True)
class LoadedVariant:
    spec: VariantSpec
    session: Any  # an ort.InferenceSession, or what a simulated engine keeps
    input_name: str

    @property
    def name(self) -> str:
        return self.spec.name


def load_session(path: Path, spec: VariantSpec, intra_op_threads: int = 1) -> LoadedVariant:
    """Create a session and smoke-test it on the manifest's golden input."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise InstallError(f"{spec.name}: onnxruntime cannot load it: {e}") from e
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise InstallError(f"{spec.name}: expected one input, model has {len(inputs)}")
    lv = LoadedVariant(spec, sess, inputs[0].name)
    smoke_test(lv)
    return lv


class Engine(Protocol):
    """Creates sessions (with the smoke test) and runs them."""

    def load(self, path: Path, spec: VariantSpec) -> LoadedVariant:
        """A session for the verified blob at ``path``; :class:`InstallError` if it must
        not serve."""
        ...

    def infer(self, lv: LoadedVariant, x: np.ndarray) -> tuple[np.ndarray, float]:
        """Logits for the batch ``x`` and the milliseconds it took."""
        ...


class OnnxEngine:
    """ONNX Runtime on the CPU, with the device's own thread setting."""

    def __init__(self, intra_op_threads: int = 1) -> None:
        self.intra_op_threads = intra_op_threads

    def load(self, path: Path, spec: VariantSpec) -> LoadedVariant:
        return load_session(path, spec, self.intra_op_threads)

    def infer(self, lv: LoadedVariant, x: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        (y,) = lv.session.run(None, {lv.input_name: x})[:1]
        return y, (time.perf_counter() - t0) * 1000.0


def smoke_test(lv: LoadedVariant) -> None:
    spec = lv.spec
    shape = [1, *spec.input_shape[1:]]
    if spec.golden is not None:
        x = np.frombuffer(base64.b64decode(spec.golden.input_b64), dtype=np.float32)
        if x.size != int(np.prod(shape)):
            raise InstallError(f"{spec.name}: golden input has the wrong size")
        x = x.reshape(shape)
    else:
        x = np.zeros(shape, dtype=np.float32)
    try:
        (y,) = lv.session.run(None, {lv.input_name: x})[:1]
    except Exception as e:
        raise InstallError(f"{spec.name}: smoke test failed to run: {e}") from e
    if y.shape != (1, spec.num_classes):
        raise InstallError(
            f"{spec.name}: output shape {tuple(y.shape)}, expected (1, {spec.num_classes})"
        )
    if not np.all(np.isfinite(y)):
        raise InstallError(f"{spec.name}: smoke test output is not finite")
    if spec.golden is not None:
        want = np.frombuffer(base64.b64decode(spec.golden.output_b64), dtype=np.float32)
        if want.size != y.size or not np.allclose(
            y.ravel(), want, atol=spec.golden.atol, rtol=1e-3
        ):
            raise InstallError(f"{spec.name}: smoke test output differs from the golden output")


@dataclass(frozen=True)
class Served:
    """The answer to one request."""

    variant: str
    reason: Reason
    logits: np.ndarray
    latency_ms: float

    @property
    def label(self) -> int:
        return int(np.argmax(self.logits[0]))


Chooser = Callable[[np.ndarray, dict[str, VariantSpec]], tuple[str, Reason]]


class ModelPool:
    """Installed variants, and ONNX Runtime sessions for as many as memory allows.

    ``specs`` holds every installed variant; ``table`` the loaded ones; ``servable`` the
    installed variants that may serve: a profile-only one (``VariantSpec.profile_only``,
    installed to be measured for ``prunefleet tune``) is left out here, the one place the
    request path, the policy, the cascade, lifetime mode and the fallback take their
    variants from. All three are replaced, never mutated, so a request that read them keeps
    a consistent view while a switch, an install or an unload happens. With ``max_loaded``
    > 0 the least recently used sessions are unloaded (profile-only ones first); a request
    for an unloaded variant is served by the nearest servable loaded one while the loop
    thread loads it (session creation never blocks a request).
    """

    def __init__(self, loader: Callable[[VariantSpec], LoadedVariant] | None = None,
                 max_loaded: int = 0, engine: Engine | None = None) -> None:
        self._specs: dict[str, VariantSpec] = {}
        self._servable: dict[str, VariantSpec] = {}
        self._table: dict[str, LoadedVariant] = {}
        self._used: dict[str, float] = {}
        self._swap = threading.Lock()
        self.loader = loader
        self.max_loaded = max_loaded
        self.wanted: set[str] = set()  # unloaded variants requests asked for
        self.unloads = 0
        # A variant whose session could not be made again (its file deleted or damaged
        # underneath): when, so requests do not ask for it again before LOAD_RETRY_S.
        self._load_failed: dict[str, float] = {}
        self.load_failures = 0
        self.engine: Engine = engine or OnnxEngine()
        # Bumped whenever the installed set changes: caches of the table key on it.
        self.version = 0

    @property
    def table(self) -> dict[str, LoadedVariant]:
        return self._table

    @property
    def specs(self) -> dict[str, VariantSpec]:
        return self._specs

    @property
    def servable(self) -> dict[str, VariantSpec]:
        """Installed variants that may serve (every one but the profile-only)."""
        return self._servable

    def serving(self, spec: VariantSpec) -> bool:
        """Installed under its name with this exact digest, profile-only or not as ``spec``
        says (a candidate the manifest now offers to serve is installed again)."""
        cur = self._specs.get(spec.name)
        return (cur is not None and cur.sha256 == spec.sha256
                and cur.profile_only == spec.profile_only)

    def _swapped(self, specs: dict[str, VariantSpec]) -> None:
        """Lock held."""
        self._specs = specs
        self._servable = {k: v for k, v in specs.items() if not v.profile_only}

    def put(self, lv: LoadedVariant) -> None:
        with self._swap:
            self._swapped({**self._specs, lv.name: lv.spec})
            self._table = {**self._table, lv.name: lv}
            self._used[lv.name] = time.monotonic()
            self.wanted.discard(lv.name)
            self.version += 1
        # A profile-only session is the first to go under the cap (the profiler holds its
        # own reference): it never displaces a session that serves.
        self.shrink_to(self.max_loaded, keep=set() if lv.spec.profile_only else {lv.name})

    def remove(self, name: str) -> None:
        with self._swap:
            self._swapped({k: v for k, v in self._specs.items() if k != name})
            self._table = {k: v for k, v in self._table.items() if k != name}
            self._used.pop(name, None)
            self.wanted.discard(name)
            self._load_failed.pop(name, None)
            self.version += 1

    def unload(self, name: str) -> None:
        """Drop the session, keep the variant installed."""
        with self._swap:
            if name in self._table:
                self._table = {k: v for k, v in self._table.items() if k != name}
                self.unloads += 1

    def shrink_to(self, n: int, keep: Collection[str] = frozenset()) -> list[str]:
        """Unload least recently used sessions until at most ``n`` are loaded (0: no cap)."""
        dropped: list[str] = []
        if n <= 0:
            return dropped
        while len(self._table) > max(n, 1):
            table = self._table
            victims = sorted((not table[k].spec.profile_only, t, k)
                             for k, t in list(self._used.items())
                             if k in table and k not in keep)
            if not victims:
                break
            self.unload(victims[0][2])
            dropped.append(victims[0][2])
        return dropped

    def load_wanted(self) -> list[str]:
        """Create sessions requests asked for (loop thread); returns the names loaded."""
        loaded = []
        for name in list(self.wanted):
            spec = self._specs.get(name)
            self.wanted.discard(name)
            if spec is None or name in self._table or self.loader is None:
                continue
            try:
                self.put(self.loader(spec))
            except InstallError as e:
                self.load_failures += 1
                self._load_failed[name] = time.monotonic()
                log.error("cannot load %s (requests get the nearest loaded variant; tried "
                          "again in %.0f s): %s", name, LOAD_RETRY_S, e)
                continue
            self._load_failed.pop(name, None)
            loaded.append(name)
        return loaded

    def check_input(self, x: np.ndarray, spec: VariantSpec) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise BadInputError("input must be a numpy array")
        if x.dtype != np.float32:
            raise BadInputError(f"input dtype {x.dtype}, expected float32")
        want = tuple(spec.input_shape[1:])
        if x.ndim == len(want):
            x = x[None]
        if tuple(x.shape[1:]) != want or x.shape[0] < 1:
            raise BadInputError(
                f"input shape {tuple(x.shape)}, expected (N, {', '.join(map(str, want))})"
            )
        return x

    def resolve(self, name: str) -> LoadedVariant:
        """The session for ``name``, or the loaded variant nearest in cost."""
        table = self._table
        lv = table.get(name)
        if lv is not None:
            self._used[name] = time.monotonic()
            return lv
        servable = [v for v in table.values() if not v.spec.profile_only]
        if not servable:
            raise NoVariantError("no variant loaded")
        failed = self._load_failed.get(name)
        if failed is None or time.monotonic() - failed >= LOAD_RETRY_S:
            self.wanted.add(name)
        want = self._specs[name].macs if name in self._specs else 0
        lv = min(servable, key=lambda v: (abs(v.spec.macs - want), v.spec.macs))
        self._used[lv.name] = time.monotonic()
        return lv

    def infer(self, lv: LoadedVariant, x: np.ndarray) -> tuple[np.ndarray, float]:
        return self.engine.infer(lv, x)

    def run(self, x: np.ndarray, choose: Chooser) -> Served:
        specs = self._servable  # one read: a concurrent swap cannot change it under us
        if not specs or not self._table:
            raise NoVariantError("no variant installed yet")
        x = self.check_input(x, next(iter(specs.values())))
        name, reason = choose(x, specs)
        lv = self.resolve(name)
        if lv.name != name:
            reason = Reason.FALLBACK
        y, ms = self.infer(lv, x)
        return Served(lv.name, reason, y, ms)
