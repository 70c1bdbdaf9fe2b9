"""The agent's policy thresholds: a wire schema, since the signed desired state carries
overrides of them (per device or group) and the server validates those before signing.

:func:`apply_overrides` is the one place that merges a manifest's ``policy`` into a
device's own configuration; the server calls it with the defaults to refuse an override
that no agent would accept.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["PolicyConfig", "PolicyOverrideError", "apply_overrides"]


class PolicyOverrideError(ValueError):
    """An override that names an unknown setting or gives a value out of range."""


class PolicyConfig(BaseModel):
    """Thresholds of the policy; each ``*_hysteresis_*`` is the band a latched level needs
    to be crossed by before it is released."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    battery_low_percent: float = Field(default=30.0, ge=0, le=100)
    battery_critical_percent: float = Field(default=15.0, ge=0, le=100)
    # Battery hysteresis, for both the low and the critical level.
    hysteresis_percent: float = Field(default=5.0, ge=0, le=100)
    cpu_high_percent: float = Field(default=80.0, gt=0, le=100)
    cpu_hysteresis_percent: float = Field(default=10.0, ge=0, le=100)
    complexity_high: float = Field(default=0.6, ge=0, le=1)
    complexity_low: float = Field(default=0.4, ge=0, le=1)
    min_dwell_s: float = Field(default=2.0, ge=0)
    temperature_high_c: float = Field(default=80.0)
    temperature_hysteresis_c: float = Field(default=5.0, ge=0)
    mem_low_percent: float = Field(default=10.0, ge=0, le=100)
    mem_hysteresis_percent: float = Field(default=5.0, ge=0, le=100)
    latency_slo_ms: float | None = Field(default=None, gt=0)
    latency_hysteresis_percent: float = Field(default=20.0, ge=0, lt=100)

    @model_validator(mode="after")
    def _ordered(self) -> PolicyConfig:
        if self.battery_critical_percent >= self.battery_low_percent:
            raise ValueError("battery_critical_percent must be below battery_low_percent")
        if self.complexity_low > self.complexity_high:
            raise ValueError("complexity_low must not exceed complexity_high")
        return self


def apply_overrides(
    base: PolicyConfig, overrides: Mapping[str, float | int | bool | None] | None
) -> PolicyConfig:
    """``base`` with ``overrides`` applied; :class:`PolicyOverrideError` names the first
    setting that is unknown or out of range (and ``base`` is unchanged)."""
    if not overrides:
        return base
    try:
        return PolicyConfig.model_validate({**base.model_dump(), **overrides})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "policy"
        raise PolicyOverrideError(f"{where}: {first['msg']}") from e
