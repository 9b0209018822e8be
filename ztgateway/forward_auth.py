"""Forward-auth: decide for an edge proxy (nginx `auth_request`, Traefik `ForwardAuth`).

Sites that keep nginx, Traefik or Caddy at the edge terminate TLS there; the proxy asks us
about each request on the ops listener and forwards the identity headers we answer with. The
request facts come from headers the proxy sets, so they are believed only from the configured
`forward_auth.trusted_proxies`; anything else is refused and audited.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import TYPE_CHECKING
from urllib.parse import unquote

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from multidict import CIMultiDict, CIMultiDictProxy

from .context import RequestContext
from .decision import Reason
from .responses import problem
from .tls import CertInfo, parse_client_cert

if TYPE_CHECKING:
    from .app import Gateway

# Headers the edge proxy sets to describe the original request (nginx snippet / Traefik).
_INPUT_HEADERS = frozenset(
    {
        "x-original-uri",
        "x-original-method",
        "x-forwarded-uri",
        "x-forwarded-method",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-for",
        "x-real-ip",
        "x-ssl-client-cert",
        "x-forwarded-tls-client-cert",
    }
)


def _cert_from_headers(h: CIMultiDictProxy[str]) -> CertInfo | None:
    nginx = h.get("X-SSL-Client-Cert")
    if nginx:
        # nginx $ssl_client_escaped_cert: the PEM, URL-encoded.
        cert = x509.load_pem_x509_certificate(unquote(nginx).encode())
        return parse_client_cert(cert.public_bytes(Encoding.DER))
    traefik = h.get("X-Forwarded-Tls-Client-Cert")
    if traefik:
        # Traefik passTLSClientCert pem=true: base64 DER without PEM armour, URL-encoded.
        der = base64.b64decode(unquote(traefik).split(",")[0])
        return parse_client_cert(der)
    return None


def _is_trusted(peer: str, gw: Gateway) -> bool:
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in net for net in gw.config.forward_auth.trusted_proxies)


async def forward_auth(request: web.Request, gw: Gateway) -> web.StreamResponse:
    cfg = gw.runtime.config
    peer = request.remote or ""
    h = request.headers
    if not cfg.forward_auth.enabled:
        raise web.HTTPNotFound()
    if not _is_trusted(peer, gw):
        ctx = RequestContext.synthetic(method="GET", path="/", client_ip=peer, clock=gw.clock)
        refused = gw.decisions.refuse(
            ctx, Reason.REQUEST_INVALID, "forward-auth caller not trusted", "request"
        ).decision
        status = 503 if refused.reason is Reason.SERVICE_UNAVAILABLE else 403
        return problem(refused.reason, ctx.decision_id, status=status)
    method = h.get("X-Original-Method") or h.get("X-Forwarded-Method") or "GET"
    uri = h.get("X-Original-URI") or h.get("X-Forwarded-Uri") or "/"
    host = h.get("X-Forwarded-Host", "")
    xff = h.get("X-Forwarded-For") or h.get("X-Real-IP") or peer
    client_ip = xff.split(",")[-1].strip()
    passed = CIMultiDict((k, v) for k, v in h.items() if k.lower() not in _INPUT_HEADERS)
    try:
        cert = _cert_from_headers(request.headers)
    except (ValueError, TypeError):
        cert = None
        bad_cert = True
    else:
        bad_cert = False
    ctx = RequestContext.synthetic(
        method=method,
        path=uri,
        host=host.split(":")[0],
        headers=dict(passed),
        client_ip=client_ip,
        cert=cert,
        clock=gw.clock,
    )
    ctx.peer_ip = peer
    if bad_cert:
        outcome = gw.decisions.refuse(
            ctx, Reason.CLIENT_CERT_INVALID, "unparseable forwarded certificate", "request"
        )
    else:
        # The same decide-and-record path as the data plane (security review M4): the audit
        # event, the metrics, and the session write-back (touch, anomaly, failed attempts,
        # revocation on TERMINATE) all happen here too.
        outcome = await gw.decisions.decide(ctx, gw.runtime)
    decision = outcome.decision
    if not decision.allowed or ctx.route is None:
        # nginx auth_request understands only 401 and 403 (anything else becomes a 500).
        status = 401 if decision.status == 401 else 403
        if decision.reason is Reason.SERVICE_UNAVAILABLE:
            status = 503
        resp = problem(decision.reason, ctx.decision_id, verdict=decision.verdict, status=status)
        resp.headers["X-ZT-Reason"] = decision.reason.value
        return resp
    return web.Response(status=200, headers=gw.asserted_identity(ctx))
