"""The agent's real parts, built from its configuration (the simulator passes its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunefleet.shared.clock import Clock
from prunefleet.shared.errors import SignatureError
from prunefleet.shared.messages import ReportedState
from prunefleet.shared.signing import TrustedKeys, load_public_pem
from prunefleet.shared.topics import Topics
from prunefleet.shared.transport import BrokerAddress, MqttTransport, TransportOptions

from .config import AgentConfig
from .errors import AgentConfigError
from .sensors import Sensors, make_sensors
from .serving import ServingOptions

__all__ = ["device_transport", "load_trusted_keys", "make_config_sensors", "serving_options"]


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


def serving_options(config: AgentConfig) -> ServingOptions:
    return ServingOptions(
        cascade=config.cascade,
        energy=config.energy,
        complexity_ewma_alpha=config.complexity_ewma_alpha,
        complexity_min_interval_s=config.complexity_min_interval_s,
        policy_eval_interval_s=config.policy_eval_interval_s,
    )


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
        address or BrokerAddress.parse(config.broker_url),
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
        ),
    )
