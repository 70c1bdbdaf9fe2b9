"""Every MQTT topic prunefleet uses, built from validated parts.

Layout under a configurable fleet prefix (default ``prunefleet``)::

    <prefix>/devices/<device_id>/desired      server → device, retained, signed manifest
    <prefix>/devices/<device_id>/reported     device → server, retained (Last Will: offline)
    <prefix>/devices/<device_id>/telemetry    device → server, QoS 1
    <prefix>/devices/<device_id>/events       device → server, QoS 1
    <prefix>/devices/<device_id>/acked        server → device, retained, telemetry stored through
    <prefix>/groups/<group>/desired           server → group, retained, signed manifest
    <prefix>/artifacts/<sha256>/<index>       server → all, retained chunks (broker fans out)

A broker ACL such as ``pattern readwrite prunefleet/devices/%u/#`` therefore isolates
devices whose MQTT user name equals their device id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import TopicError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}){0,3}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# No commands channel: everything the server asks of a device is in its signed desired state.
DEVICE_CHANNELS = ("desired", "reported", "telemetry", "events", "acked")


def check_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a safe single topic level (no wildcards, no slash)."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise TopicError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '-', '.', "
            "starting with a letter or digit"
        )
    return value


def check_sha256(value: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise TopicError(f"invalid sha256 {value!r}: expected 64 lowercase hex digits")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic builder for one fleet prefix."""

    prefix: str = "prunefleet"

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _PREFIX.match(self.prefix):
            raise TopicError(f"invalid fleet prefix {self.prefix!r}")

    # per device
    def device(self, device_id: str, channel: str) -> str:
        check_name(device_id, "device id")
        if channel not in DEVICE_CHANNELS:
            raise TopicError(f"unknown device channel {channel!r}")
        return f"{self.prefix}/devices/{device_id}/{channel}"

    def desired(self, device_id: str) -> str:
        return self.device(device_id, "desired")

    def reported(self, device_id: str) -> str:
        return self.device(device_id, "reported")

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, "telemetry")

    def events(self, device_id: str) -> str:
        return self.device(device_id, "events")

    def acked(self, device_id: str) -> str:
        """The server's "telemetry stored through" cursor for the device (``TelemetryAck``)."""
        return self.device(device_id, "acked")

    def group_desired(self, group: str) -> str:
        return f"{self.prefix}/groups/{check_name(group, 'group')}/desired"

    # artifacts
    def chunk(self, sha256: str, index: int) -> str:
        if not isinstance(index, int) or index < 0:
            raise TopicError(f"invalid chunk index {index!r}")
        return f"{self.prefix}/artifacts/{check_sha256(sha256)}/{index}"

    # server-side subscriptions (wildcards)
    def all_devices(self, channel: str) -> str:
        if channel not in DEVICE_CHANNELS:
            raise TopicError(f"unknown device channel {channel!r}")
        return f"{self.prefix}/devices/+/{channel}"

    def shared(self, group: str, topic_filter: str) -> str:
        """A shared subscription (``$share/<group>/<filter>``) to split load across servers."""
        return f"$share/{check_name(group, 'share group')}/{topic_filter}"

    def parse_device(self, topic: str) -> tuple[str, str]:
        """Return ``(device_id, channel)`` of a per-device topic, or raise TopicError."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            raise TopicError(f"not a device topic: {topic!r}")
        rest = topic[len(head):].split("/")
        if len(rest) != 2 or rest[1] not in DEVICE_CHANNELS:
            raise TopicError(f"not a device topic: {topic!r}")
        return check_name(rest[0], "device id"), rest[1]

    def parse_chunk(self, topic: str) -> tuple[str, int]:
        head = f"{self.prefix}/artifacts/"
        if not topic.startswith(head):
            raise TopicError(f"not a chunk topic: {topic!r}")
        rest = topic[len(head):].split("/")
        if len(rest) != 2 or not rest[1].isdigit():
            raise TopicError(f"not a chunk topic: {topic!r}")
        return check_sha256(rest[0]), int(rest[1])
