"""Agent configuration: a TOML file, then ``PRUNEFLEET_AGENT_*`` environment overrides.

Limits, timeouts and queue sizes live here, with their units in the field names.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prunefleet.shared.topics import check_name

from .errors import AgentConfigError
from .policy import PolicyConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SensorConfig(_Strict):
    kind: Literal["system", "simulated"] = "system"
    sysfs_root: str = "/sys"
    # simulated only
    battery_capacity_j: float = Field(default=200.0, gt=0)
    battery_initial_percent: float = Field(default=100.0, ge=0, le=100)
    idle_drain_w: float = Field(default=0.0, ge=0)
    cpu_percent: float = Field(default=10.0, ge=0, le=100)
    mem_available_percent: float = Field(default=60.0, ge=0, le=100)
    temperature_c: float = 45.0
    charging: bool = False


class EnergyConfig(_Strict):
    """Estimated energy per inference: ``base_j + macs * joules_per_mac``."""

    base_j: float = Field(default=0.0005, ge=0)
    joules_per_mac: float = Field(default=2e-8, ge=0)


class CascadeConfig(_Strict):
    """Input complexity by cascade: the cheapest variant first, a larger one when unsure."""

    enabled: bool = False
    confidence: float = Field(default=0.9, gt=0, le=1)


class WorkloadPhase(_Strict):
    duration_s: float = Field(gt=0)
    noise_sigma: float = Field(default=0.0, ge=0)


class WorkloadConfig(_Strict):
    """A simulated application on the device (demo and tests): labelled digit requests."""

    data: str
    rate_hz: float = Field(default=50.0, gt=0, le=10000)
    phases: list[WorkloadPhase] = Field(
        default_factory=lambda: [WorkloadPhase(duration_s=8), WorkloadPhase(duration_s=8,
                                                                              noise_sigma=0.6)]
    )
    seed: int = 0


class AgentConfig(_Strict):
    device_id: str
    group: str | None = None
    broker_url: str = "mqtt://127.0.0.1:1883"
    fleet_prefix: str = "prunefleet"
    state_dir: Path = Path("/var/lib/prunefleet-agent")
    trusted_keys: list[Path] = Field(default_factory=list)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)
    sensor_interval_s: float = Field(default=1.0, gt=0)
    telemetry_interval_s: float = Field(default=10.0, gt=0)
    telemetry_queue_max_batches: int = Field(default=1000, ge=1)
    telemetry_max_in_flight: int = Field(default=10, ge=1, le=100)
    download_window_chunks: int = Field(default=8, ge=1, le=256)
    chunk_timeout_s: float = Field(default=15.0, gt=0)
    max_chunk_failures: int = Field(default=3, ge=1)
    complexity_ewma_alpha: float = Field(default=0.2, gt=0, le=1)
    # Request path cost bounds: at most one complexity estimate per interval (the stream's
    # smoothed complexity is sampled under load), and between sensor readings the policy
    # is re-run at most this often.
    complexity_min_interval_s: float = Field(default=0.005, ge=0, le=1)
    policy_eval_interval_s: float = Field(default=0.01, ge=0, le=1)
    intra_op_threads: int = Field(default=1, ge=1, le=64)
    # 0 keeps every installed variant loaded; N > 0 unloads the least recently used.
    max_loaded_variants: int = Field(default=0, ge=0, le=64)
    api_socket: Path | None = None
    api_max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    api_max_batch: int = Field(default=64, ge=1, le=65536)
    api_max_connections: int = Field(default=16, ge=1, le=1024)
    api_idle_timeout_s: float = Field(default=300.0, gt=0)
    api_io_timeout_s: float = Field(default=5.0, gt=0)

    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    sensors: SensorConfig = Field(default_factory=SensorConfig)
    energy: EnergyConfig = Field(default_factory=EnergyConfig)
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)
    workload: WorkloadConfig | None = None

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_name(v, "device id")

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
