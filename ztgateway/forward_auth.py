"""Forward-auth: decide for an edge proxy (nginx `auth_request`, Traefik `ForwardAuth`, Caddy).

Sites that keep nginx, Traefik or Caddy at the edge terminate TLS there; the proxy asks us
about each request on the ops listener and forwards the identity headers we answer with. The
request facts come from headers the proxy sets, so:

- they are believed only from the configured `forward_auth.trusted_proxies`; anything else is
  refused and audited;
- only the configured edge's headers are read (`[forward_auth] edge`): the nginx snippet sets
  `X-Original-URI`, Traefik and Caddy `X-Forwarded-Uri`, and the other spelling in a request
  was written by the client;
- the client certificate is read from the one header the operator configured
  (`[forward_auth] cert_header`) and verified again, as our listener verifies a handshake
  (`certverify`): an edge with `ssl_verify_client optional_no_ca`, or a client header the edge
  forgot to clear, must not become an identity (security review H1);
- any other certificate, identity or original-URL header in the request is refused, not
  ignored: the edge forwards the client's headers to the upstream as they are, so what we
  cannot strip we must not allow.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .audit import AuditUnavailable
from .certverify import CertRefused
from .context import RequestContext, spoofed_headers
from .decision import Decision, Reason
from .headerfamilies import EDGES, CertFormat
from .ops import RELAY_PEER_HEADER
from .responses import problem
from .tls import CertInfo

if TYPE_CHECKING:
    from .app import Gateway


def _is_trusted(peer: str, gw: Gateway) -> bool:
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in net for net in gw.config.forward_auth.trusted_proxies)


def _answer(gw: Gateway, ctx: RequestContext, decision: Decision) -> web.StreamResponse:
    try:
        gw.record_decision(ctx, decision)
    except AuditUnavailable:
        return problem(Reason.SERVICE_UNAVAILABLE, ctx.decision_id, status=503)
    if not decision.allowed or ctx.route is None:
        # nginx auth_request understands only 401 and 403 (anything else becomes a 500).
        status = 401 if decision.status == 401 else 403
        resp = problem(decision.reason, ctx.decision_id, verdict=decision.verdict, status=status)
        resp.headers["X-ZT-Reason"] = decision.reason.value
        return resp
    return web.Response(status=200, headers=gw.asserted_identity(ctx, decision))


async def forward_auth(request: web.Request, gw: Gateway) -> web.StreamResponse:
    cfg = gw.runtime.config
    fa = cfg.forward_auth
    peer = request.remote or ""
    h = request.headers
    if not fa.enabled:
        raise web.HTTPNotFound()
    if not _is_trusted(peer, gw):
        ctx = RequestContext.synthetic(method="GET", path="/", client_ip=peer, clock=gw.clock)
        decision = gw.refusal_decision(
            ctx, Reason.REQUEST_INVALID, "forward-auth caller not trusted"
        )
        gw.record_decision(ctx, decision)
        return problem(Reason.REQUEST_INVALID, ctx.decision_id, status=403)
    edge = EDGES[fa.edge]
    consumed = {n.lower() for n in (edge.uri, edge.method, edge.host, edge.client)}
    if gw.ops_socket is not None:
        consumed.add(RELAY_PEER_HEADER.lower())  # the supervisor's, read by ops.relayed_peer
    if fa.cert_header:
        consumed.add(fa.cert_header.lower())
    passed = CIMultiDict((k, v) for k, v in h.items() if k.lower() not in consumed)
    xff = h.get(edge.client) or peer
    ctx = RequestContext.synthetic(
        method=h.get(edge.method) or "GET",
        path=h.get(edge.uri) or "/",
        host=h.get(edge.host, "").split(":")[0],
        headers=dict(passed),
        client_ip=xff.split(",")[-1].strip(),
        clock=gw.clock,
    )
    ctx.peer_ip = peer
    ctx.unstrippable = True
    # From the trusted edge, its forwarding facts are expected; every other protected header
    # (identity, original URL, another certificate header) came from the client.
    ctx.spoofed_headers = spoofed_headers(CIMultiDictProxy(passed), from_trusted_proxy=True)
    if edge.uri not in h:
        return _answer(
            gw, ctx, gw.refusal_decision(ctx, Reason.REQUEST_INVALID, f"no {edge.uri} header")
        )
    if ctx.spoofed_headers:
        gw.metrics.spoofed_headers.inc(len(ctx.spoofed_headers))
        detail = "the edge passes them on unchanged: " + ", ".join(ctx.spoofed_headers)
        return _answer(gw, ctx, gw.refusal_decision(ctx, Reason.HEADER_SPOOFED, detail))
    if fa.cert_header:
        values = h.getall(fa.cert_header, ())
        if len(values) > 1:
            refusal = gw.refusal_decision(
                ctx, Reason.HEADER_SPOOFED, f"{fa.cert_header} more than once"
            )
            return _answer(gw, ctx, refusal)
        if values and values[0].strip():
            verified = await verify_forwarded_cert(gw, ctx, values[0], edge.cert_format)
            if isinstance(verified, Decision):
                return _answer(gw, ctx, verified)
            ctx.cert = verified
    return _answer(gw, ctx, await gw.runtime.pipeline.evaluate(ctx))


async def verify_forwarded_cert(
    gw: Gateway, ctx: RequestContext, value: str, fmt: CertFormat
) -> CertInfo | Decision:
    """The header's certificate verified like a handshake, or the refusal to answer with."""
    throttle = gw.runtime.throttle
    wait = await throttle.wait(ctx.client_ip, ctx.now)
    if wait:
        ctx.retry_after = wait
        return gw.refusal_decision(
            ctx, Reason.CREDENTIALS_THROTTLED, "too many invalid credentials from this address"
        )
    try:
        return gw.tls.current.verifier.verify_header(value, fmt, ctx.now)
    except CertRefused as exc:
        await throttle.failed(ctx.client_ip, ctx.now)
        return gw.refusal_decision(ctx, exc.reason, exc.detail)
