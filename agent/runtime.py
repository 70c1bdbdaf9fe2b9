"""ONNX Runtime sessions for every installed variant, and the request path.

All installed variants stay loaded, so switching is a reference swap: a request reads the
current table once and runs on the session it picked, whatever is installed meanwhile.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from prunefleet.shared.messages import Reason, VariantSpec

from .errors import BadInputError, InstallError, NoVariantError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedVariant:
    spec: VariantSpec
    session: ort.InferenceSession
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


Chooser = Callable[[np.ndarray, dict[str, LoadedVariant]], tuple[str, Reason]]


class ModelPool:
    """The loaded variants and the request path through them."""

    def __init__(self) -> None:
        self._table: dict[str, LoadedVariant] = {}
        self._swap = threading.Lock()

    @property
    def table(self) -> dict[str, LoadedVariant]:
        return self._table

    def put(self, lv: LoadedVariant) -> None:
        with self._swap:
            table = dict(self._table)
            table[lv.name] = lv
            self._table = table

    def remove(self, name: str) -> None:
        with self._swap:
            table = dict(self._table)
            table.pop(name, None)
            self._table = table

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

    def run(self, x: np.ndarray, choose: Chooser) -> Served:
        table = self._table  # one read: a concurrent swap cannot change it under us
        if not table:
            raise NoVariantError("no variant installed yet")
        any_spec = next(iter(table.values())).spec
        x = self.check_input(x, any_spec)
        name, reason = choose(x, table)
        lv = table.get(name) or next(iter(table.values()))
        t0 = time.perf_counter()
        (y,) = lv.session.run(None, {lv.input_name: x})[:1]
        return Served(lv.name, reason, y, (time.perf_counter() - t0) * 1000.0)
