"""The fleet server: variant preparation, registry, signed distribution, rollouts,
telemetry ingest and store, HTTP API and dashboard, admin CLI, fleet simulator.

Public names (imported on first use: torch loads only when preparation is asked for):

- :class:`FleetServer` (``fleet``): publishes artifacts and signed desired states,
  ingests telemetry; :class:`FleetService` (``serve``): the server process's parts
- :class:`Store` (``store``): SQLite or PostgreSQL
- :class:`Simulator`, :class:`SimOptions` (``simulator``): simulated devices running the
  agent's own code
- :func:`main` (``cli``): the ``prunefleet`` command
"""

from __future__ import annotations

from prunefleet.shared.lazy import lazy_exports

_EXPORTS = {
    "FleetServer": "fleet",
    "FleetService": "serve",
    "SimOptions": "simulator",
    "Simulator": "simulator",
    "Store": "store",
    "main": "cli",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
