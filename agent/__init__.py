"""The device agent: follows the signed desired state, serves predictions with ONNX
Runtime on the variant its policy picks, and reports telemetry.

Public names (imported on first use, so ``import prunefleet.agent`` and the application
client stay light: no ONNX Runtime until the agent itself is needed):

- :class:`Agent` — the coordinator (``service``); :func:`load_config`, :class:`AgentConfig`
- the pure cores: :class:`ManifestFollower` (``follower``), :func:`decide`,
  :func:`order_variants`, :func:`plan_cascade` (``policy``), :func:`rollout_report`
  (``phase``), :class:`Aggregator` (``telemetry``)
- for applications on the device: :class:`Client` (``client``)
"""

from __future__ import annotations

from prunefleet.shared.lazy import lazy_exports

_EXPORTS = {
    "Agent": "service",
    "AgentConfig": "config",
    "Aggregator": "telemetry",
    "Client": "client",
    "ManifestFollower": "follower",
    "decide": "policy",
    "load_config": "config",
    "order_variants": "policy",
    "plan_cascade": "policy",
    "rollout_report": "phase",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
