"""What the server and the agent share: the wire protocol (topics, messages, chunks,
signatures, policy overrides) and the seams both sides are built on (the ``Transport``
protocol with its paho implementation and an in-memory double, the ``Clock``, atomic
writes, errors).

It knows neither side. Nothing here imports torch, onnx or ONNX Runtime; a device imports
it. Public names are imported on first use (only ``__version__`` and ``SCHEMA_VERSION``
are plain attributes).
"""

from __future__ import annotations

from .lazy import lazy_exports

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
__getattr__ = lazy_exports(__name__, _EXPORTS)
