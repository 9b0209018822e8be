"""The ops listener (never on the mTLS port): health, readiness, metrics, and the routes of
the admin API (admin.py), `/decide` (decide.py) and `/forward-auth` (forward_auth.py).

Bound to localhost by default; it exposes nothing a client of the gateway could use. Its
handlers find the gateway's `Services` (services.py) under `SERVICES_KEY`, never `Gateway`.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from ..audit import AuditUnavailable
from ..responses import add_security_headers
from ..services import SERVICES_KEY, Services
from .admin import add_admin_routes, require_admin
from .decide import decide
from .forward_auth import forward_auth
from .relay import relayed_peer


@web.middleware
async def audit_durable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`[audit] durability = "fsync"`: what forward-auth, /decide and the admin API decided is
    on stable storage before the answer leaves (an edge proxy acts on it as on our own)."""
    response = await handler(request)
    audit = request.app[SERVICES_KEY].audit
    if audit.needs_sync and not response.prepared:
        try:
            await audit.sync()
        except AuditUnavailable as exc:
            return web.json_response(
                {"type": "about:blank", "title": "audit unavailable", "status": 503,
                 "detail": str(exc)},
                status=503,
                content_type="application/problem+json",
                headers={"Retry-After": "5"},
            )  # fmt: skip
    return response


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """nosniff, no framing, no referrer, same-origin only: the ops answers are ours too (no
    HSTS: the ops listener speaks plain HTTP on a management address)."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        add_security_headers(exc, None)
        raise
    if not response.prepared:
        add_security_headers(response, None)
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[SERVICES_KEY]
    checks = await gw.readiness()
    ready = all(c.get("ok", False) for c in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not-ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[SERVICES_KEY]
    gw.metrics.audit_queue.set(gw.audit.stats.queued)
    return web.Response(body=gw.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def forward_auth_handler(request: web.Request) -> web.StreamResponse:
    return await forward_auth(request, request.app[SERVICES_KEY])


def create_ops_app(services: Services) -> web.Application:
    app = web.Application(
        middlewares=[security_headers, audit_durable, relayed_peer, require_admin]
    )
    app[SERVICES_KEY] = services
    add_admin_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/decide", decide)
    app.router.add_route("*", "/forward-auth", forward_auth_handler)
    return app
