"""The variant registry: uploaded ONNX files by digest, and the variants made of them.

An upload is stored content-addressed (``<blob_dir>/<sha256>.onnx``); registering a
variant names one blob, completes its metadata from the model itself where the caller left
it out (input shape, classes, parameters, a golden input/output pair computed with ONNX
Runtime), publishes its chunks once (retained), and records it in the store.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prunefleet.agent.errors import TransportError
from prunefleet.shared.chunks import DEFAULT_CHUNK_BYTES
from prunefleet.shared.messages import MAX_ARTIFACT_BYTES, Golden, Name, Sha256, VariantSpec

from .errors import DistributionError, ServerError
from .fleet import FleetServer, spec_from_file
from .store import Store


class RegistryError(ServerError):
    """A refused upload or registration; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class VariantRegistration(BaseModel):
    """What ``POST /v1/variants`` takes; omitted model facts are read from the ONNX file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    sha256: Sha256
    macs: int = Field(ge=0)
    input_shape: list[int] | None = Field(default=None, min_length=1, max_length=8)
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

    def put_blob(self, expected_sha256: str, chunks: Iterable[bytes]) -> tuple[int, bool]:
        """Store an upload whose SHA-256 must be ``expected_sha256``; (size, created)."""
        w = self.blob_writer(expected_sha256)
        try:
            for chunk in chunks:
                w.write(chunk)
            return w.commit()
        finally:
            w.discard()

    def blob_writer(self, expected_sha256: str) -> BlobWriter:
        return BlobWriter(self.blob_dir, self.blob_path(expected_sha256), expected_sha256)

    def register(self, reg: VariantRegistration) -> VariantSpec:
        path = self.blob_path(reg.sha256)
        if not path.exists():
            raise RegistryError(
                f"no uploaded file with sha256 {reg.sha256}: PUT it to /v1/blobs/{reg.sha256} "
                "first", 404,
            )
        facts = describe_onnx(path)
        golden = reg.golden or facts["golden"]
        try:
            spec = spec_from_file(
                path, name=reg.name,
                input_shape=reg.input_shape or facts["input_shape"],
                num_classes=reg.num_classes or facts["num_classes"],
                params=reg.params if reg.params is not None else facts["params"],
                macs=reg.macs, accuracy=reg.accuracy, latency_ms=reg.latency_ms,
                technique=reg.technique, golden=golden, chunk_bytes=reg.chunk_bytes,
                compression=reg.compression,
            )
        except ValidationError as e:
            raise RegistryError(f"variant {reg.name}: {e.errors()[0]['msg']}") from e
        try:
            self.fleet.publish_artifact(spec, path.read_bytes())
        except (TransportError, RuntimeError, ValueError) as e:  # paho: not connected
            raise DistributionError(f"{spec.name}: chunks not published: {e}") from e
        self.store.add_variant(spec.name, spec.sha256, str(path), spec.model_dump(mode="json"),
                               reg.report)
        return spec


def describe_onnx(path: Path) -> dict:
    """Input shape (batch 1), classes, parameter count and a golden pair of an ONNX model."""
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

    def dims(vi) -> list[int]:
        return [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]

    input_shape = dims(inputs[0])
    out_shape = dims(model.graph.output[0])
    params = int(sum(numpy_helper.to_array(i).size for i in model.graph.initializer))
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).normal(0, 1, input_shape).astype(np.float32)
        y = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0], dtype=np.float32)
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise RegistryError(f"ONNX Runtime cannot run the model: {e}") from e
    if not np.all(np.isfinite(y)):
        raise RegistryError("the model's output on a test input is not finite")
    try:
        golden: Golden | None = Golden(input_b64=base64.b64encode(x.tobytes()).decode(),
                                       output_b64=base64.b64encode(y.tobytes()).decode())
    except ValidationError:
        golden = None  # too large an input for a manifest: the agent smoke-tests on zeros
    return {
        "input_shape": input_shape,
        "num_classes": int(out_shape[-1]) if out_shape else 1,
        "params": params,
        "golden": golden,
    }


class BlobWriter:
    """One upload in progress: a temp file beside its final place, hashed as it is written.

    Only :meth:`commit` with the expected digest makes it visible (``os.replace``).
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
        return self.size, created

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)
