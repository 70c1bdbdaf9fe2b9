"""Agent configuration: a TOML file, then ``PRUNEFLEET_AGENT_*`` environment overrides.

Limits, timeouts and queue sizes live here, with their units in the field names.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prunefleet.shared.topics import check_name

from .errors import AgentConfigError
from .follower import DEFAULT_MAX_VERSION_JUMP
from .policy import PolicyConfig


class _Strict(BaseModel):
    # Each field's docstring is its description: docs/agent-config.md is made of them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class SensorConfig(_Strict):
    kind: Literal["system", "simulated"] = "system"
    """Where readings come from: "system" reads battery, CPU, memory and temperature from the device
    (/sys, /proc); "simulated" plays them (a battery that drains with the energy of each inference,
    fixed CPU, memory and temperature), for the demo, tests and trying the agent on a laptop."""
    sysfs_root: str = "/sys"
    """Root of the sysfs tree the system sensors and energy meters read (a copy of it in tests)."""
    battery_capacity_j: float = Field(default=200.0, gt=0)
    """Simulated only: the battery capacity in joules."""
    battery_initial_percent: float = Field(default=100.0, ge=0, le=100)
    """Simulated only: the battery level at start, in percent."""
    idle_drain_w: float = Field(default=0.0, ge=0)
    """Simulated only: watts the battery loses besides inference."""
    cpu_percent: float = Field(default=10.0, ge=0, le=100)
    """Simulated only: the CPU load reported, in percent."""
    mem_available_percent: float = Field(default=60.0, ge=0, le=100)
    """Simulated only: the free memory reported, in percent."""
    temperature_c: float = 45.0
    """Simulated only: the temperature reported, in degrees Celsius."""
    charging: bool = False
    """Simulated only: whether the battery reports charging."""


class EnergyConfig(_Strict):
    """How the device measures its energy (docs/hardware.md).

    ``meter``: ``auto`` takes RAPL, then a board power monitor (hwmon), then the battery
    gauge; or name one; ``estimate`` measures nothing and counts CPU time times active power.
    ``active_power_w`` (watts one busy core adds) feeds that estimate: set it for this
    device, or per device class in ``class_active_power_w``; the default is the
    architecture's (``prunefleet.agent.devicefacts.DEFAULT_ACTIVE_POWER_W``).
    """

    meter: Literal["auto", "rapl", "hwmon", "battery", "estimate"] = "auto"
    """Which meter measures energy: "auto" takes RAPL, then a board power monitor (hwmon), then the
    battery gauge; or name one; "estimate" measures nothing and counts CPU time times
    active_power_w."""
    active_power_w: float | None = Field(default=None, gt=0, le=1000)
    """Watts one busy core adds over idle, for the CPU-time estimate; unset: the per-class value,
    else the architecture default."""
    class_active_power_w: dict[str, Annotated[float, Field(gt=0, le=1000)]] = Field(
        default_factory=dict, max_length=64)
    """active_power_w per device class, e.g. {"aarch64-neon-4c" = 1.2}; used when active_power_w is
    unset."""
    hwmon_chips: list[str] = Field(default_factory=list, max_length=16)
    """Only these hwmon chip names count as board power monitors (e.g. ["ina219"]); empty: any that
    is not a GPU."""


class ProfileConfig(_Strict):
    """On-device profiles of installed variants (agent/profile.py): bounded, and never in
    the way of a request."""

    enabled: bool = True
    """Profile each installed variant on this device (latency, CPU time, memory, energy); the policy
    orders variants by these figures."""
    runs: int = Field(default=200, ge=5, le=100_000)
    """Timed inferences at batch 1 per profile."""
    warmup_runs: int = Field(default=10, ge=0, le=10_000)
    """Untimed inferences before the timed ones."""
    slice_runs: int = Field(default=10, ge=1, le=1000)
    """Inferences between yields to requests."""
    cpu_budget_percent: float = Field(default=25.0, gt=0, le=100)
    """Share of one core the profiler may use; it sleeps between slices to stay below."""
    idle_gap_ms: float = Field(default=50.0, ge=0, le=60_000)
    """A request within this many milliseconds pauses the profiler (and voids the slice)."""
    energy_max_s: float = Field(default=10.0, ge=0, le=600)
    """Longest busy time spent measuring energy per variant (a slow meter wants seconds)."""
    nice: int = Field(default=10, ge=0, le=19)
    """The profiler thread's niceness (Linux)."""


class ShadowConfig(_Strict):
    """Shadow evaluation while a rollout is judged (agent/shadow.py): a sampled share of
    requests replayed on the variants under evaluation and a reference, never in the way of
    a request."""

    enabled: bool = True
    """Take part when a desired state asks for it (the rollout's gate then counts this device
    as missing evidence if off)."""
    queue_max: int = Field(default=32, ge=1, le=4096)
    """Sampled requests waiting for the worker; more are dropped and counted."""
    cpu_budget_percent: float = Field(default=10.0, gt=0, le=100)
    """Share of one core the worker may use; it rests between samples to stay below."""
    nice: int = Field(default=10, ge=0, le=19)
    """The worker thread's niceness (Linux)."""


class CascadeConfig(_Strict):
    """Input complexity by cascade: the cheapest variant first, a larger one when unsure."""

    enabled: bool = True
    """Estimate input complexity by cascade: serve with the cheapest variant, and run the input
    again on the variant the policy allows when the answer is unsure (reason "cascade"). On by
    default, where the variant set allows it: two or more servable variants with the same input
    shape and the same classes (two or more), whose scores give a top-class probability; with any
    other set, or with false, the input's own statistics estimate complexity."""
    confidence: float = Field(default=0.9, gt=0, le=1)
    """Top-class probability below which the cheap answer is unsure and escalates."""


class WorkloadPhase(_Strict):
    duration_s: float = Field(gt=0)
    """How long the phase lasts, in seconds."""
    noise_sigma: float = Field(default=0.0, ge=0)
    """Standard deviation of Gaussian noise added to each input (a "busy scene" the complexity
    estimate notices); 0 for clean inputs."""


class WorkloadConfig(_Strict):
    """A simulated application on the device (demo and tests): labelled digit requests."""

    data: str
    """An .npz file with labelled inputs: x (N, C, H, W) float32 and y (N,) labels."""
    rate_hz: float = Field(default=50.0, gt=0, le=10000)
    """Requests per second."""
    phases: list[WorkloadPhase] = Field(
        default_factory=lambda: [WorkloadPhase(duration_s=8), WorkloadPhase(duration_s=8,
                                                                              noise_sigma=0.6)]
    )
    """Phases played in turn, then again from the first."""
    seed: int = 0
    """Seed of the random choice of inputs and of the noise."""


class AgentConfig(_Strict):
    device_id: str
    """This device's id (1-64 letters, digits, "_", "-", "."): its topics, telemetry and MQTT
    client id (pf-agent-ID) carry it."""
    group: str | None = None
    """A group whose desired state this device follows too (the newest valid one of device and group
    wins)."""
    device_class: str | None = None
    """The device class the fleet groups this device in; derived from its hardware (e.g.
    x86_64-avx512vnni-8c) when unset."""
    broker_url: str = "mqtt://127.0.0.1:1883"
    """The MQTT broker: mqtt://host:port, or mqtts://host:port for TLS; user[:password]@ may precede
    the host."""
    fleet_prefix: str = "prunefleet"
    """Topic prefix of the fleet; the same as the server's serve --prefix."""
    state_dir: Path = Path("/var/lib/prunefleet-agent")
    """Where the agent keeps its state: installed variants, partial downloads, the accepted manifest
    and version floors, the telemetry queue, profiles. Must survive reboots."""
    trusted_keys: list[Path] = Field(default_factory=list)
    """PEM files of the public keys whose signature the agent accepts on a desired state (the
    server's public.pem; during a key rotation the old and the new one). At least one."""
    ca_file: str | None = None
    """CA certificate that signed the broker's TLS certificate (mqtts://); unset: the system's
    CAs."""
    cert_file: str | None = None
    """Client certificate for TLS client authentication."""
    key_file: str | None = None
    """Private key of cert_file."""
    broker_password_file: Path | None = None
    """The broker password in a file of its own (0600, the agent's user only), so the config may be
    readable by the group applications join for the local socket. The user name is the device id
    unless broker_url names one."""

    keepalive_s: int = Field(default=30, ge=5, le=3600)
    """MQTT keepalive: the broker drops a connection silent for 1.5 times this, and sends the Last
    Will (offline)."""
    reconnect_min_s: float = Field(default=1.0, gt=0)
    """First reconnect delay after the broker is lost; it doubles per attempt (with jitter) up to
    reconnect_max_s."""
    reconnect_max_s: float = Field(default=60.0, gt=0)
    """Longest reconnect delay."""
    sensor_interval_s: float = Field(default=1.0, gt=0)
    """How often sensors are read and the policy sees new readings."""
    telemetry_interval_s: float = Field(default=10.0, gt=0)
    """Length of one telemetry batch (requests, latency, energy, switches per variant)."""
    telemetry_queue_max_batches: int = Field(default=1000, ge=1)
    """Batches kept on disk while the broker or server is away; past it the oldest is dropped and
    counted."""
    telemetry_max_in_flight: int = Field(default=10, ge=1, le=100)
    """Batches sent and not yet confirmed by the server at once."""
    telemetry_ack_timeout_s: float = Field(default=30.0, gt=0, le=86400)
    """A batch the server has not confirmed storing this long after it was sent is sent again (the
    server drops the duplicate and confirms it)."""
    download_window_chunks: int = Field(default=8, ge=1, le=256)
    """Chunks of a variant requested at once (a bounded window, so a slow device is never
    flooded)."""
    chunk_timeout_s: float = Field(default=15.0, gt=0)
    """A requested chunk that has not arrived after this long is requested again."""
    max_chunk_failures: int = Field(default=3, ge=1)
    """A chunk that fails its hash this many times fails the download (install_failed)."""
    max_version_jump: int = Field(default=DEFAULT_MAX_VERSION_JUMP, ge=1)
    """A manifest version this far above the last one accepted is refused (a runaway counter would
    otherwise make every later manifest look like a rollback)."""
    complexity_ewma_alpha: float = Field(default=0.2, gt=0, le=1)
    """Smoothing of the input complexity estimate (exponential moving average; 1: the last input
    only)."""
    complexity_min_interval_s: float = Field(default=0.005, ge=0, le=1)
    """At most one complexity estimate per this interval; under load the stream's smoothed
    complexity is sampled."""
    policy_eval_interval_s: float = Field(default=0.01, ge=0, le=1)
    """Between sensor readings the policy is re-run at most this often on the request path."""
    intra_op_threads: int = Field(default=1, ge=1, le=64)
    """ONNX Runtime threads per inference."""
    max_loaded_variants: int = Field(default=0, ge=0, le=64)
    """0 keeps every installed variant loaded (a switch is a reference swap); N > 0 keeps at most N
    sessions and unloads the least recently used; one that no longer loads (its file deleted or
    damaged) is served by the nearest loaded variant, tried again at most once a minute and
    counted (`load_failures` in the reported state)."""
    api_socket: Path | None = None
    """Path of the local inference API's Unix socket (docs/agent.md); unset: no local API."""
    api_max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest request body the local API takes."""
    api_max_batch: int = Field(default=64, ge=1, le=65536)
    """Most inputs in one request."""
    api_max_connections: int = Field(default=16, ge=1, le=1024)
    """Most connections at once; past it the longest idle one is closed, or the new one is answered
    busy."""
    api_max_connections_per_peer: int = Field(default=8, ge=1, le=1024)
    """Most connections of one client user id (SO_PEERCRED); the longest idle one makes room past
    it."""
    api_idle_timeout_s: float = Field(default=300.0, gt=0)
    """An idle connection is closed after this long."""
    api_io_timeout_s: float = Field(default=5.0, gt=0)
    """A frame that stops arriving midway closes its connection after this long."""

    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """Thresholds of the policy that picks the variant; a desired state may override them."""
    sensors: SensorConfig = Field(default_factory=SensorConfig)
    """Where sensor readings come from."""
    energy: EnergyConfig = Field(default_factory=EnergyConfig)
    """How energy per inference is measured or estimated."""
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    """On-device profiling of installed variants."""
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    """Shadow evaluation of variants under a rollout's evaluation."""
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)
    """Complexity by confidence cascade instead of the input's own statistics."""
    workload: WorkloadConfig | None = None
    """A simulated application sending labelled requests (demo and tests); unset on a real
    device."""

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_name(v, "device id")

    @field_validator("device_class")
    @classmethod
    def _device_class(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "device class")

    @field_validator("group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "group")


ENV_PREFIX = "PRUNEFLEET_AGENT_"
_ENV_FIELDS = ("device_id", "group", "broker_url", "fleet_prefix", "state_dir")


def load_config(
    path: Path | None, env: Mapping[str, str] | None = None, **overrides
) -> AgentConfig:
    """Read ``path`` (TOML), apply environment then explicit overrides, validate."""
    env = os.environ if env is None else env
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise AgentConfigError(f"config file not found: {path}") from e
        except tomllib.TOMLDecodeError as e:
            raise AgentConfigError(f"{path}: not valid TOML: {e}") from e
    for name in _ENV_FIELDS:
        val = env.get(ENV_PREFIX + name.upper())
        if val:
            data[name] = val
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AgentConfigError(f"agent config: {where}: {first['msg']}") from e
