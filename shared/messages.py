"""Pydantic models of every JSON message on the wire.

Each model forbids unknown fields, carries a ``schema`` version and bounds its sizes.
``decode`` is the one entry point for bytes from the network: it checks the size before
parsing and turns every failure into :class:`ProtocolError`.
"""

from __future__ import annotations

import math
import re
import time
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeGuard, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ProtocolError
from .topics import check_name, check_sha256

MAX_ARTIFACT_BYTES = 512 * 1024 * 1024
MAX_VARIANTS = 16
MAX_REVOKED_KEYS = 64

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Sha256 = Annotated[str, Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]
# Bounds of device-supplied figures: a device holds valid credentials, so everything it
# sends is checked against what is physically plausible before it may reach a sum.
MAX_TIMESTAMP = float(2**33)  # seconds since the epoch: the year 2242
MAX_COUNT = 10**9  # requests (errors, labelled, …) in one telemetry interval
MAX_LATENCY_MS = 3_600_000.0  # an hour
MAX_ENERGY_J = 1e9  # in one interval (about 280 kWh)
MAX_SEQ = 2**31 - 1  # telemetry sequence numbers and manifest versions fit an SQL INTEGER
MAX_VERSION = 2**31 - 1
# float32 values in one input (64 MiB): a variant's input_shape multiplies to at most this
MAX_INPUT_ELEMENTS = 2**24
Timestamp = Annotated[float, Field(ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
LatencyMs = Annotated[float, Field(ge=0, lt=MAX_LATENCY_MS, allow_inf_nan=False)]
EnergyJ = Annotated[float, Field(ge=0, le=MAX_ENERGY_J, allow_inf_nan=False)]
Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
CounterValue = Annotated[int, Field(ge=0, le=2**53)]  # a device's running total
# A random id an agent makes once per state directory: telemetry sequence numbers count
# within it, so a re-flashed device starting again at 0 is not taken for a duplicate.
INCARNATION_PATTERN = r"^[A-Za-z0-9_-]*$"
Incarnation = Annotated[str, Field(max_length=32, pattern=INCARNATION_PATTERN)]


def is_incarnation(value: object) -> TypeGuard[str]:
    """A non-empty incarnation as the wire takes it (checked the same way where no model
    does the checking: a damaged state file, a batch refused as invalid)."""
    return (isinstance(value, str) and 0 < len(value) <= 32
            and re.fullmatch(INCARNATION_PATTERN, value) is not None)


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
    """Parse ``payload`` as ``model``; any failure becomes :class:`ProtocolError`.

    Any: a deeply nested document (``RecursionError``), one too large to hold
    (``MemoryError``), an integer of thousands of digits (``ValueError``) as much as a
    field out of its bounds. A caller counts the error and drops the message.
    """
    if not isinstance(payload, bytes | bytearray | str):
        raise ProtocolError(f"{model.__name__}: payload is {type(payload).__name__}")
    name, limit = model.__name__, model.max_bytes
    if len(payload) > limit or (isinstance(payload, str) and len(payload.encode()) > limit):
        raise ProtocolError(f"{name} of {len(payload)} bytes is over its limit of {limit}")
    try:
        # pydantic's own JSON parser: twice as fast as json.loads + model_validate, and it
        # stops deep nesting with a validation error of its own.
        return model.model_validate_json(payload)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ProtocolError(f"{name}: not JSON: {first['msg']}") from e
        if first["type"] == "model_type" and not first["loc"]:
            raise ProtocolError(f"{name}: expected a JSON object") from e
        where = ".".join(str(p) for p in first["loc"]) or "(message)"
        raise ProtocolError(
            f"{name}: {where}: {first['msg']} ({e.error_count()} error(s))"
        ) from e
    except (RecursionError, MemoryError, ValueError, TypeError) as e:
        raise ProtocolError(f"{name}: cannot parse: {type(e).__name__}") from e


class Reason(StrEnum):
    """Why the agent serves the variant it serves; telemetry carries these codes."""

    INITIAL = "initial"
    PINNED = "pinned"
    BATTERY_LOW = "battery_low"
    BATTERY_CRITICAL = "battery_critical"
    BATTERY_RECOVERED = "battery_recovered"
    BATTERY_LIFETIME = "battery_lifetime"
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
    input_shape: list[Annotated[int, Field(ge=1, le=MAX_INPUT_ELEMENTS)]] = Field(
        min_length=1, max_length=8)
    num_classes: int = Field(ge=1, le=100000)
    params: int = Field(ge=0)
    macs: int = Field(ge=0)
    accuracy: float | None = Field(default=None, ge=0, le=1)
    latency_ms: float | None = Field(default=None, ge=0)
    technique: str = Field(default="none", max_length=32)
    golden: Golden | None = None
    # Install, smoke-test and profile it, never serve it (``prunefleet tune``): no policy,
    # cascade, lifetime plan, pin or shadow reference ever picks it.
    profile_only: bool = False

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
        if math.prod(self.input_shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"variant {self.name}: input_shape {self.input_shape} takes more "
                             f"than {MAX_INPUT_ELEMENTS} float32 values")


class ShadowSpec(BaseModel):
    """Shadow evaluation while a rollout is judged: the agent replays a sampled share of
    live requests, off the request path, on each variant under evaluation and on a
    reference, and reports how often they agree (``TelemetryBatch.shadow``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rollout_id: int | None = Field(default=None, ge=1, le=MAX_VERSION)
    sample_share: float = Field(default=0.05, gt=0, le=1, allow_inf_nan=False)
    variants: list[Name] = Field(min_length=1, max_length=MAX_VARIANTS)
    # None: the variant the device served before, else the largest installed one.
    reference: Name | None = None
    # The agent stops evaluating after this (the end of the wave's observe window).
    until: Timestamp | None = None


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
    # Signing keys retired by the operator: an agent that accepts this manifest never
    # trusts them again, even where its configuration still pins them.
    revoked_keyids: list[Sha256] = Field(default_factory=list, max_length=MAX_REVOKED_KEYS)
    shadow: ShadowSpec | None = None
    # A request to profile every installed variant again (``prunefleet devices profile ID
    # --refresh``): the agent measures them all when this rises above the highest it has
    # acted on. Drawn from the manifest version sequence, so each request is higher than
    # any before it; later desired states carry it on. 0: none ever requested.
    reprofile: int = Field(default=0, ge=0, le=MAX_VERSION)

    def model_post_init(self, __context: Any) -> None:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique")
        if self.pinned_variant is not None and self.pinned_variant not in names:
            raise ValueError(f"pinned variant {self.pinned_variant!r} is not in the manifest")
        profile_only = self.profile_only
        if len(profile_only) == len(names):
            raise ValueError("every variant is profile-only: a device needs one to serve")
        if self.pinned_variant in profile_only:
            raise ValueError(f"pinned variant {self.pinned_variant!r} is profile-only")
        if self.shadow is not None and profile_only & {*self.shadow.variants,
                                                       self.shadow.reference}:
            raise ValueError("a profile-only variant cannot be under shadow evaluation")
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")

    @property
    def profile_only(self) -> frozenset[str]:
        """The variants the device installs and profiles but never serves."""
        return frozenset(v.name for v in self.variants if v.profile_only)

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
    size: int = Field(ge=0, le=MAX_ARTIFACT_BYTES)


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

    manifest_version: int = Field(ge=1, le=MAX_VERSION)
    phase: RolloutPhase
    progress: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    reason: str | None = Field(default=None, max_length=1024)


# Where an energy figure comes from (see docs/hardware.md): a package energy counter, a
# power monitor on the board, the battery's own gauge, or CPU time times the device's active power.
EnergySource = Literal["rapl", "hwmon", "battery", "cpu_time_estimate"]
ShortText = Annotated[str, Field(max_length=64)]


class DeviceFacts(BaseModel):
    """What the device is: reported once per connection, kept by the server per device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = Field(max_length=32)
    cpu_model: str | None = Field(default=None, max_length=128)
    # Instruction-set features that change which kernels run fast (normalised names:
    # avx2, avx512, avx512vnni, avxvnni, amx, neon, dotprod, i8mm, sve, fp16).
    isa: list[Annotated[str, Field(max_length=16)]] = Field(default_factory=list, max_length=16)
    cores: int = Field(ge=1, le=4096)
    memory_mb: int | None = Field(default=None, ge=0, le=1 << 24)
    ort_version: str | None = Field(default=None, max_length=32)
    providers: list[ShortText] = Field(default_factory=list, max_length=16)
    device_class: Name
    # The active power the CPU-time estimate of energy uses on this device (watts per
    # busy core).
    active_power_w: float | None = Field(default=None, gt=0, le=1000, allow_inf_nan=False)


class VariantProfile(BaseModel):
    """One installed variant measured on the device itself (batch 1, its thread setting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: Sha256
    latency_ms_p50: LatencyMs
    latency_ms_p95: LatencyMs
    cpu_ms: LatencyMs  # CPU time per inference
    # What creating the session added to the agent's resident memory.
    memory_mb: float | None = Field(default=None, ge=0, le=1 << 20, allow_inf_nan=False)
    energy_mj: float = Field(ge=0, le=1e7, allow_inf_nan=False)  # energy per inference
    energy_source: EnergySource
    runs: int = Field(ge=1, le=1_000_000)
    threads: int = Field(ge=1, le=64)
    ts: Timestamp = 0.0


class ReportedState(WireModel):
    """What a device says about itself; retained, and its Last Will says ``online=False``."""

    device_id: Name
    online: bool
    ts: Timestamp = 0.0
    group: Name | None = None  # the group in the agent's own configuration
    agent_version: str | None = Field(default=None, max_length=32)
    manifest_version: int | None = Field(default=None, ge=1, le=MAX_VERSION)
    # The server's certificates that it signed ``manifest_version`` (shared/signing.py):
    # what makes the claim count when the server's store is new or restored. Empty for a
    # manifest from a server that predates them.
    version_proof: list[Signature] = Field(default_factory=list, max_length=8)
    active_variant: Name | None = None
    installed: list[InstalledVariant] = Field(default_factory=list, max_length=MAX_VARIANTS)
    downloading: dict[Name, Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = (
        Field(default_factory=dict, max_length=MAX_VARIANTS))
    last_error: str | None = Field(default=None, max_length=1024)
    rollout: RolloutReport | None = None
    # What the device dropped or refused since it started (logged there, counted here).
    counters: dict[Annotated[str, Field(max_length=32)], CounterValue] = Field(
        default_factory=dict, max_length=16
    )
    # Sent in the first report after each connection (the server keeps the last).
    facts: DeviceFacts | None = None
    # Installed variant → its profile measured on this device.
    profiles: dict[Name, VariantProfile] = Field(default_factory=dict, max_length=MAX_VARIANTS)


class VariantStats(BaseModel):
    """Requests one variant served in one telemetry interval."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: Count
    errors: Count = 0
    latency_ms_p50: LatencyMs | None = None
    latency_ms_p95: LatencyMs | None = None
    latency_ms_p99: LatencyMs | None = None
    labeled: Count = 0
    correct: Count = 0

    def model_post_init(self, __context: Any) -> None:
        # Run for every variant of every batch the server ingests: written for speed.
        requests = self.requests
        if not self.correct <= self.labeled <= requests:
            raise ValueError("expected correct <= labeled <= requests")
        if self.errors > requests:
            raise ValueError("more errors than requests")
        p50, p95, p99 = self.latency_ms_p50, self.latency_ms_p95, self.latency_ms_p99
        if p95 is None:
            p95 = p50
        elif p50 is not None and p50 > p95:
            raise ValueError("latency percentiles must not decrease (p50 <= p95 <= p99)")
        if p99 is not None and p95 is not None and p95 > p99:
            raise ValueError("latency percentiles must not decrease (p50 <= p95 <= p99)")


class ShadowStats(BaseModel):
    """One variant's shadow runs in one telemetry interval, against ``reference``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference: Name
    samples: Count  # requests replayed on both
    agreed: Count = 0  # same top-1 answer as the reference
    # Sum over samples of the total variation distance of the two softmax outputs (0..1).
    divergence_sum: float = Field(default=0.0, ge=0, le=MAX_COUNT, allow_inf_nan=False)
    errors: Count = 0  # runs that raised or gave non-finite output
    latency_ms_p95: LatencyMs | None = None  # of this variant's shadow runs
    profile_latency_ms: LatencyMs | None = None  # its on-device profile's p95, when known

    def model_post_init(self, __context: Any) -> None:
        if self.agreed + self.errors > self.samples or self.divergence_sum > self.samples:
            raise ValueError("expected agreed + errors <= samples, divergence_sum <= samples")


class ShadowReport(BaseModel):
    """Shadow evaluation in one telemetry interval: per variant, and what it cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rollout_id: int | None = Field(default=None, ge=1, le=MAX_VERSION)
    variants: dict[Name, ShadowStats] = Field(default_factory=dict, max_length=MAX_VARIANTS)
    sampled: Count = 0  # requests copied into the shadow queue
    dropped: Count = 0  # sampled requests dropped because the queue was full
    cpu_ms: float = Field(default=0.0, ge=0, le=MAX_LATENCY_MS, allow_inf_nan=False)


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
    seq: int = Field(ge=0, le=MAX_SEQ)
    # The agent's incarnation: ``seq`` counts within it (the dedupe key is device,
    # incarnation, seq). Empty from agents that predate it.
    incarnation: Incarnation = ""
    # The lowest seq the agent still held when it cut this batch: it will never send one
    # below again, so the server's "stored through" cursor may pass any gap under it.
    unconfirmed_from: int | None = Field(default=None, ge=0, le=MAX_SEQ)
    interval_start: Timestamp
    interval_end: Timestamp
    variants: dict[Name, VariantStats] = Field(default_factory=dict, max_length=MAX_VARIANTS)
    switches: list[SwitchEvent] = Field(default_factory=list, max_length=256)
    switches_dropped: Count = 0
    active_variant: Name | None = None
    battery_percent: Percent | None = None
    charging: bool | None = None
    cpu_percent: Percent | None = None
    mem_percent: Percent | None = None
    temperature_c: float | None = Field(default=None, ge=-100, le=200, allow_inf_nan=False)
    energy_j: EnergyJ = 0.0
    # ``energy_j`` split by where each figure came from (a variant not profiled yet is
    # counted by the CPU-time estimate).
    energy_by_source: dict[EnergySource, EnergyJ] = Field(default_factory=dict, max_length=4)
    batches_dropped: Count = 0
    shadow: ShadowReport | None = None

    def model_post_init(self, __context: Any) -> None:
        if self.interval_end < self.interval_start:
            raise ValueError("interval_end before interval_start")
        if self.unconfirmed_from is not None and self.unconfirmed_from > self.seq:
            raise ValueError("unconfirmed_from above seq")


class TelemetryAck(WireModel):
    """The server's "stored through" cursor of one device's telemetry, published (retained)
    after commit: every batch of ``incarnation`` up to ``stored_through`` is in the store
    (or was given up by the agent), so the agent may delete it."""

    max_bytes: ClassVar[int] = 1024
    device_id: Name
    incarnation: Incarnation
    stored_through: int = Field(ge=-1, le=MAX_SEQ)  # -1: nothing yet
    ts: Timestamp


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
    # No pin or unpin here: a pin travels only in the signed desired state
    # (``Manifest.pinned_variant``), and no agent subscribes to a commands topic.
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
