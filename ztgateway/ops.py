"""The ops listener (never on the mTLS port): health, readiness, metrics.

Bound to localhost by default; it exposes nothing a client of the gateway could use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from .audit import AuditUnavailable
from .context import RequestContext
from .responses import add_security_headers

if TYPE_CHECKING:
    from .app import Gateway

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")
RELAY_PEER_HEADER = "X-Ztgw-Relay-Peer"
"""Set by the workers' supervisor: the address of whoever called its ops port."""


@web.middleware
async def audit_durable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`[audit] durability = "fsync"`: what forward-auth, /decide and the admin API decided is
    on stable storage before the answer leaves (an edge proxy acts on it as on our own)."""
    response = await handler(request)
    audit = request.app[GATEWAY_KEY].audit
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
async def relayed_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A worker's ops socket is reachable only by its supervisor (a 0700 directory), so the
    caller address the supervisor names is the one trusted-proxy checks and audit events use.
    On a TCP ops listener the header is never believed."""
    if request.app[GATEWAY_KEY].ops_socket is None:
        return await handler(request)
    peer = request.headers.get(RELAY_PEER_HEADER, "")
    return await handler(request.clone(remote=peer))


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
    gw = request.app[GATEWAY_KEY]
    checks = await gw.readiness()
    ready = all(c.get("ok", False) for c in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not-ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    gw.metrics.audit_queue.set(gw.audit.stats.queued)
    return web.Response(body=gw.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def decide(request: web.Request) -> web.Response:
    """POST /decide: the live pipeline's decision for a described request (policy explain).

    Behind the admin token (admin.require_admin). A certificate given as PEM is verified as our
    listener verifies a handshake; one it would refuse is answered with that refusal."""
    from .decisions import explain_json, refusal
    from .edge.certverify import CertRefused

    gw = request.app[GATEWAY_KEY]
    refused: CertRefused | None = None
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        headers = body.get("headers") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ValueError("headers must be an object of strings")
        token = body.get("token")
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        cert = None
        if body.get("cert_pem"):
            try:
                pem = str(body["cert_pem"]).encode()
                cert = gw.tls.current.verifier.verify_pem(pem, gw.clock.time())
            except CertRefused as exc:
                refused = exc
        ctx = RequestContext.synthetic(
            method=str(body.get("method", "GET")),
            path=str(body.get("path", "/")),
            host=str(body.get("host", "127.0.0.1")),
            headers=headers,
            client_ip=str(body.get("client_ip", "127.0.0.1")),
            cert=cert,
            clock=gw.clock,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return web.json_response(
            {
                "type": "about:blank",
                "title": "bad /decide request",
                "status": 400,
                "detail": str(exc),
            },
            status=400,
            content_type="application/problem+json",
        )
    # The live configuration and state, but judged without side effects (no registration,
    # no rate-limit tokens spent).
    if refused is not None:
        decision = refusal(ctx, refused.reason, refused.detail)
    else:
        decision = (await gw.decisions.decide(ctx, *gw.dry_snapshot(), dry=True)).decision
    return web.json_response(explain_json(ctx, decision))


async def forward_auth_handler(request: web.Request) -> web.StreamResponse:
    from .forward_auth import forward_auth

    return await forward_auth(request, request.app[GATEWAY_KEY])


def create_ops_app(gateway: Gateway) -> web.Application:
    from .admin import add_admin_routes, require_admin

    app = web.Application(
        middlewares=[security_headers, audit_durable, relayed_peer, require_admin]
    )
    app[GATEWAY_KEY] = gateway
    add_admin_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/decide", decide)
    app.router.add_route("*", "/forward-auth", forward_auth_handler)
    return app
