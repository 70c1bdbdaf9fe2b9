"""An MQTT 3.1.1 broker inside the server process, for when no broker URL is configured.

:class:`EmbeddedBroker` runs an `amqtt <https://github.com/Yakifo/amqtt>`_ broker on its own
thread with its own asyncio event loop, so synchronous code (the server, the CLI, tests)
can start and stop it without caring about asyncio::

    with EmbeddedBroker() as broker:          # free loopback port
        client.connect(broker.host, broker.port)

It is meant for a single host and small fleets: anonymous access on loopback, no TLS, no
ACL, no persistence, no shared subscriptions (amqtt 0.12.1 has none). Production fleets use
mosquitto with the configuration in ``deploy/mosquitto/``.

amqtt 0.12.1 behaviour worth knowing (checked against its source):

* MQTT 3.1.1 only; an MQTT 5 CONNECT is refused.
* Retained messages live in memory and are lost by :meth:`EmbeddedBroker.stop`.
* No packet size limit: a client can make the broker buffer up to the MQTT maximum
  (256 MiB) per message. Only bind it to interfaces you trust (loopback by default).
* A subscriber receives each message at its *subscription* QoS, even when the message
  was published at a lower QoS (the spec says min(publish, subscription)).
* No per-client queue limit and no in-flight window: unlike mosquitto it never drops
  QoS 1 messages for a slow subscriber, it buffers them in memory instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from types import TracebackType
from typing import Any, Self

from amqtt.broker import Broker

__all__ = ["EmbeddedBroker", "EmbeddedBrokerError"]

log = logging.getLogger(__name__)

# amqtt logs every connection, packet and state change at INFO/DEBUG.
_NOISY_LOGGERS = ("amqtt", "transitions")


class _QuietFilter(logging.Filter):
    """Drop amqtt log records that are not errors for us.

    * a TCP connection closed before any MQTT packet (a port probe or health check) is
      logged at ERROR and WARNING;
    * a failed start is logged with a traceback, and :meth:`EmbeddedBroker.start` raises
      it anyway.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message == "Broker startup failed":
            return False
        return not (
            message.startswith(("No data from ", "Failed to initialize client session"))
            and "No data to decode MQTT packet fixed header" in message
        )


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not start or stop."""


class EmbeddedBroker:
    """An in-process amqtt broker on ``host:port`` (loopback and a free port by default).

    Args:
        host: address to bind. Keep the loopback default unless the network is trusted:
            there is no authentication.
        port: TCP port; ``0`` lets the OS pick a free one (read it back from :attr:`port`
            once started; it is kept across :meth:`stop`/:meth:`start`).
        log_level: level applied to amqtt's loggers (``amqtt``, ``transitions``) on
            start, ``WARNING`` by default because amqtt is very chatty at INFO. Pass
            ``None`` to leave logging configuration alone.
        start_timeout: seconds :meth:`start` and :meth:`stop` wait at most.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: int | None = logging.WARNING,
        start_timeout: float = 10.0,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid port {port}")
        self.host = host
        self._port = port
        self._log_level = log_level
        self._timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    # -- public API -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the OS-chosen one once started, if created with ``port=0``)."""
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Self:
        """Start the broker; return once it accepts connections.

        Raises:
            EmbeddedBrokerError: the broker did not start (port in use, timeout, ...).
        """
        with self._lock:
            if self.running:
                return self
            self._ready.clear()
            self._error = None
            # Both exist before the thread runs, so a stop request can never be lost.
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._stop_event = asyncio.Event()
            thread = threading.Thread(
                target=self._run,
                args=(loop, self._stop_event),
                name=f"prunefleet-broker-{self._port or 'new'}",
                daemon=True,
            )
            self._thread = thread
            thread.start()
            if not self._ready.wait(self._timeout):
                self._request_stop()
                thread.join(self._timeout)
                self._forget_thread()
                raise EmbeddedBrokerError(
                    f"embedded broker did not start within {self._timeout:g} s"
                )
            if self._error is not None:
                thread.join(self._timeout)
                self._forget_thread()
                raise EmbeddedBrokerError(
                    f"embedded broker failed to start on {self.host}:{self._port}: {self._error}"
                ) from self._error
            log.info("embedded MQTT broker listening on %s", self.url)
            return self

    def stop(self) -> None:
        """Disconnect every client, close the listener and end the broker thread.

        Idempotent. Retained messages and sessions are gone afterwards.
        """
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._request_stop()
            thread.join(self._timeout + 5)
            if thread.is_alive():
                raise EmbeddedBrokerError("embedded broker thread did not stop")
            self._forget_thread()
            log.info("embedded MQTT broker on %s stopped", self.url)

    def restart(self) -> None:
        """Stop and start again on the same port (simulates a broker outage)."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedBroker {self.url} {state}>"

    # -- broker thread ----------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self.host}:{self._port}"},
            },
            # Only what we need: anonymous access. No $SYS publisher, no packet/event
            # logger plugins (amqtt's defaults include all three).
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

    def _forget_thread(self) -> None:
        self._thread = None
        self._loop = None
        self._stop_event = None

    def _request_stop(self) -> None:
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed: nothing to stop
                loop.call_soon_threadsafe(event.set)

    def _run(self, loop: asyncio.AbstractEventLoop, stop_event: asyncio.Event) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(stop_event))
        except BaseException as exc:  # reported by start()
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("embedded broker crashed")
        finally:
            try:
                _cancel_all_tasks(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                asyncio.set_event_loop(None)
                self._ready.set()

    async def _serve(self, stop_event: asyncio.Event) -> None:
        if self._log_level is not None:
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).setLevel(self._log_level)
            broker_logger = logging.getLogger("amqtt.broker")
            if not any(isinstance(f, _QuietFilter) for f in broker_logger.filters):
                broker_logger.addFilter(_QuietFilter())
        broker = _ClosingBroker(self._config())
        await broker.start()
        try:
            if self._port == 0:
                self._port = _bound_port(broker)
            self._ready.set()
            await stop_event.wait()
        finally:
            try:
                await broker.shutdown()
            finally:
                await broker.close_client_connections()


class _ClosingBroker(Broker):
    """amqtt's broker, plus: every client connection it accepted is closed when done.

    amqtt 0.12.1 leaves some client sockets open at shutdown (and when a CONNECT fails);
    with the event loop closed afterwards they would surface as ResourceWarnings.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._client_writers: set[asyncio.StreamWriter] = set()

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        self._client_writers.add(writer)
        try:
            await super().stream_connected(reader, writer, listener_name)
        finally:
            self._client_writers.discard(writer)
            writer.close()

    async def close_client_connections(self, timeout: float = 2.0) -> None:
        writers = list(self._client_writers)
        for writer in writers:
            writer.close()
        if writers:
            await asyncio.wait(
                [asyncio.ensure_future(_wait_closed(w)) for w in writers], timeout=timeout
            )


async def _wait_closed(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):  # a reset connection is closed too
        await writer.wait_closed()


def _bound_port(broker: Broker) -> int:
    server = broker._servers["default"].instance  # amqtt keeps no public handle on it
    return int(server.sockets[0].getsockname()[1])


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what amqtt leaves behind (client connection handlers) and let it unwind."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
