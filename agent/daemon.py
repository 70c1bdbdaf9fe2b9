"""The agent as a long-running process: local API, loop, watchdog, and a drain on stop.

Under systemd (``Type=notify``) the agent says READY once it serves, pings the watchdog
from the loop, and on SIGTERM says STOPPING, stops its request sources first (so what
they served is in the last telemetry batch), flushes queued telemetry for up to
``flush_timeout_s`` and publishes its reported state ``online=false`` before it
disconnects. Those bounds are I/O timeouts and use real time, whatever the agent's clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prunefleet.shared.errors import PrunefleetError

if TYPE_CHECKING:
    from .service import Agent

log = logging.getLogger(__name__)

__all__ = ["serve"]


def serve(agent: Agent, until: threading.Event | None = None,
          on_stop: Callable[[], None] | None = None, *, flush_timeout_s: float = 5.0) -> None:
    """Serve until ``agent.stop()`` (or ``until``) is set; then drain and disconnect."""
    cfg = agent.config
    api = None
    if cfg.api_socket is not None:
        from .api import ApiServer

        api = ApiServer.for_agent(
            agent, cfg.api_socket, max_request_bytes=cfg.api_max_request_bytes,
            max_batch=cfg.api_max_batch, max_connections=cfg.api_max_connections,
            max_connections_per_peer=cfg.api_max_connections_per_peer,
            idle_timeout_s=cfg.api_idle_timeout_s, io_timeout_s=cfg.api_io_timeout_s)
        api.start()
    agent.start()
    agent.notifier.ready(f"device {agent.device_id}")
    wd, next_wd = agent.notifier.watchdog_s, time.monotonic()
    stopped = agent.stopped
    while not stopped.is_set() and not (until is not None and until.is_set()):
        try:
            agent.step(wait_s=0.1)
        except (PrunefleetError, OSError) as e:
            # A broker that vanished mid-publish or a full disk must not stop serving; the
            # next pass retries (telemetry stays queued).
            log.error("service loop: %s", e)
            stopped.wait(0.5)
        if wd and time.monotonic() >= next_wd:
            agent.notifier.watchdog()
            next_wd = time.monotonic() + wd / 2
    if api is not None:
        api.stop()
    if on_stop is not None:
        on_stop()
    agent.begin_shutdown()
    deadline = time.monotonic() + flush_timeout_s
    while time.monotonic() < deadline and agent.flush_step():
        agent.step_inbound(0.05)
    agent.say_goodbye()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and not agent.goodbye_acknowledged():
        agent.step_inbound(0.05)
    agent.transport.stop()
