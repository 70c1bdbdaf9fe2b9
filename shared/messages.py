"""Pydantic models of every JSON message on the wire.

Each model forbids unknown fields, carries a ``schema`` version and bounds its sizes.
``decode`` is the one entry point for bytes from the network: it checks the size before
parsing and turns every failure into :class:`ProtocolError`.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ProtocolError
from .topics import check_name, check_sha256

MAX_ARTIFACT_BYTES = 512 * 1024 * 1024
MAX_VARIANTS = 16

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Sha256 = Annotated[str, Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]
Timestamp = Annotated[float, Field(ge=0)]


class WireModel(BaseModel):
    """Base of all wire messages: strict shape, versioned, size-limited."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    # Longest encoded form this message may have; subclasses lower or raise it.
    max_bytes: ClassVar[int] = 64 * 1024
    schema_version: Literal[1] = Field(default=1, alias="schema")

    def encode(self) -> bytes:
        data = self.model_dump_json(by_alias=True).encode()
        if len(data) > self.max_bytes:
            raise ProtocolError(
                f"{type(self).__name__} is {len(data)} bytes, over its limit of {self.max_bytes}"
            )
        return data


M = TypeVar("M", bound=WireModel)


def decode(model: type[M], payload: bytes | str) -> M:
    """Parse ``payload`` as ``model``; any failure becomes :class:`ProtocolError`."""
    if isinstance(payload, str):
        payload = payload.encode()
    limit = model.max_bytes
    if len(payload) > limit:
        raise ProtocolError(
            f"{model.__name__} of {len(payload)} bytes is over its limit of {limit}"
        )
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{model.__name__}: not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ProtocolError(f"{model.__name__}: expected a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(message)"
        raise ProtocolError(
            f"{model.__name__}: {where}: {first['msg']} ({e.error_count()} error(s))"
        ) from e


class Reason(StrEnum):
    """Why the agent serves the variant it serves; telemetry carries these codes."""

    INITIAL = "initial"
    PINNED = "pinned"
    BATTERY_LOW = "battery_low"
    BATTERY_CRITICAL = "battery_critical"
    BATTERY_RECOVERED = "battery_recovered"
    CHARGING = "charging"
    CPU_HIGH = "cpu_high"
    CPU_RECOVERED = "cpu_recovered"
    MEMORY_LOW = "memory_low"
    MEMORY_RECOVERED = "memory_recovered"
    THERMAL = "thermal"
    THERMAL_RECOVERED = "thermal_recovered"
    SLO = "latency_slo"
    SLO_RECOVERED = "latency_slo_recovered"
    COMPLEXITY_HIGH = "complexity_high"
    COMPLEXITY_LOW = "complexity_low"
    CASCADE = "cascade"
    FALLBACK = "fallback"
    INSTALLED = "installed"


class Golden(BaseModel):
    """A known input and the output the variant must give for it (smoke test)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_b64: str = Field(max_length=256 * 1024)
    output_b64: str = Field(max_length=64 * 1024)
    dtype: Literal["float32"] = "float32"
    atol: float = Field(default=1e-3, ge=0)


class VariantSpec(BaseModel):
    """One variant a device should have: what it is, how to fetch it, what it costs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    sha256: Sha256
    size: int = Field(gt=0, le=MAX_ARTIFACT_BYTES)
    chunk_bytes: int = Field(ge=1024, le=8 * 1024 * 1024)
    chunk_sha256: list[Sha256] = Field(min_length=1, max_length=65536)
    compression: Literal["none", "zlib"] = "zlib"
    input_shape: list[int] = Field(min_length=1, max_length=8)
    num_classes: int = Field(ge=1, le=100000)
    params: int = Field(ge=0)
    macs: int = Field(ge=0)
    accuracy: float | None = Field(default=None, ge=0, le=1)
    latency_ms: float | None = Field(default=None, ge=0)
    technique: str = Field(default="none", max_length=32)
    golden: Golden | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "variant name")

    @field_validator("chunk_sha256")
    @classmethod
    def _chunks(cls, v: list[str]) -> list[str]:
        for h in v:
            check_sha256(h)
        return v

    def model_post_init(self, __context: Any) -> None:
        expected = -(-self.size // self.chunk_bytes)
        if len(self.chunk_sha256) != expected:
            raise ValueError(
                f"variant {self.name}: {len(self.chunk_sha256)} chunk hashes for "
                f"{expected} chunks"
            )


class Manifest(WireModel):
    """The desired state of a device or group: the payload the server signs."""

    max_bytes: ClassVar[int] = 4 * 1024 * 1024
    target: Name
    version: int = Field(ge=1)
    issued_at: Timestamp
    expires_at: Timestamp
    variants: list[VariantSpec] = Field(min_length=1, max_length=MAX_VARIANTS)
    pinned_variant: Name | None = None
    # Overrides of the agent's policy settings (PolicyConfig field → value), per device
    # or group; the agent rejects the manifest when they do not validate.
    policy: dict[Annotated[str, Field(max_length=64)], float | int | bool | None] | None = (
        Field(default=None, max_length=64)
    )

    def model_post_init(self, __context: Any) -> None:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique")
        if self.pinned_variant is not None and self.pinned_variant not in names:
            raise ValueError(f"pinned variant {self.pinned_variant!r} is not in the manifest")
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")

    def variant(self, name: str) -> VariantSpec:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keyid: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")
    sig: str = Field(min_length=1, max_length=200)


class SignedManifest(WireModel):
    """A manifest as its exact signed bytes (``payload``, JSON text) plus signatures."""

    max_bytes: ClassVar[int] = 6 * 1024 * 1024
    payload: str = Field(min_length=2, max_length=5 * 1024 * 1024)
    signatures: list[Signature] = Field(min_length=1, max_length=8)


class InstalledVariant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    sha256: Sha256
    size: int = Field(ge=0)


class RolloutPhase(StrEnum):
    """Where a device stands with the manifest it was last offered."""

    OFFERED = "offered"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLED = "installed"
    ACTIVE = "active"
    FAILED = "failed"


class RolloutReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest_version: int = Field(ge=1)
    phase: RolloutPhase
    progress: float = Field(default=0.0, ge=0, le=1)
    reason: str | None = Field(default=None, max_length=1024)


class ReportedState(WireModel):
    """What a device says about itself; retained, and its Last Will says ``online=False``."""

    device_id: Name
    online: bool
    ts: Timestamp = 0.0
    group: Name | None = None  # the group in the agent's own configuration
    agent_version: str | None = Field(default=None, max_length=32)
    manifest_version: int | None = None
    active_variant: Name | None = None
    installed: list[InstalledVariant] = Field(default_factory=list, max_length=MAX_VARIANTS)
    downloading: dict[Name, float] = Field(default_factory=dict, max_length=MAX_VARIANTS)
    last_error: str | None = Field(default=None, max_length=1024)
    rollout: RolloutReport | None = None
    # What the device dropped or refused since it started (logged there, counted here).
    counters: dict[Annotated[str, Field(max_length=32)], int] = Field(
        default_factory=dict, max_length=16
    )


class VariantStats(BaseModel):
    """Requests one variant served in one telemetry interval."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: int = Field(ge=0)
    errors: int = Field(default=0, ge=0)
    latency_ms_p50: float | None = Field(default=None, ge=0)
    latency_ms_p95: float | None = Field(default=None, ge=0)
    latency_ms_p99: float | None = Field(default=None, ge=0)
    labeled: int = Field(default=0, ge=0)
    correct: int = Field(default=0, ge=0)


class SwitchEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ts: Timestamp
    from_variant: Name | None
    to_variant: Name
    reason: Reason


class TelemetryBatch(WireModel):
    """One interval of a device's activity; ``seq`` makes delivery idempotent."""

    max_bytes: ClassVar[int] = 128 * 1024
    device_id: Name
    seq: int = Field(ge=0)
    interval_start: Timestamp
    interval_end: Timestamp
    variants: dict[Name, VariantStats] = Field(default_factory=dict, max_length=MAX_VARIANTS)
    switches: list[SwitchEvent] = Field(default_factory=list, max_length=256)
    switches_dropped: int = Field(default=0, ge=0)
    active_variant: Name | None = None
    battery_percent: float | None = Field(default=None, ge=0, le=100)
    charging: bool | None = None
    cpu_percent: float | None = Field(default=None, ge=0, le=100)
    mem_percent: float | None = Field(default=None, ge=0, le=100)
    temperature_c: float | None = Field(default=None, ge=-100, le=200)
    energy_j: float = Field(default=0.0, ge=0)
    batches_dropped: int = Field(default=0, ge=0)

    def model_post_init(self, __context: Any) -> None:
        if self.interval_end < self.interval_start:
            raise ValueError("interval_end before interval_start")


class EventKind(StrEnum):
    INSTALLED = "installed"
    INSTALL_FAILED = "install_failed"
    REJECTED = "rejected"
    DOWNLOAD_STARTED = "download_started"
    ERROR = "error"


class Event(WireModel):
    device_id: Name
    ts: Timestamp
    kind: EventKind
    variant: Name | None = None
    detail: str = Field(default="", max_length=2048)


class CommandKind(StrEnum):
    PIN = "pin"
    UNPIN = "unpin"
    REPORT = "report"


class Command(WireModel):
    command_id: str = Field(min_length=1, max_length=64)
    kind: CommandKind
    variant: Name | None = None
    issued_at: Timestamp = Field(default_factory=time.time)


class ChunkHeader(WireModel):
    """Header of one artifact chunk; the chunk's bytes follow it in the same frame."""

    max_bytes: ClassVar[int] = 1024
    sha256: Sha256
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    compression: Literal["none", "zlib"]

    def model_post_init(self, __context: Any) -> None:
        if self.index >= self.count:
            raise ValueError("chunk index out of range")
