"""The agent's real parts, built from its configuration (the simulator passes its own)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prunefleet.shared.clock import Clock
from prunefleet.shared.errors import SignatureError
from prunefleet.shared.messages import DeviceFacts, ReportedState
from prunefleet.shared.signing import TrustedKeys, load_public_pem
from prunefleet.shared.topics import Topics
from prunefleet.shared.transport import BrokerAddress, MqttTransport, TransportOptions

from .config import AgentConfig
from .devicefacts import FALLBACK_ACTIVE_POWER_W, read_facts
from .energy import EnergyMeter, find_meter
from .errors import AgentConfigError
from .sensors import Sensors, make_sensors
from .serving import ServingOptions

__all__ = ["broker_address", "device_facts", "device_transport", "energy_meter",
           "load_trusted_keys", "make_config_sensors", "serving_options"]


def load_trusted_keys(paths: list[Path]) -> TrustedKeys:
    """The public keys the agent pins; a missing or bad file is a configuration error."""
    keys = []
    for p in paths:
        try:
            keys.append(load_public_pem(Path(p).read_bytes()))
        except FileNotFoundError as e:
            raise AgentConfigError(f"trusted key not found: {p}") from e
        except SignatureError as e:
            raise AgentConfigError(f"trusted key {p}: {e}") from e
    if not keys:
        raise AgentConfigError("no trusted_keys configured: the agent would trust nothing")
    return TrustedKeys(keys)


def make_config_sensors(config: AgentConfig, clock: Clock) -> Sensors:
    s = config.sensors
    params: dict[str, Any]
    if s.kind == "system":
        params = {"sysfs_root": s.sysfs_root}
    else:
        params = {
            "capacity_j": s.battery_capacity_j,
            "initial_percent": s.battery_initial_percent,
            "idle_drain_w": s.idle_drain_w,
            "cpu_percent": s.cpu_percent,
            "mem_available_percent": s.mem_available_percent,
            "temperature_c": s.temperature_c,
            "charging": s.charging,
        }
    return make_sensors(s.kind, clock=clock, **params)


def device_facts(config: AgentConfig) -> DeviceFacts:
    """This machine's facts, with the configured device class and active power."""
    e = config.energy
    return read_facts("/", device_class=config.device_class, active_power=e.active_power_w,
                      active_power_by_class=e.class_active_power_w)


def energy_meter(config: AgentConfig) -> EnergyMeter | None:
    """The meter the profiler reads (None: the CPU-time estimate). Simulated sensors mean
    a simulated device: it measures nothing of the machine it runs on."""
    if config.sensors.kind != "system":
        return None
    return find_meter(config.sensors.sysfs_root, config.energy.meter,
                      config.energy.hwmon_chips or None)


def serving_options(config: AgentConfig, active_power_w: float | None = None) -> ServingOptions:
    """``active_power_w``: the device's (from its facts); default the configured one."""
    power = active_power_w or config.energy.active_power_w or FALLBACK_ACTIVE_POWER_W
    return ServingOptions(
        cascade=config.cascade,
        active_power_w=power,
        complexity_ewma_alpha=config.complexity_ewma_alpha,
        complexity_min_interval_s=config.complexity_min_interval_s,
        policy_eval_interval_s=config.policy_eval_interval_s,
    )


def broker_address(config: AgentConfig) -> BrokerAddress:
    """``broker_url``, with the password from ``broker_password_file`` when one is set
    (user name: the one in the URL, else the device id)."""
    address = BrokerAddress.parse(config.broker_url)
    path = config.broker_password_file
    if path is None:
        return address
    if address.password:
        raise AgentConfigError("broker_url has a password and broker_password_file is set: "
                               "keep the password in the file only")
    try:
        password = Path(path).read_text().strip()
    except OSError as e:
        raise AgentConfigError(f"broker_password_file {path}: {e.strerror or e}") from e
    if not password:
        raise AgentConfigError(f"broker_password_file {path} is empty")
    return dataclasses.replace(address, username=address.username or config.device_id,
                               password=password)


def device_transport(
    config: AgentConfig,
    *,
    address: BrokerAddress | None = None,
    client_id: str | None = None,
    inbound_queue_size: int = 2000,
) -> MqttTransport:
    """The device's MQTT connection, with the Last Will that marks it offline. The agent
    subscribes its own topics when it starts."""
    topics = Topics(config.fleet_prefix)
    return MqttTransport(
        address or broker_address(config),
        TransportOptions(
            client_id=client_id or f"pf-agent-{config.device_id}",
            keepalive_s=config.keepalive_s,
            reconnect_min_s=config.reconnect_min_s,
            reconnect_max_s=config.reconnect_max_s,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
            will_topic=topics.reported(config.device_id),
            will_payload=ReportedState(device_id=config.device_id, online=False).encode(),
            inbound_queue_size=inbound_queue_size,
            # The broker's PUBACKs for a window of telemetry, cursors and artifact chunks
            # arrive together: one read of the socket serves them all (paho alone makes
            # three or more system calls per packet).
            read_batch=64,
            # No queue item per PUBACK: the agent reads the transport's counts instead.
            report_published=False,
        ),
    )
