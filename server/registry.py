"""The variant registry: uploaded ONNX files by digest, and the variants made of them.

An upload is stored content-addressed (``<blob_dir>/<sha256>.onnx``); registering a
variant names one blob, completes its metadata from the model itself where the caller left
it out (input shape, classes, parameters, a golden input/output pair computed with ONNX
Runtime), checks what the caller gave (a golden pair must be reproduced here), publishes
its chunks once (retained), and records it in the store. :func:`register_file` is the one
registration path: the HTTP API and the demo both use it, and
:func:`registration_from_report` turns a ``prepare`` report entry into its input for
both the admin CLI and the demo.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prunefleet.shared.chunks import DEFAULT_CHUNK_BYTES
from prunefleet.shared.errors import TransportError
from prunefleet.shared.fsutil import fsync_dir
from prunefleet.shared.messages import (
    MAX_ARTIFACT_BYTES,
    MAX_INPUT_ELEMENTS,
    Golden,
    Name,
    Sha256,
    VariantSpec,
)

from .errors import DistributionError, RegistryError
from .fleet import FleetServer, spec_from_file
from .store import Store


class VariantRegistration(BaseModel):
    """What ``POST /v1/variants`` takes; omitted model facts are read from the ONNX file, and
    a ``golden`` pair given here is checked against the model (:func:`describe_onnx`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    sha256: Sha256
    macs: int = Field(ge=0)
    input_shape: list[Annotated[int, Field(ge=1, le=MAX_INPUT_ELEMENTS)]] | None = Field(
        default=None, min_length=1, max_length=8)
    num_classes: int | None = Field(default=None, ge=1, le=100000)
    params: int | None = Field(default=None, ge=0)
    accuracy: float | None = Field(default=None, ge=0, le=1)
    latency_ms: float | None = Field(default=None, ge=0)
    technique: str = Field(default="none", max_length=32)
    golden: Golden | None = None
    chunk_bytes: int = Field(default=DEFAULT_CHUNK_BYTES, ge=1024, le=8 * 1024 * 1024)
    compression: Literal["none", "zlib"] = "zlib"
    report: dict = Field(default_factory=dict)


class Registry:
    def __init__(self, store: Store, fleet: FleetServer, blob_dir: Path):
        self.store = store
        self.fleet = fleet
        self.blob_dir = Path(blob_dir)
        self.blob_dir.mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / f"{sha256}.onnx"

    def blob_writer(self, expected_sha256: str) -> BlobWriter:
        return BlobWriter(self.blob_dir, self.blob_path(expected_sha256), expected_sha256)

    def register(self, reg: VariantRegistration) -> VariantSpec:
        """Register an uploaded blob (``POST /v1/variants``) through :func:`register_file`."""
        path = self.blob_path(reg.sha256)
        if not path.exists():
            raise RegistryError(
                f"no uploaded file with sha256 {reg.sha256}: PUT it to /v1/blobs/{reg.sha256} "
                "first", 404,
            )
        return register_file(self.store, self.fleet, path, reg)


def technique_label(technique: str | None, quantize: str | None = None) -> str:
    """A variant's technique as tables and the registry show it: ``structured+int8``,
    ``int8`` for a quantized dense model, ``none`` for the dense one."""
    t = technique or "none"
    if not quantize:
        return t
    return quantize if t == "none" else f"{t}+{quantize}"


def registration_from_report(
    entry: Mapping[str, Any], *, sha256: str, chunk_bytes: int | None = None
) -> VariantRegistration:
    """The registration of one variant of a ``prunefleet prepare`` report.

    It keeps what ``prepare`` measured and chose: the golden pair it picked with a margin
    check and its tolerance (wider for INT8, whose kernels round differently on other
    CPUs). Raises ``KeyError``, ``TypeError`` or ``ValueError`` on an entry it cannot use.
    """
    fields: dict[str, Any] = {
        "name": entry["name"], "sha256": sha256, "macs": int(entry["macs"]),
        "params": int(entry["params"]),
        "technique": technique_label(entry.get("technique"), entry.get("quantize")),
        "input_shape": [int(d) for d in entry["input_shape"]],
        "num_classes": int(entry["num_classes"]),
        "accuracy": entry.get("accuracy"), "latency_ms": entry.get("latency_ms_p50"),
        "golden": entry.get("golden"),
    }
    if chunk_bytes is not None:
        fields["chunk_bytes"] = chunk_bytes
    return VariantRegistration.model_validate(fields)


def register_file(
    store: Store, fleet: FleetServer, path: Path, reg: VariantRegistration
) -> VariantSpec:
    """Register the ONNX file ``path`` as variant ``reg``: the one registration path.

    The API's route and the demo both end here. The file must be ``reg.sha256``; facts the
    caller left out are read from the model; a golden pair the caller gave is checked on
    this server with ONNX Runtime (see :func:`describe_onnx`), and one is made when none
    was given. Every check runs before the chunks are published and the variant recorded,
    so a refused registration (:class:`RegistryError`, a 4xx status) changes nothing.
    """
    facts = describe_onnx(path, input_shape=reg.input_shape, golden=reg.golden)
    if reg.num_classes is not None and reg.num_classes != facts.num_classes:
        raise RegistryError(f"variant {reg.name}: num_classes {reg.num_classes}, but the "
                            f"model outputs {facts.num_classes} classes")
    try:
        spec = spec_from_file(
            path, name=reg.name, input_shape=facts.input_shape, num_classes=facts.num_classes,
            params=reg.params if reg.params is not None else facts.params,
            macs=reg.macs, accuracy=reg.accuracy, latency_ms=reg.latency_ms,
            technique=reg.technique, golden=facts.golden, chunk_bytes=reg.chunk_bytes,
            compression=reg.compression,
        )
    except ValidationError as e:
        raise RegistryError(f"variant {reg.name}: {e.errors()[0]['msg']}") from e
    if spec.sha256 != reg.sha256:
        raise RegistryError(f"{path.name} has sha256 {spec.sha256}, not {reg.sha256}")
    try:
        fleet.publish_artifact(spec, path.read_bytes())
    except (TransportError, RuntimeError, ValueError) as e:  # paho: not connected
        raise DistributionError(f"{spec.name}: chunks not published: {e}") from e
    store.add_variant(spec.name, spec.sha256, str(path), spec.model_dump(mode="json"),
                      reg.report)
    return spec


@dataclass(frozen=True)
class ModelFacts:
    input_shape: list[int]  # batch 1
    num_classes: int  # the width of the output, as ONNX Runtime computed it
    params: int
    golden: Golden | None  # the caller's, checked; or one made here; None when too large


def describe_onnx(
    path: Path, *, input_shape: list[int] | None = None, golden: Golden | None = None
) -> ModelFacts:
    """Read an ONNX model's facts and run it once with ONNX Runtime on this server.

    ``input_shape`` (batch 1) must fit the model's input: same rank, and the same size in
    every dimension the model fixes. A ``golden`` pair must hold float32 values of that
    shape and the model's output, and the model must reproduce the output within its
    tolerance, as an agent's smoke test will (``atol`` and ``rtol=1e-3``). Without one, a
    golden pair is made from a random input. Raises :class:`RegistryError` (422).
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and friends, untyped
        raise RegistryError(f"not an ONNX model: {e}") from e
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise RegistryError(f"expected a model with one input, it has {len(inputs)}")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        raise RegistryError("the model's input is not float32, which agents send")
    model_dims = [d.dim_value if d.dim_value > 0 else None for d in tensor.shape.dim]
    shown = [d if d is not None else "N" for d in model_dims]
    if input_shape is None:
        if not tensor.HasField("shape"):
            raise RegistryError("the model does not declare its input's shape: give input_shape")
        input_shape = [1] + [d or 1 for d in model_dims[1:]]
    elif tensor.HasField("shape") and (len(input_shape) != len(model_dims) or any(
        d is not None and d != s for d, s in zip(model_dims[1:], input_shape[1:], strict=True)
    )):
        raise RegistryError(f"input_shape {input_shape} does not fit the model's input {shown}")
    shape = [1, *input_shape[1:]]
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise RegistryError(f"input_shape {input_shape} takes more than {MAX_INPUT_ELEMENTS} "
                            "float32 values")
    params = int(sum(numpy_helper.to_array(i).size for i in model.graph.initializer))

    if golden is not None:
        x = _golden_array(golden.input_b64, "input")
        if x.size != int(np.prod(shape)):
            raise RegistryError(f"golden input has {x.size} float32 values; the model's input "
                                f"{shape} takes {int(np.prod(shape))}")
        x = x.reshape(shape)
    else:
        x = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        y = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0], dtype=np.float32)
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise RegistryError(f"ONNX Runtime cannot run the model: {e}") from e
    if y.ndim != 2 or y.shape[0] != 1:
        raise RegistryError(f"the model's output has shape {list(y.shape)}, expected "
                            "[1, classes]")
    if not np.all(np.isfinite(y)):
        raise RegistryError("the model's output on a test input is not finite")
    if golden is not None:
        want = _golden_array(golden.output_b64, "output")
        if want.size != y.size:
            raise RegistryError(f"golden output has {want.size} values; the model gives "
                                f"{y.size}")
        # The comparison of the agent's smoke test (prunefleet.agent.runtime.smoke_test).
        if not np.allclose(y.ravel(), want, atol=golden.atol, rtol=1e-3):
            diff = float(np.abs(y.ravel() - want).max())
            raise RegistryError(
                f"golden output is not what the model computes here: max |difference| "
                f"{diff:.3g} exceeds atol {golden.atol:.3g} (rtol 1e-3); an agent's smoke "
                "test would refuse this variant"
            )
    else:
        try:
            golden = Golden(input_b64=base64.b64encode(x.tobytes()).decode(),
                            output_b64=base64.b64encode(y.tobytes()).decode())
        except ValidationError:
            golden = None  # too large an input for a manifest: the agent smoke-tests on zeros
    return ModelFacts(input_shape=list(input_shape), num_classes=int(y.shape[1]),
                      params=params, golden=golden)


def _golden_array(b64: str, what: str) -> np.ndarray:
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError as e:
        raise RegistryError(f"golden {what} is not base64: {e}") from e
    if len(raw) % 4:
        raise RegistryError(f"golden {what} is {len(raw)} bytes, not float32 values")
    a = np.frombuffer(raw, dtype="<f4")
    if not np.all(np.isfinite(a)):
        raise RegistryError(f"golden {what} holds values that are not finite")
    return a


class BlobWriter:
    """One upload in progress: a temp file beside its final place, hashed as it is written.

    Only :meth:`commit` with the expected digest makes it visible: fsync, ``os.replace``,
    fsync of the directory, as :mod:`prunefleet.shared.fsutil` does for writes in memory.
    """

    def __init__(self, directory: Path, path: Path, expected_sha256: str):
        self.path = path
        self.expected = expected_sha256
        self.size = 0
        self._h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".upload-")
        self._tmp = Path(tmp)
        self._f = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > MAX_ARTIFACT_BYTES:
            raise RegistryError(
                f"upload is over the artifact limit of {MAX_ARTIFACT_BYTES} bytes", 413
            )
        self._h.update(chunk)
        self._f.write(chunk)

    def commit(self) -> tuple[int, bool]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.size == 0:
            raise RegistryError("empty upload")
        digest = self._h.hexdigest()
        if digest != self.expected:
            raise RegistryError(f"upload has sha256 {digest}, not {self.expected}")
        created = not self.path.exists()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return self.size, created

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)
