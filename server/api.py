"""The server's HTTP JSON API (FastAPI): the one door through which fleet state changes.

Every route under ``/v1`` needs ``Authorization: Bearer <token>``; ``/healthz``,
``/readyz`` and ``/openapi.json`` do not. The token and the body size are checked before
any body is read (:mod:`.httpguard`): 401 without the token, 413 over the route's cap
(4 MiB for JSON, the artifact limit for ``PUT /v1/blobs``). Errors are JSON, always of one shape::

    {"error": {"status": 409, "message": "rollout #3 is paused, not active", "details": []}}

A refused request changes nothing: requests are validated in full (pydantic models with
unknown fields forbidden) before anything is written or published.

    GET  /healthz                          liveness: broker connection, store reachable
    GET  /readyz                           the same, 503 unless both
    GET  /v1/devices?q=&group=&online=&limit=&offset=   devices, groups, last rollout
                                           report (X-Total-Count: how many match)
    GET  /v1/devices/{id}
    PUT  /v1/devices/{id}/groups           {"groups": [...]} (registers an unknown device)
    POST /v1/devices/{id}/approve          grant the group the device asks for
    POST /v1/devices/{id}/revoke           mark its broker identity revoked
    GET  /v1/devices/{id}/profile          its facts and on-device profiles per variant
    GET  /v1/classes                       device classes: profiles aggregated per variant
    GET  /v1/classes/{class}/devices       the devices that report that class
    PUT  /v1/blobs/{sha256}                raw ONNX bytes, checked against the digest
    GET  /v1/variants
    POST /v1/variants                      register an uploaded blob; publishes its chunks
    GET  /v1/rollouts
    POST /v1/rollouts                      create (see controller.RolloutRequest)
    GET  /v1/rollouts/{id}                 with per-device state and history
    POST /v1/rollouts/{id}/pause | resume | rollback
    POST /v1/pins                          {"target", "variant" (null: unpin), "kind"?}
    POST /v1/profiles/refresh              {"target", "kind"?}: profile installed variants again
    GET  /v1/telemetry/summary?since=TS    fleet-wide aggregates
    GET  /v1/devices/{id}/telemetry?since=&until=&resolution=&format=json|csv|jsonl
    GET  /v1/fleet/series?since=&until=&resolution=   fleet trends (server/history.py)
    GET  /v1/keys                          key ids the server signs with
    GET  /metrics                          Prometheus text format (token unless public)
    GET  /dashboard                        the fleet page; its files under /dashboard/static/

The dashboard page itself needs no token: it holds no data, and reads the token from its
URL fragment (never sent to a server) to call the ``/v1`` routes.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from prunefleet.shared import __version__
from prunefleet.shared.errors import ProtocolError
from prunefleet.shared.fsutil import atomic_write
from prunefleet.shared.messages import (
    MAX_ARTIFACT_BYTES,
    Manifest,
    Name,
    Sha256,
    SignedManifest,
    decode,
)

from .controller import PinRequest, ReprofileRequest, RolloutController, RolloutRequest
from .errors import DistributionError, KeyringError, RegistryError, RolloutError, StoreError
from .fleet import FleetServer
from .history import (
    DeviceHistory,
    FleetSeries,
    device_history,
    device_page,
    fleet_series,
    parse_range,
    to_csv,
    to_jsonl,
)
from .httpguard import MAX_JSON_BODY_BYTES, MAX_OTHER_BODY_BYTES, RequestGuard
from .metrics import CONTENT_TYPE, FleetCollector, make_registry, render
from .registry import Registry, VariantRegistration
from .store import Store

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# The page and its files: names and types are fixed, nothing else is served.
STATIC_FILES = {"dashboard.css": "text/css; charset=utf-8",
                "dashboard.js": "text/javascript; charset=utf-8",
                "charts.js": "text/javascript; charset=utf-8",
                "favicon.svg": "image/svg+xml"}
# Everything from this origin, nothing inline, no framing: untrusted device strings that
# slipped into the DOM as markup could still not run.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@dataclass
class ApiContext:
    store: Store
    fleet: FleetServer
    controller: RolloutController
    registry: Registry
    token: str
    metrics_public: bool = False  # /metrics without the bearer token


class StoreProbe:
    """Whether the store answers, for the health routes: asked at most every ``cache_s``,
    one question at a time, and waited for at most ``wait_s``. An open route must not hang
    on a database whose network went silent (no refusal ever comes: the probe says
    unreachable after ``wait_s`` while the question goes on), nor let anyone who can reach
    it load the database."""

    def __init__(self, store: Store, cache_s: float = 1.0, wait_s: float = 2.0) -> None:
        self.store = store
        self.cache_s = cache_s
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._ok = True
        self._at = -1e18  # when _ok was learnt (monotonic)
        self._answered = threading.Event()
        self._asking = False

    def reachable(self) -> bool:
        with self._lock:
            if time.monotonic() - self._at < self.cache_s:
                return self._ok
            if not self._asking:
                self._asking = True
                self._answered = threading.Event()
                threading.Thread(target=self._ask, args=(self._answered,),
                                 name="store-probe", daemon=True).start()
            answered = self._answered
        if not answered.wait(self.wait_s):
            with self._lock:
                self._ok, self._at = False, time.monotonic()
            log.warning("health: the store has not answered in %.0f s", self.wait_s)
            return False
        with self._lock:
            return self._ok

    def _ask(self, answered: threading.Event) -> None:
        try:
            self.store.ping()
            ok = True
        except StoreError as e:
            log.warning("health: the store does not answer: %s", e)
            ok = False
        except Exception:
            log.exception("health: asking the store failed")
            ok = False
        with self._lock:
            self._ok, self._at, self._asking = ok, time.monotonic(), False
        answered.set()


class GroupsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    groups: list[Name] = Field(max_length=32)


# Ids in paths are database integers: larger ones name nothing (422, not an overflow).
MAX_ID = 2**31 - 1
RolloutId = Annotated[int, PathParam(ge=1, le=MAX_ID)]


class PruneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    older_than_s: float = Field(gt=0, le=100 * 365 * 86400)


class ErrorDetail(BaseModel):
    status: int
    message: str
    details: list[Any]


class ErrorBody(BaseModel):
    """Every refusal: ``{"error": {"status", "message", "details"}}``."""

    error: ErrorDetail


_ERRORS = {
    400: "the body cannot be parsed",
    401: "missing or wrong bearer token",
    404: "what the request names does not exist",
    409: "refused in the current state (nothing changed)",
    413: "the body is too large",
    422: "the request does not validate (nothing changed)",
    503: "the store or the broker is unavailable",
}


def _allowed_methods(request: Request) -> str | None:
    """Every method the OpenAPI document declares at the request's path (routers keep one
    route per method, so Starlette's own ``Allow`` names only one route's)."""
    path = request.url.path
    for template, ops in request.app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return ", ".join(sorted(m.upper() for m in ops if m in _HTTP_METHODS)) or None
    return None


_HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the refusals a route can answer with, so the document
    declares every status the API sends (tests/test_fuzz_api.py checks it)."""
    return {c: {"model": ErrorBody, "description": _ERRORS[c]} for c in codes}


class ApiProblem(Exception):
    def __init__(self, status: int, message: str, details: list | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []


def _problem(status: int, message: str, details: list | None = None,
             headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "message": message, "details": details or []}},
        status_code=status, headers=headers,
    )


def _device_json(d, groups: list[str], report, requested: str | None = None,
                 revoked_at: float | None = None) -> dict[str, Any]:
    return {
        "device_id": d.device_id,
        "online": d.online,
        # When `prunefleet devices revoke` took its broker identity away (None: never).
        "revoked_at": revoked_at,
        "last_seen": d.last_seen,
        "groups": groups,
        # The group the device's own configuration names: a request, not membership.
        "requested_group": requested,
        "agent_version": d.agent_version,
        "manifest_version": d.manifest_version,
        "active_variant": d.active_variant,
        "installed": d.installed or [],
        "last_error": d.last_error,
        "counters": d.counters or {},
        "rollout": None if report is None else {
            "manifest_version": report.manifest_version, "phase": report.phase,
            "progress": report.progress, "reason": report.reason, "ts": report.ts,
        },
    }


def _profile_only(store: Store, version: int | None) -> list[str]:
    """The variants the desired state a device reports holding marks profile-only
    (installed and measured, never served): ``prunefleet tune``'s candidates."""
    row = store.manifest(version) if version else None
    if row is None:
        return []
    try:
        m = decode(Manifest, decode(SignedManifest, row.signed).payload)
    except ProtocolError:
        return []
    return sorted(m.profile_only)


def _variant_json(row) -> dict[str, Any]:
    spec = row.spec
    return {
        "name": row.name, "sha256": row.sha256, "size": spec["size"],
        "chunks": len(spec["chunk_sha256"]), "chunk_bytes": spec["chunk_bytes"],
        "input_shape": spec["input_shape"], "num_classes": spec["num_classes"],
        "params": spec["params"], "macs": spec["macs"], "accuracy": spec.get("accuracy"),
        "latency_ms": spec.get("latency_ms"), "technique": spec.get("technique"),
        "golden": spec.get("golden") is not None, "created_at": row.created_at,
    }


class AuditLog:
    """ASGI middleware: one log line per request that may change fleet state (anything
    but GET/HEAD/OPTIONS): route, outcome, what changed (``request.state.audit``, set by
    the route) and the client's address. Refused requests are logged as warnings."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            client = scope.get("client")
            who = f"{client[0]}:{client[1]}" if client else "unknown client"
            what = scope.get("state", {}).get("audit")
            level = logging.INFO if status < 400 else logging.WARNING
            what = what or ("done" if status < 400 else "refused" if status < 500
                            else "failed")
            log.log(level, "%s %s from %s: %d %s", scope["method"], scope["path"], who,
                    status, what)


def _audit(request: Request, what: str) -> None:
    """What a request changed, for :class:`AuditLog`."""
    request.state.audit = what


TIME_HELP = "seconds since the epoch, ISO 8601, 'now', or a duration before now (24h)"
RESOLUTION_HELP = "bucket width: 60, 5m, 1h (default: at most 240 buckets over the range)"


def _range(since: str | None, until: str | None, resolution: str | None):
    try:
        return parse_range(since, until, resolution)
    except ValueError as e:
        raise ApiProblem(422, str(e)) from e


_bearer = HTTPBearer(auto_error=False)


def require_token(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token: str = request.app.state.token
    if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
        raise ApiProblem(401, "missing or wrong bearer token")


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="prunefleet server",
        version=__version__,
        description="Fleet state, variants, rollouts and telemetry of a prunefleet server.",
        # The interactive docs would load their assets from a CDN, which a server without
        # internet cannot; /docs and /redoc say where the description is instead.
        docs_url=None,
        redoc_url=None,
    )
    app.state.token = ctx.token

    def protected(path: str) -> bool:
        return path.startswith("/v1/") or (path == "/metrics" and not ctx.metrics_public)

    def body_cap(method: str, path: str) -> int:
        if method == "PUT" and path.startswith("/v1/blobs/"):
            return MAX_ARTIFACT_BYTES
        return MAX_JSON_BODY_BYTES if method in ("POST", "PUT", "PATCH") \
            else MAX_OTHER_BODY_BYTES

    # Token and body size before any route reads a byte of the body (see httpguard).
    http_refused: dict[int, int] = {}  # by status; the guard counts, /metrics exports
    app.state.http_refused = http_refused
    app.add_middleware(RequestGuard, token=ctx.token, protected=protected, body_cap=body_cap,
                       refused=http_refused)
    app.add_middleware(AuditLog)

    @app.exception_handler(ApiProblem)
    async def _api_problem(_req: Request, e: ApiProblem) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _problem(e.status, e.message, e.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": err.get("msg", "")}
            for err in e.errors()
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        return _problem(422, f"{'.'.join(first['loc'])}: {first['msg']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(e, "headers", None) or {})
        allowed = _allowed_methods(_req) if e.status_code == 405 else None
        if allowed:
            headers["Allow"] = allowed
        return _problem(e.status_code, str(e.detail), headers=headers or None)

    @app.exception_handler(RolloutError)
    async def _rollout(_req: Request, e: RolloutError) -> JSONResponse:
        return _problem(e.status, str(e))

    @app.exception_handler(RegistryError)
    async def _registry(_req: Request, e: RegistryError) -> JSONResponse:
        return _problem(e.status, str(e))

    @app.exception_handler(DistributionError)
    async def _distribution(_req: Request, e: DistributionError) -> JSONResponse:
        return _problem(503, f"broker: {e}")

    @app.exception_handler(StoreError)
    async def _store(_req: Request, e: StoreError) -> JSONResponse:
        log.error("store error: %s", e)
        return _problem(503, "store unavailable")

    probe = StoreProbe(ctx.store)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        """Liveness: 200 while the process answers, with what it depends on; ``status``
        is ``degraded`` while the broker or the store is out of reach. A supervisor
        should not restart the server for that (a restart brings neither back); a load
        balancer should look at ``/readyz``."""
        connected = ctx.fleet.transport.connected.is_set()
        reachable = probe.reachable()
        return {"status": "ok" if connected and reachable else "degraded",
                "broker_connected": connected, "store_reachable": reachable,
                "version": __version__}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "degraded"}})
    def readyz() -> JSONResponse:
        """Readiness: ``/healthz``'s answer, 503 while the broker or the store is out of
        reach, so that a load balancer in front of several replicas sends operators to
        one that can serve them."""
        body = healthz()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/docs", include_in_schema=False)
    @app.get("/redoc", include_in_schema=False)
    def no_docs_ui() -> None:
        raise ApiProblem(404, "no interactive API docs on this server (they would load "
                         "their assets from the internet): the OpenAPI description is "
                         "GET /openapi.json (no token needed), for any OpenAPI viewer")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)],
                   responses=errors(401, 503))

    # -- devices ----------------------------------------------------------------------------
    @v1.get("/devices", tags=["devices"])
    def list_devices(
        response: Response,
        group: Name | None = None,
        q: Annotated[str | None, Query(max_length=64,
                                       description="part of the id or active variant")] = None,
        online: bool | None = None,
        limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
        offset: Annotated[int, Query(ge=0, le=10**7)] = 0,
    ) -> list[dict]:
        """Devices ordered by id, searched, filtered and paged in one query; the number
        matching (all pages) is in the ``X-Total-Count`` header."""
        total, page = device_page(ctx.store, q=q, group=group, online=online, limit=limit,
                                  offset=offset)
        response.headers["X-Total-Count"] = str(total)
        requests, revoked = ctx.store.group_requests(), ctx.store.revocations()
        return [_device_json(d, groups, report, requests.get(d.device_id),
                             revoked.get(d.device_id))
                for d, report, groups in page]

    @v1.get("/devices/{device_id}", tags=["devices"], responses=errors(404))
    def get_device(device_id: Annotated[Name, PathParam()]) -> dict:
        d = ctx.store.device(device_id)
        if d is None:
            raise ApiProblem(404, f"no device {device_id!r}")
        return _device_json(d, ctx.store.device_groups().get(device_id, []),
                            ctx.store.rollout_report(device_id),
                            ctx.store.group_requests().get(device_id),
                            ctx.store.revocations().get(device_id))

    @v1.put("/devices/{device_id}/groups", tags=["devices"], responses=errors(400))
    def set_groups(device_id: Annotated[Name, PathParam()], body: GroupsBody,
                   request: Request) -> dict:
        ctx.store.set_device_groups(device_id, body.groups)
        groups = sorted(set(body.groups))
        _audit(request, f"device {device_id} groups set to {', '.join(groups) or '(none)'}")
        return {"device_id": device_id, "groups": groups}

    @v1.post("/devices/{device_id}/approve", tags=["devices"], responses=errors(404, 409))
    def approve_group(device_id: Annotated[Name, PathParam()], request: Request) -> dict:
        """Grant the group the device asked for (its reported group)."""
        if ctx.store.device(device_id) is None:
            raise ApiProblem(404, f"no device {device_id!r}")
        granted = ctx.store.approve_group_request(device_id)
        if granted is None:
            raise ApiProblem(409, f"device {device_id!r} asks for no group")
        _audit(request, f"device {device_id} joined group {granted}")
        return {"device_id": device_id, "approved": granted,
                "groups": ctx.store.device_groups().get(device_id, [])}

    @v1.post("/devices/{device_id}/revoke", tags=["devices"])
    def revoke_device(device_id: Annotated[Name, PathParam()], request: Request) -> dict:
        """Record that the device's broker identity was revoked (``prunefleet devices
        revoke`` removes it from the broker's password file first): the server drops what
        it still sends and leaves it out of rollout targets. Repeating it keeps the first
        time."""
        ts = ctx.store.revoke_device(device_id)
        ctx.fleet.forget_revocations()  # nothing it sends from now on counts
        _audit(request, f"device {device_id} revoked")
        return {"device_id": device_id, "revoked_at": ts}

    @v1.delete("/devices/{device_id}", tags=["devices"], responses=errors(404, 409, 503))
    def delete_device(device_id: Annotated[Name, PathParam()], request: Request) -> dict:
        """Decommission a device: its retained broker topics (desired and reported state,
        telemetry cursor) and its store rows go; its revocation stays. Refused while it is
        online: revoke it (or stop its agent) first."""
        d = ctx.store.device(device_id)
        if d is None:
            raise ApiProblem(404, f"no device {device_id!r}")
        if d.online:
            raise ApiProblem(409, f"device {device_id} is online; revoke it or stop its "
                             "agent first")
        ctx.fleet.clear_device_topics(device_id)
        ctx.store.delete_device(device_id)
        _audit(request, f"device {device_id} deleted")
        return {"device_id": device_id, "deleted": True}

    # -- measured on the devices ------------------------------------------------------------
    @v1.get("/devices/{device_id}/profile", tags=["devices"], responses=errors(404))
    def device_profile(device_id: Annotated[Name, PathParam()]) -> dict:
        """The device's facts and its on-device profile of each installed variant."""
        d = ctx.store.device(device_id)
        if d is None:
            raise ApiProblem(404, f"no device {device_id!r}")
        facts, profiles = ctx.store.device_measurements(device_id)
        return {"device_id": device_id,
                "device_class": None if facts is None else facts.get("device_class"),
                "facts": facts, "profiles": profiles,
                # What it serves, and the candidates it holds only to measure them.
                "active_variant": d.active_variant,
                "profile_only": _profile_only(ctx.store, d.manifest_version)}

    @v1.get("/classes", tags=["devices"])
    def device_classes() -> dict:
        """Per device class: how many devices, and each registered variant's profile
        figures across them (count, median, quartiles, range)."""
        return {"classes": ctx.store.class_measurements()}

    @v1.get("/classes/{device_class}/devices", tags=["devices"])
    def class_devices(device_class: Annotated[Name, PathParam()]) -> dict:
        """The devices whose last reported facts name this class (what a rollout to the
        class targets; ``prunefleet tune`` picks from them), with whether each is online,
        revoked, and the desired state it follows."""
        members = set(ctx.store.class_members(device_class))
        revoked = ctx.store.revocations()
        return {"device_class": device_class, "devices": [
            {"device_id": d.device_id, "online": d.online,
             "manifest_version": d.manifest_version, "revoked": d.device_id in revoked}
            for d in ctx.store.devices() if d.device_id in members]}

    # -- variants ---------------------------------------------------------------------------
    @v1.put("/blobs/{sha256}", status_code=201, tags=["variants"], responses=errors(413))
    async def put_blob(sha256: Annotated[Sha256, PathParam()], request: Request) -> dict:
        w = ctx.registry.blob_writer(sha256)
        try:
            async for chunk in request.stream():
                w.write(chunk)  # a local file write; small enough for the event loop
            size, created = await asyncio.to_thread(w.commit)
        finally:
            w.discard()
        _audit(request, f"blob {sha256[:12]} ({size} bytes) "
                        f"{'stored' if created else 'was stored already'}")
        return {"sha256": sha256, "size": size, "created": created}

    @v1.get("/variants", tags=["variants"])
    def list_variants() -> list[dict]:
        return [_variant_json(r) for r in ctx.store.variants()]

    @v1.post("/variants", status_code=201, tags=["variants"], responses=errors(400, 404, 409))
    def register_variant(body: VariantRegistration, request: Request) -> dict:
        spec = ctx.registry.register(body)
        row = ctx.store.variant(spec.sha256)
        _audit(request, f"variant {spec.name} ({spec.sha256[:12]}) registered")
        return _variant_json(row)

    # -- rollouts ---------------------------------------------------------------------------
    @v1.get("/rollouts", tags=["rollouts"])
    def list_rollouts() -> list[dict]:
        return ctx.controller.summaries()

    @v1.post("/rollouts", status_code=201, tags=["rollouts"], responses=errors(400, 404, 409))
    def create_rollout(body: RolloutRequest, request: Request) -> dict:
        rid = ctx.controller.create(body)
        t = body.target
        to = f"group {t.group}" if t.group else f"{len(t.devices)} device(s)" \
            if t.kind == "devices" else f"class {t.device_class}" if t.device_class \
            else "the fleet"
        _audit(request, f"rollout #{rid} created: {', '.join(body.variants)} to {to}")
        return ctx.controller.describe(rid)

    @v1.get("/rollouts/{rollout_id}", tags=["rollouts"], responses=errors(404))
    def get_rollout(rollout_id: RolloutId) -> dict:
        return ctx.controller.describe(rollout_id)

    @v1.post("/rollouts/{rollout_id}/pause", tags=["rollouts"], responses=errors(404, 409))
    def pause_rollout(rollout_id: RolloutId, request: Request) -> dict:
        ctx.controller.pause(rollout_id)
        _audit(request, f"rollout #{rollout_id} paused")
        return ctx.controller.describe(rollout_id)

    @v1.post("/rollouts/{rollout_id}/resume", tags=["rollouts"], responses=errors(404, 409))
    def resume_rollout(rollout_id: RolloutId, request: Request) -> dict:
        ctx.controller.resume(rollout_id)
        _audit(request, f"rollout #{rollout_id} resumed")
        return ctx.controller.describe(rollout_id)

    @v1.post("/rollouts/{rollout_id}/rollback", tags=["rollouts"], responses=errors(404, 409))
    def rollback_rollout(rollout_id: RolloutId,
                         request: Request) -> dict:
        result = ctx.controller.rollback(rollout_id)
        _audit(request, f"rollout #{rollout_id} rolled back: {len(result['restored'])} "
                        f"device(s) restored, {len(result['skipped'])} kept")
        return {**ctx.controller.describe(rollout_id), "rollback": result}

    # -- pins -------------------------------------------------------------------------------
    @v1.post("/pins", tags=["devices"], responses=errors(400, 404, 409))
    def pin(body: PinRequest, request: Request) -> dict:
        """Pin (``variant``) or unpin (``variant`` null) through a new signed desired state."""
        out = ctx.controller.pin(body)
        _audit(request, f"{body.target} pinned to {body.variant}" if body.variant
               else f"{body.target} unpinned")
        return out

    @v1.post("/profiles/refresh", tags=["devices"], responses=errors(400, 404, 409))
    def refresh_profiles(body: ReprofileRequest, request: Request) -> dict:
        """Ask a device (or every device of a group) to profile each installed variant
        again, through a new signed desired state (``Manifest.reprofile``)."""
        out = ctx.controller.reprofile(body)
        _audit(request, f"{body.target}: profiles refresh requested on "
                        f"{len(out['devices'])} device(s)")
        return out

    # -- telemetry and keys -----------------------------------------------------------------
    @v1.post("/telemetry/prune", tags=["telemetry"], responses=errors(400, 422))
    def prune_telemetry(body: PruneRequest, request: Request) -> dict:
        """Retention: delete telemetry and events older than ``older_than_s``."""
        before = time.time() - body.older_than_s
        deleted = ctx.store.prune_telemetry(before)
        _audit(request, f"telemetry before {before:.0f} pruned: {deleted}")
        return {"before": before, "deleted": deleted}

    @v1.get("/telemetry/summary", tags=["telemetry"])
    def telemetry_summary(since: Annotated[float, Query(ge=0)] = 0.0) -> dict:
        return ctx.store.telemetry_summary(since)

    @v1.get("/devices/{device_id}/telemetry", tags=["telemetry"], response_model=DeviceHistory,
            responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}}},
                       **errors(404)})
    def device_telemetry(
        device_id: Annotated[Name, PathParam()],
        since: Annotated[str | None, Query(max_length=40, description=TIME_HELP)] = None,
        until: Annotated[str | None, Query(max_length=40, description=TIME_HELP)] = None,
        resolution: Annotated[str | None, Query(max_length=20,
                                                description=RESOLUTION_HELP)] = None,
        format: Literal["json", "csv", "jsonl"] = "json",
    ) -> Any:
        """One device's telemetry over a time range, bucketed (see server/history.py)."""
        if ctx.store.device(device_id) is None:
            raise ApiProblem(404, f"no device {device_id!r}")
        h = device_history(ctx.store, device_id, _range(since, until, resolution))
        if format == "json":
            return h
        body, media = ((to_csv(h), "text/csv; charset=utf-8") if format == "csv"
                       else (to_jsonl(h), "application/x-ndjson"))
        return Response(body, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="{device_id}-telemetry.{format}"'})

    @v1.get("/fleet/series", tags=["telemetry"], response_model=FleetSeries)
    def fleet_trends(
        since: Annotated[str | None, Query(max_length=40, description=TIME_HELP)] = None,
        until: Annotated[str | None, Query(max_length=40, description=TIME_HELP)] = None,
        resolution: Annotated[str | None, Query(max_length=20,
                                                description=RESOLUTION_HELP)] = None,
    ) -> FleetSeries:
        """Fleet trends per bucket: requests and energy by variant, switches by reason,
        devices reporting, rollout progress."""
        return fleet_series(ctx.store, _range(since, until, resolution))

    @v1.get("/keys", tags=["keys"])
    def keys() -> dict:
        key = ctx.fleet.key
        ids = list(getattr(key, "keyids", [key.keyid]))
        return {"current": ids[0], "previous": ids[1] if len(ids) > 1 else None}

    app.include_router(v1)

    # -- metrics and dashboard --------------------------------------------------------------
    registry = make_registry(FleetCollector(
        ctx.store, lambda: ctx.fleet.counters,
        broker_connected=ctx.fleet.transport.connected.is_set, prime=True,
        http_refused=lambda: dict(http_refused),
        controller=lambda: (ctx.controller.holds_lease, ctx.controller.lease_lost,
                            ctx.controller.republished),
    ))
    metrics_deps = [] if ctx.metrics_public else [Depends(require_token)]

    @app.get("/metrics", tags=["metrics"], dependencies=metrics_deps,
             response_class=Response, responses={
                 200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}},
                 **({} if ctx.metrics_public else errors(401))})
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)

    @app.get("/dashboard", tags=["dashboard"], response_class=FileResponse)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "dashboard.html", headers=PAGE_HEADERS,
                            media_type="text/html; charset=utf-8")

    @app.get("/dashboard/static/{name}", tags=["dashboard"], response_class=FileResponse,
             responses=errors(404))
    def dashboard_file(name: str) -> FileResponse:
        if name not in STATIC_FILES:
            raise ApiProblem(404, f"no file {name!r}")
        return FileResponse(STATIC_DIR / name, headers=PAGE_HEADERS,
                            media_type=STATIC_FILES[name])

    return app


def load_or_create_token(path: Path) -> str:
    """The API token in ``path`` (0600), created on first use."""
    import secrets

    path = Path(path)
    if path.exists():
        token = path.read_text().strip()
        if len(token) < 16:
            raise KeyringError(f"API token in {path} is too short (16 characters at least)")
        return token
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hex: a token that started with "-" (1 in 64 of token_urlsafe's) would be taken for
    # an option by a command line such as `--token <token>`.
    token = secrets.token_hex(32)
    atomic_write(path, (token + "\n").encode(), mode=0o600)
    return token

