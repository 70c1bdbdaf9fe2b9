"""What the server and the agent share: the wire protocol (topics, messages, chunks,
signatures, policy overrides) and the seams both sides are built on (the ``Transport``
protocol with its paho implementation and an in-memory double, the ``Clock``, atomic
writes, errors).

It knows neither side. Nothing here imports torch, onnx or ONNX Runtime; a device imports
it. Public names are imported on first use (only ``__version__`` and ``SCHEMA_VERSION``
are plain attributes).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
SCHEMA_VERSION = 1

_EXPORTS = {
    "BrokerAddress": "transport",
    "Clock": "clock",
    "FakeClock": "clock",
    "MemoryBroker": "memtransport",
    "MemoryTransport": "memtransport",
    "MqttTransport": "transport",
    "PolicyConfig": "policy",
    "PrunefleetError": "errors",
    "SigningKey": "signing",
    "SystemClock": "clock",
    "Topics": "topics",
    "Transport": "transport",
    "TrustedKeys": "signing",
    "apply_overrides": "policy",
    "atomic_write": "fsutil",
    "decode": "messages",
}

__all__ = sorted([*_EXPORTS, "SCHEMA_VERSION", "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
