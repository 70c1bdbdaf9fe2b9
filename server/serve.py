"""``prunefleet serve``: the long-running server process.

It wires together the MQTT side (:class:`FleetServer`: distribution, desired state, ingest),
the rollout controller (ticking once a second), the variant registry and the HTTP API
(uvicorn), over one store. It is the single writer of fleet state: the admin CLI goes
through its API.

State directory layout (``--state-dir``, default ``.prunefleet/server``)::

    api-token         bearer token of the API (0600, created on first start)
    client-id         this server's MQTT client id (random, made on first start): its
                      persistent session holds telemetry sent while the server restarts
    keys/             signing keys (see keys.py; ``keys rotate`` is picked up live)
    blobs/            uploaded ONNX files by sha256
    fleet.db          the SQLite store, unless --db names another
"""

from __future__ import annotations

import logging
import re
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from sqlalchemy.engine import make_url

from prunefleet.shared.fsutil import atomic_write
from prunefleet.shared.gctune import tune_for_throughput

from .api import ApiContext, create_app, load_or_create_token
from .controller import RolloutController
from .errors import DistributionError, ServerError
from .fleet import FleetServer
from .keys import fingerprint, load_keyring
from .registry import Registry
from .store import Store, sqlite_url

if TYPE_CHECKING:
    from .broker import EmbeddedBroker  # imported lazily at run time (amqtt is heavy)

log = logging.getLogger(__name__)

TOKEN_FILE = "api-token"
CLIENT_ID_FILE = "client-id"


@dataclass
class ServeOptions:
    state_dir: Path = Path(".prunefleet/server")
    broker_url: str | None = None  # None: an embedded amqtt broker on loopback
    db_url: str | None = None  # None: SQLite in the state directory
    listen: str = "127.0.0.1:8080"
    key_dir: Path | None = None  # None: <state_dir>/keys
    prefix: str = "prunefleet"
    share_group: str | None = None
    tick_s: float = 1.0
    refresh_check_s: float = 600.0
    # Every repair_check_s, the lease holder publishes again the newest desired state of
    # an online device that reports an older one, signed at least repair_settle_s ago
    # (RolloutController.repair_desired).
    repair_check_s: float = 60.0
    repair_settle_s: float = 30.0
    # How a device's claimed version counts without a version certificate when a new or
    # restored store numbers desired states: "majority" (within the fleet's median) or
    # "certified" (not at all: every agent reports certificates). docs/security.md.
    version_claims: str = "majority"
    client_id: str | None = None  # None: kept in <state_dir>/client-id
    metrics_public: bool = False  # GET /metrics without the bearer token
    device_rate_per_s: float = 20.0  # messages a device may send per second (0: no limit)
    device_burst: float = 200.0  # … and at once
    retention_s: float | None = None  # delete telemetry and events older than this
    retention_check_s: float = 3600.0
    lease_ttl_s: float = 10.0  # a replica that stops renewing hands rollouts over after this
    probe_s: float = 5.0  # prove the ingest subscription delivers within this (0: skip)
    ingest_processes: int = 0  # 0: ingest on a thread of this process; N: N worker processes


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (loopback)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ServerError(f"bad --listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def load_or_create_client_id(path: Path) -> str:
    """The server's MQTT client id, made once and kept: the same id after a restart
    resumes the persistent session, so the broker delivers what it queued meanwhile. It is
    random, so a device cannot guess it and take the server's connection over."""
    try:
        cid = path.read_text().strip()
    except FileNotFoundError:
        cid = ""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", cid):
        cid = f"pf-server-{secrets.token_hex(8)}"
        atomic_write(path, (cid + "\n").encode(), mode=0o600)
    return cid


def db_url_for(url: str | None, state_dir: Path) -> str:
    if url is None:
        return sqlite_url(state_dir / "fleet.db")
    # SQLAlchemy's default PostgreSQL driver is psycopg2; prunefleet ships psycopg 3.
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


class FleetService:
    """Everything ``prunefleet serve`` runs; tests start it in-process."""

    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.state_dir = Path(opts.state_dir)
        self.key_dir = Path(opts.key_dir) if opts.key_dir else self.state_dir / "keys"
        self.token_path = self.state_dir / TOKEN_FILE
        self.broker: EmbeddedBroker | None = None
        self.store: Store | None = None
        self.fleet: FleetServer | None = None
        self.controller: RolloutController | None = None
        self.registry: Registry | None = None
        self.host, self.port = parse_listen(opts.listen)
        self._sock: socket.socket | None = None
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._keys_fp: tuple = ()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def token(self) -> str:
        return load_or_create_token(self.token_path)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, http_in_thread: bool = True) -> FleetService:
        """Start everything; the HTTP server too unless ``http_in_thread`` is False, in
        which case :meth:`serve_http` runs it on the calling thread."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        token = load_or_create_token(self.token_path)
        try:
            broker_url = self.opts.broker_url
            if broker_url is None:
                from .broker import EmbeddedBroker

                self.broker = EmbeddedBroker().start()
                broker_url = self.broker.url
            self.store = Store(db_url_for(self.opts.db_url, self.state_dir))
            keyring = load_keyring(self.key_dir)
            self._keys_fp = fingerprint(self.key_dir)
            client_id = self.opts.client_id or load_or_create_client_id(
                self.state_dir / CLIENT_ID_FILE)
            self.fleet = FleetServer(
                broker_url, self.store, keyring, prefix=self.opts.prefix,
                client_id=client_id,
                share_group=self.opts.share_group,
                # A broker keeps a share for a replica's persistent session while it is
                # away (mosquitto 2.0 queues it there), which a dead replica would hold for
                # good; with a share group the replicas' sessions end with their connection
                # and what one held is re-sent by the agents to the others.
                persistent_session=self.opts.share_group is None,
                device_rate_per_s=self.opts.device_rate_per_s,
                device_burst=self.opts.device_burst,
                version_claims=self.opts.version_claims,
                ingest_processes=self.opts.ingest_processes,
                held_dir=self.state_dir,
            )
            self.fleet.start()
            if self.opts.probe_s > 0:
                self.fleet.probe_ingest(self.opts.probe_s)
            self.registry = Registry(self.store, self.fleet, self.state_dir / "blobs")
            # The MQTT client id names this replica: unique per process (two sharing one
            # would take each other's broker session), and the same after a restart, which
            # so takes its own lease back at once.
            self.controller = RolloutController(self.fleet, self.store, holder=client_id,
                                                lease_ttl_s=self.opts.lease_ttl_s)
            self._republish_artifacts()
            self.controller.tick()  # continue unfinished rollouts at once
            self._ticker = threading.Thread(target=self._tick_loop, name="rollouts",
                                            daemon=True)
            self._ticker.start()
            app = create_app(ApiContext(self.store, self.fleet, self.controller,
                                        self.registry, token,
                                        metrics_public=self.opts.metrics_public))
            self._sock = socket.socket(
                socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM
            )
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((self.host, self.port))
            self.port = self._sock.getsockname()[1]
            self._http = uvicorn.Server(uvicorn.Config(
                app, log_level="warning", access_log=False, lifespan="off",
                timeout_graceful_shutdown=5,
            ))
            if http_in_thread:
                self._http_thread = threading.Thread(
                    target=self._http.run, kwargs={"sockets": [self._sock]},
                    name="http", daemon=True,
                )
                self._http_thread.start()
                deadline = time.monotonic() + 10
                while not self._http.started and time.monotonic() < deadline:
                    if not self._http_thread.is_alive():
                        raise ServerError("the HTTP server did not start")
                    time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        log.info("prunefleet server: API on %s, broker %s", self.url, broker_url)
        return self

    def serve_http(self) -> None:
        """Run the HTTP server on this thread until SIGINT/SIGTERM."""
        assert self._http is not None and self._sock is not None
        self._http.run(sockets=[self._sock])

    def stop(self, release: bool = True) -> None:
        """Stop everything. ``release`` False leaves the rollout controller lease to lapse,
        as a crash would (tests use it)."""
        self._stop.set()
        if self._http is not None and self._http_thread is not None:
            self._http.should_exit = True
            self._http_thread.join(10)
        if self._ticker is not None:
            self._ticker.join(10)
        if self.controller is not None and release:
            self.controller.release_lease()
        if self._sock is not None:
            self._sock.close()
        if self.fleet is not None:
            self.fleet.stop()
        if self.store is not None:
            self.store.close()
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> FleetService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        controller, fleet = self.controller, self.fleet
        assert controller is not None and fleet is not None  # start() sets them first
        next_refresh = next_prune = next_repair = 0.0
        while not self._stop.wait(self.opts.tick_s):
            try:
                self._reload_keys()
                controller.tick()
                now = time.monotonic()
                if now >= next_refresh:
                    # Re-sign desired states past half their lifetime, well before expiry.
                    controller.refresh_desired(older_than_s=fleet.manifest_ttl_s / 2)
                    next_refresh = now + self.opts.refresh_check_s
                if now >= next_repair:
                    next_repair = now + self.opts.repair_check_s
                    controller.repair_desired(settle_s=self.opts.repair_settle_s)
                if self.opts.retention_s and now >= next_prune and self.store is not None:
                    next_prune = now + self.opts.retention_check_s
                    gone = self.store.prune_telemetry(time.time() - self.opts.retention_s)
                    if any(gone.values()):
                        log.info("retention: deleted %d telemetry batches and %d events",
                                 gone["telemetry"], gone["events"])
            except Exception:  # the loop must survive anything one tick meets
                log.exception("rollout tick failed")

    def _reload_keys(self) -> None:
        assert self.fleet is not None and self.controller is not None  # only after start()
        fp = fingerprint(self.key_dir)
        if fp != self._keys_fp:
            self._keys_fp = fp
            ring = load_keyring(self.key_dir)
            self.fleet.key = ring
            log.warning("signing keys changed on disk: now signing with %s",
                        ", ".join(k[:12] for k in ring.keyids))
            # Retained desired states carry the new set of signatures from now on.
            self.controller.refresh_desired()

    def _republish_artifacts(self) -> None:
        """Publish every registered variant's chunks again (retained; idempotent), so a
        broker that lost its retained messages serves them again."""
        from prunefleet.shared.messages import VariantSpec

        assert self.store is not None and self.fleet is not None  # start() sets them first
        for row in self.store.variants():
            path = Path(row.path)
            if not path.exists():
                log.warning("variant %s: file %s is gone; not republished", row.name, path)
                continue
            try:
                self.fleet.publish_artifact(VariantSpec.model_validate(row.spec),
                                            path.read_bytes())
            except DistributionError as e:
                log.error("variant %s not republished: %s", row.name, e)


def _span(seconds: float) -> str:
    """A duration as an operator wrote it: 30d, 1h, 90m, 45s."""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def serve(opts: ServeOptions, out=print) -> int:
    svc = FleetService(opts)
    # This process is the server: thousands of messages a second (shared/gctune.py). Not
    # in FleetService, which tests and tools start inside processes of their own.
    tune_for_throughput()
    svc.start(http_in_thread=False)
    assert svc.fleet is not None and svc.store is not None  # start() set them or raised
    # uvicorn handles SIGTERM (graceful shutdown) and then re-raises it to the handler it
    # found; a no-op one lets the process clean up and exit 0, as systemd expects.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        out(f"prunefleet server: API {svc.url} (token in {svc.token_path}), "
            f"broker {svc.fleet.transport.address.url}, "
            f"store {make_url(svc.store.url).render_as_string(hide_password=True)}")
        # The token is never printed (stdout ends up in logs); the page takes it from the
        # URL fragment, which the browser does not send to the server.
        out(f"dashboard: {svc.url}/dashboard#token=<contents of {svc.token_path}>; "
            f"metrics: {svc.url}/metrics"
            + (" (public)" if opts.metrics_public else " (bearer token)"))
        if opts.retention_s:
            out(f"retention: telemetry and events older than {_span(opts.retention_s)} "
                f"are deleted every {_span(opts.retention_check_s)}")
        svc.serve_http()
    finally:
        svc.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0
