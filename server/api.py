"""The server's HTTP JSON API (FastAPI): the one door through which fleet state changes.

Every route under ``/v1`` needs ``Authorization: Bearer <token>``; ``/healthz`` and
``/openapi.json`` do not. Errors are JSON, always of one shape::

    {"error": {"status": 409, "message": "rollout #3 is paused, not active", "details": []}}

A refused request changes nothing: requests are validated in full (pydantic models with
unknown fields forbidden) before anything is written or published.

    GET  /healthz                          liveness, broker connection
    GET  /v1/devices                       devices, groups, last rollout report
    GET  /v1/devices/{id}
    PUT  /v1/devices/{id}/groups           {"groups": [...]} (registers an unknown device)
    PUT  /v1/blobs/{sha256}                raw ONNX bytes, checked against the digest
    GET  /v1/variants
    POST /v1/variants                      register an uploaded blob; publishes its chunks
    GET  /v1/rollouts
    POST /v1/rollouts                      create (see controller.RolloutRequest)
    GET  /v1/rollouts/{id}                 with per-device state and history
    POST /v1/rollouts/{id}/pause | resume | rollback
    GET  /v1/telemetry/summary?since=TS    fleet-wide aggregates
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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from prunefleet.shared import __version__
from prunefleet.shared.fsutil import atomic_write
from prunefleet.shared.messages import Name, Sha256

from .controller import RolloutController, RolloutRequest
from .errors import DistributionError, KeyringError, RegistryError, RolloutError, StoreError
from .fleet import FleetServer
from .metrics import CONTENT_TYPE, FleetCollector, make_registry, render
from .registry import Registry, VariantRegistration
from .store import Store

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# The page and its files: names and types are fixed, nothing else is served.
STATIC_FILES = {"dashboard.css": "text/css; charset=utf-8",
                "dashboard.js": "text/javascript; charset=utf-8"}
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


class GroupsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    groups: list[Name] = Field(max_length=32)


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


def _device_json(d, groups: list[str], report) -> dict[str, Any]:
    return {
        "device_id": d.device_id,
        "online": d.online,
        "last_seen": d.last_seen,
        "groups": groups,
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
        # The interactive docs load their assets from a CDN; /openapi.json is enough.
        docs_url=None,
        redoc_url=None,
    )
    app.state.token = ctx.token

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
        return _problem(e.status_code, str(e.detail))

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

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        connected = ctx.fleet.transport.connected.is_set()
        return {"status": "ok" if connected else "degraded", "broker_connected": connected,
                "version": __version__}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])

    # -- devices ----------------------------------------------------------------------------
    @v1.get("/devices", tags=["devices"])
    def list_devices(group: Name | None = None) -> list[dict]:
        groups = ctx.store.device_groups()
        out = []
        for d in ctx.store.devices():
            if group is not None and group not in groups.get(d.device_id, []):
                continue
            out.append(_device_json(d, groups.get(d.device_id, []),
                                    ctx.store.rollout_report(d.device_id)))
        return out

    @v1.get("/devices/{device_id}", tags=["devices"])
    def get_device(device_id: Annotated[Name, PathParam()]) -> dict:
        d = ctx.store.device(device_id)
        if d is None:
            raise ApiProblem(404, f"no device {device_id!r}")
        return _device_json(d, ctx.store.device_groups().get(device_id, []),
                            ctx.store.rollout_report(device_id))

    @v1.put("/devices/{device_id}/groups", tags=["devices"])
    def set_groups(device_id: Annotated[Name, PathParam()], body: GroupsBody) -> dict:
        ctx.store.set_device_groups(device_id, body.groups)
        return {"device_id": device_id, "groups": sorted(set(body.groups))}

    # -- variants ---------------------------------------------------------------------------
    @v1.put("/blobs/{sha256}", status_code=201, tags=["variants"])
    async def put_blob(sha256: Annotated[Sha256, PathParam()], request: Request) -> dict:
        w = ctx.registry.blob_writer(sha256)
        try:
            async for chunk in request.stream():
                w.write(chunk)  # a local file write; small enough for the event loop
            size, created = await asyncio.to_thread(w.commit)
        finally:
            w.discard()
        return {"sha256": sha256, "size": size, "created": created}

    @v1.get("/variants", tags=["variants"])
    def list_variants() -> list[dict]:
        return [_variant_json(r) for r in ctx.store.variants()]

    @v1.post("/variants", status_code=201, tags=["variants"])
    def register_variant(body: VariantRegistration) -> dict:
        spec = ctx.registry.register(body)
        row = ctx.store.variant(spec.sha256)
        return _variant_json(row)

    # -- rollouts ---------------------------------------------------------------------------
    @v1.get("/rollouts", tags=["rollouts"])
    def list_rollouts() -> list[dict]:
        return ctx.controller.summaries()

    @v1.post("/rollouts", status_code=201, tags=["rollouts"])
    def create_rollout(body: RolloutRequest) -> dict:
        rid = ctx.controller.create(body)
        return ctx.controller.describe(rid)

    @v1.get("/rollouts/{rollout_id}", tags=["rollouts"])
    def get_rollout(rollout_id: Annotated[int, PathParam(ge=1)]) -> dict:
        return ctx.controller.describe(rollout_id)

    @v1.post("/rollouts/{rollout_id}/pause", tags=["rollouts"])
    def pause_rollout(rollout_id: Annotated[int, PathParam(ge=1)]) -> dict:
        ctx.controller.pause(rollout_id)
        return ctx.controller.describe(rollout_id)

    @v1.post("/rollouts/{rollout_id}/resume", tags=["rollouts"])
    def resume_rollout(rollout_id: Annotated[int, PathParam(ge=1)]) -> dict:
        ctx.controller.resume(rollout_id)
        return ctx.controller.describe(rollout_id)

    @v1.post("/rollouts/{rollout_id}/rollback", tags=["rollouts"])
    def rollback_rollout(rollout_id: Annotated[int, PathParam(ge=1)]) -> dict:
        result = ctx.controller.rollback(rollout_id)
        return {**ctx.controller.describe(rollout_id), "rollback": result}

    # -- telemetry and keys -----------------------------------------------------------------
    @v1.get("/telemetry/summary", tags=["telemetry"])
    def telemetry_summary(since: Annotated[float, Query(ge=0)] = 0.0) -> dict:
        return ctx.store.telemetry_summary(since)

    @v1.get("/keys", tags=["keys"])
    def keys() -> dict:
        key = ctx.fleet.key
        ids = list(getattr(key, "keyids", [key.keyid]))
        return {"current": ids[0], "previous": ids[1] if len(ids) > 1 else None}

    app.include_router(v1)

    # -- metrics and dashboard --------------------------------------------------------------
    registry = make_registry(FleetCollector(
        ctx.store, lambda: ctx.fleet.counters,
        broker_connected=ctx.fleet.transport.connected.is_set,
    ))
    metrics_deps = [] if ctx.metrics_public else [Depends(require_token)]

    @app.get("/metrics", tags=["metrics"], dependencies=metrics_deps,
             response_class=Response)
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)

    @app.get("/dashboard", tags=["dashboard"], response_class=FileResponse)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "dashboard.html", headers=PAGE_HEADERS,
                            media_type="text/html; charset=utf-8")

    @app.get("/dashboard/static/{name}", tags=["dashboard"], response_class=FileResponse)
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
    token = secrets.token_urlsafe(32)
    atomic_write(path, (token + "\n").encode(), mode=0o600)
    return token

