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

from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ..context import (
    RequestContext,
    client_ip_from_forwarded,
    is_trusted_proxy,
    spoofed_headers,
)
from ..decision import Decision, Reason
from ..edge.certverify import CertRefused
from ..request.headerfamilies import EDGES, CertFormat
from ..responses import problem
from .relay import RELAY_PEER_HEADER

if TYPE_CHECKING:
    from ..services import Services


def _answer(ctx: RequestContext, decision: Decision, gw: Services) -> web.StreamResponse:
    if not decision.allowed or ctx.route is None:
        # nginx auth_request understands only 401 and 403 (anything else becomes a 500).
        status = 401 if decision.status == 401 else 403
        if decision.reason is Reason.SERVICE_UNAVAILABLE:
            status = 503
        resp = problem(decision.reason, ctx.decision_id, verdict=decision.verdict, status=status)
        resp.headers["X-ZT-Reason"] = decision.reason.value
        return resp
    return web.Response(status=200, headers=gw.asserted_identity(ctx, decision))


def _refuse(gw: Services, ctx: RequestContext, reason: Reason, detail: str) -> web.StreamResponse:
    """A refusal before the pipeline, recorded on the one decision path."""
    return _answer(ctx, gw.decisions.refuse(ctx, reason, detail, "request").decision, gw)


async def forward_auth(request: web.Request, gw: Services) -> web.StreamResponse:
    cfg = gw.runtime.config
    fa = cfg.forward_auth
    peer = request.remote or ""
    h = request.headers
    if not fa.enabled:
        raise web.HTTPNotFound()
    if not is_trusted_proxy(peer, fa.trusted_proxies):
        ctx = RequestContext.synthetic(method="GET", path="/", client_ip=peer, clock=gw.clock)
        refused = gw.decisions.refuse(
            ctx, Reason.REQUEST_INVALID, "forward-auth caller not trusted", "request"
        ).decision
        status = 503 if refused.reason is Reason.SERVICE_UNAVAILABLE else 403
        return problem(refused.reason, ctx.decision_id, status=status)
    edge = EDGES[fa.edge]
    consumed = {n.lower() for n in (edge.uri, edge.method, edge.host, edge.client)}
    if gw.ops_socket is not None:
        consumed.add(RELAY_PEER_HEADER.lower())  # the supervisor's, read by relay.relayed_peer
    if fa.cert_header:
        consumed.add(fa.cert_header.lower())
    passed = CIMultiDict((k, v) for k, v in h.items() if k.lower() not in consumed)
    ctx = RequestContext.synthetic(
        method=h.get(edge.method) or "GET",
        path=h.get(edge.uri) or "/",
        host=h.get(edge.host, "").split(":")[0],
        headers=dict(passed),
        client_ip=client_ip_from_forwarded(peer, h, fa.trusted_proxies, header=edge.client),
        clock=gw.clock,
    )
    ctx.peer_ip = peer
    ctx.unstrippable = True
    # From the trusted edge, its forwarding facts are expected; every other protected header
    # (identity, original URL, another certificate header) came from the client.
    ctx.spoofed_headers = spoofed_headers(CIMultiDictProxy(passed), from_trusted_proxy=True)
    if edge.uri not in h:
        return _refuse(gw, ctx, Reason.REQUEST_INVALID, f"no {edge.uri} header")
    if ctx.spoofed_headers:
        gw.metrics.spoofed_headers.inc(len(ctx.spoofed_headers))
        detail = "the edge passes them on unchanged: " + ", ".join(ctx.spoofed_headers)
        return _refuse(gw, ctx, Reason.HEADER_SPOOFED, detail)
    if fa.cert_header:
        values = h.getall(fa.cert_header, ())
        if len(values) > 1:
            return _refuse(gw, ctx, Reason.HEADER_SPOOFED, f"{fa.cert_header} more than once")
        if values and values[0].strip():
            problem_ = await verify_forwarded_cert(gw, ctx, values[0], edge.cert_format)
            if problem_ is not None:
                return _refuse(gw, ctx, *problem_)
    # The same decide-and-record path as the data plane (security review M4): the audit event,
    # the metrics, and the session write-back (touch, anomaly, failed attempts, revocation on
    # TERMINATE) all happen here too.
    return _answer(ctx, (await gw.decisions.decide(ctx, gw.runtime, gw.pipeline)).decision, gw)


async def verify_forwarded_cert(
    gw: Services, ctx: RequestContext, value: str, fmt: CertFormat
) -> tuple[Reason, str] | None:
    """Put the header's certificate on `ctx` once verified like a handshake; else the reason
    and detail of the refusal."""
    throttle = gw.runtime.throttle
    wait = await throttle.wait(ctx.client_ip, ctx.now)
    if wait:
        ctx.retry_after = wait
        return Reason.CREDENTIALS_THROTTLED, "too many invalid credentials from this address"
    try:
        ctx.cert = gw.tls.current.verifier.verify_header(value, fmt, ctx.now)
    except CertRefused as exc:
        await throttle.failed(ctx.client_ip, ctx.now)
        return exc.reason, exc.detail
    return None
