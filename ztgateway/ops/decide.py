"""`POST /decide` on the ops listener: the live pipeline's decision for a described request.

Policy explain for operators (behind the admin token, admin.py): judged on the current
configuration and state, without side effects (`Services.dry_snapshot`: no registration, no
rate-limit tokens spent, nothing recorded).
"""

from __future__ import annotations

from aiohttp import web

from ..context import RequestContext
from ..decisions import explain_json, refusal
from ..edge.certverify import CertRefused
from ..services import SERVICES_KEY


async def decide(request: web.Request) -> web.Response:
    """POST /decide: the live pipeline's decision for a described request (policy explain).

    Behind the admin token (ops/admin.require_admin). A certificate given as PEM is verified as our
    listener verifies a handshake; one it would refuse is answered with that refusal."""
    gw = request.app[SERVICES_KEY]
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
