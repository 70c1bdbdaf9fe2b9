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

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    battery_low_percent: float = Field(default=30.0, ge=0, le=100)
    """Battery at or below this (not charging): at most the middle of the variant table."""
    battery_critical_percent: float = Field(default=15.0, ge=0, le=100)
    """Battery at or below this (not charging): the cheapest variant, at once (no dwell); with the
    cascade its unsure answers still escalate to the middle of the table. Below
    battery_low_percent."""
    battery_life_target_h: float | None = Field(default=None, gt=0)
    """Lifetime mode: hours on battery the device must last (counted from when the agent
    last saw it go on battery, or started). The agent serves the mix of variants with the
    highest expected accuracy whose measured energy lasts until then at the observed request
    rate, and plans again as the rate and the charge change; it replaces battery_low_percent
    and battery_critical_percent until the target has passed. Unset: off."""
    battery_capacity_wh: float | None = Field(default=None, gt=0)
    """The battery's capacity, for lifetime mode on a device whose gauge gives only a
    percentage (the remaining charge is this times the percentage). A simulated battery
    knows its own; unset elsewhere: lifetime mode cannot plan and the battery thresholds
    apply."""
    hysteresis_percent: float = Field(default=5.0, ge=0, le=100)
    """A low or critical battery level is released only this many points above its threshold."""
    cpu_high_percent: float = Field(default=80.0, gt=0, le=100)
    """CPU load at or above this: one step cheaper."""
    cpu_hysteresis_percent: float = Field(default=10.0, ge=0, le=100)
    """High CPU is released only this many points below cpu_high_percent."""
    complexity_high: float = Field(default=0.6, ge=0, le=1)
    """Input complexity (0..1) at or above this takes the dearest variant the budget allows."""
    complexity_low: float = Field(default=0.4, ge=0, le=1)
    """Input complexity at or below this takes one step cheaper than the budget; between the two the
    level is kept."""
    min_dwell_s: float = Field(default=2.0, ge=0)
    """Least time between two switches (a critical battery does not wait)."""
    temperature_high_c: float = Field(default=80.0)
    """Temperature at or above this: one step cheaper."""
    temperature_hysteresis_c: float = Field(default=5.0, ge=0)
    """Too hot is released only this many degrees below temperature_high_c."""
    mem_low_percent: float = Field(default=10.0, ge=0, le=100)
    """Free memory at or below this: one step cheaper, and only the active variant stays loaded."""
    mem_hysteresis_percent: float = Field(default=5.0, ge=0, le=100)
    """Low memory is released only this many points above mem_low_percent."""
    latency_slo_ms: float | None = Field(default=None, gt=0)
    """Recent latency above this: one more step cheaper; unset: no latency objective."""
    latency_hysteresis_percent: float = Field(default=20.0, ge=0, lt=100)
    """The SLO step is undone only when the dearer variant is predicted to run this many percent
    below latency_slo_ms."""

    accuracy_margin_pp: float = Field(default=1.0, ge=0, le=100)
    """A variant that is slower than another on this device is left out when it is also less
    accurate by more than this many points; a smaller difference (within the noise of a
    held-out set) is a tie."""

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
