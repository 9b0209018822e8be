"""The request path of the mTLS data plane, top to bottom.

    http1.Connection ──▶ handle(): context ─▶ /.ztgw/ page? ─▶ decide-and-record ─▶ render | forward

`RequestPath` is what `http1.Connection` calls (its `Handler`): `handle()` for every parsed
request, `refuse()` for a request the protocol refused before it was parsed whole (audited and
counted like any refusal, rendered by the same `responses.problem_parts`), `on_event()` for the
protocol's timers. The decision itself is `DecisionPath.decide()`, the one path every entry
point uses; refusals are `responses.render()`; forwarding is `forward/http.py` (raw upstream
pool) or `forward/websocket.py` (the frame-aware relay).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..audit import AuditUnavailable
from ..audit.events import upstream_event
from ..context import RequestContext
from ..decision import Decision, Reason, new_decision_id
from ..decisions import DecisionPath
from ..forward.exchange import start_exchange
from ..forward.headers import identity_header_names, upstream_request_headers
from ..forward.http import forward_http, request_head, upstream_target
from ..forward.identity import identity_headers
from ..forward.upstream import UpstreamFailure
from ..forward.websocket import Watch, bridge_websocket
from ..logs import decision_id_var
from ..portal import device, mfa, signin, webauthn
from ..portal.render import STATIC_PREFIX, static_asset, static_headers
from ..responses import (
    Parts,
    add_security_headers,
    hsts_value,
    problem_parts,
    render,
    with_security_headers,
)
from ..signals import endpoints as signal_endpoints
from ..store.base import StoreUnavailable
from .http1 import BodyTimeout, BodyTooLarge, ClientGone, Connection, Refusal, Request
from .inline import in_task
from .tls import upstream_context

if TYPE_CHECKING:
    from ..app import Gateway
    from ..config import RouteConfig

log = logging.getLogger("ztgateway.request")
INTERNAL_PREFIX = "/.ztgw/"
WS_RECHECK_INTERVAL = 5.0
_PAGES = {
    ("/.ztgw/", "GET"): signin.home,
    ("/.ztgw/login", "GET"): signin.login_page,
    ("/.ztgw/login/start", "GET"): signin.login_start,
    ("/.ztgw/oidc/callback", "GET"): signin.callback,
    ("/.ztgw/logout", "GET"): signin.logout,
    ("/.ztgw/logout", "POST"): signin.logout,
    ("/.ztgw/signed-out", "GET"): signin.signed_out,
    ("/.ztgw/whoami", "GET"): signin.whoami,
    ("/.ztgw/posture", "POST"): device.posture_report,
    ("/.ztgw/device", "GET"): device.device_status,
    ("/.ztgw/device", "HEAD"): device.device_status,
    ("/.ztgw/mfa/verify", "POST"): mfa.verify_api,
    ("/.ztgw/mfa", "GET"): mfa.step_up_page,
    ("/.ztgw/mfa", "POST"): mfa.step_up_page,
    ("/.ztgw/mfa/enroll", "GET"): mfa.enroll_page,
    ("/.ztgw/mfa/enroll", "POST"): mfa.enroll_page,
    ("/.ztgw/webauthn", "GET"): webauthn.keys_page,
    ("/.ztgw/webauthn.js", "GET"): webauthn.script,
    ("/.ztgw/webauthn/register/options", "POST"): webauthn.register_options,
    ("/.ztgw/webauthn/register", "POST"): webauthn.register,
    ("/.ztgw/webauthn/authenticate/options", "POST"): webauthn.authenticate_options,
    ("/.ztgw/webauthn/authenticate", "POST"): webauthn.authenticate,
    # Signals from the identity provider (signals/, docs/signals.md)
    ("/.ztgw/ssf/events", "POST"): signal_endpoints.push_events,
    ("/.ztgw/oidc/backchannel-logout", "POST"): signal_endpoints.backchannel_logout,
}
_TIMERS = {"header_timeout", "body_timeout", "idle_timeout", "slow_reader"}


class RequestPath:
    """Every request on the mTLS listener (an `http1.Handler`)."""

    def __init__(self, gw: Gateway, decisions: DecisionPath) -> None:
        self.gw = gw
        self.decisions = decisions
        self.metrics = gw.metrics

    # --- the request ------------------------------------------------------------------------
    async def handle(self, request: Request) -> None:
        gw = self.gw
        # One snapshot for the whole request: a reload swaps the pair atomically.
        rt, pipeline = gw.runtime, gw.pipeline
        server = rt.config.server
        ctx = RequestContext.from_request(
            request,
            trusted_proxies=server.trusted_proxies,
            allow_encoded_slash=server.allow_encoded_slash,
            clock=gw.clock,
        )
        ctx.look = rt.config.portal
        decision_id_var.set(ctx.decision_id)
        if ctx.path is not None and ctx.path.startswith(INTERNAL_PREFIX):
            await self._page(request, ctx)
            return
        outcome = await self.decisions.decide(ctx, rt, pipeline)
        decision = outcome.decision
        route = ctx.route
        if not await self._durable(request, ctx):
            return
        if not decision.allowed or route is None:
            # A body refused for its size may still be on its way: close rather than read it.
            too_large = decision.reason is Reason.BODY_TOO_LARGE
            request.respond(*self.render(ctx, decision), close=too_large)
            return
        sessions = rt.config.sessions
        headers = upstream_request_headers(
            ctx.headers,
            identity_headers(gw.signer, ctx, request.host, decision),
            forward_authorization=route.forward_authorization,
            websocket=ctx.websocket,
            drop_cookies=(sessions.cookie_name,),
            identity_names=identity_header_names(route.headers),
        )
        assert ctx.path is not None
        target = upstream_target(route, ctx.path, ctx.query)
        forwarding = Forwarding(self, request, ctx, route)
        if ctx.websocket:
            try:
                await self._websocket(request, ctx, target, headers)
            except ClientGone:
                forwarding.observe()
                return
            except BaseException:
                forwarding.observe()
                raise
            forwarding.finished(101, None, websocket=True)
            return
        pool = gw.upstreams.pool(route.upstream)

        async def forward() -> None:
            try:
                status = await forward_http(
                    request,
                    route,
                    pool,
                    target,
                    headers,
                    decision_id=ctx.decision_id,
                    on_upstream_head=forwarding.on_head,
                    clock=gw.clock,
                )
            except Exception as exc:  # answered by finished(), or re-raised
                forwarding.finished(None, exc)
                return
            except BaseException:
                forwarding.observe()
                raise
            forwarding.finished(status, None)

        if not request.body_exists:
            # The fast path: no Task, no Future (forward/exchange.py).
            head = request_head(request.method, target, pool, headers, body=False)
            if start_exchange(
                request,
                route,
                pool,
                head,
                decision_id=ctx.decision_id,
                on_head=forwarding.on_head,
                done=forwarding.finished,
                fallback=forward,
                clock=gw.clock,
            ):
                return
        await forward()

    async def _durable(self, request: Request, ctx: RequestContext) -> bool:
        """`[audit] durability = "fsync"`: this request's events on stable storage before it is
        answered or forwarded (one fdatasync shared by every request waiting now, audit/).
        False, answered 503, when the sync failed (fail closed)."""
        audit = self.gw.audit
        if not audit.needs_sync:
            return True
        try:
            await audit.sync()
        except AuditUnavailable:
            self.metrics.audit_unavailable.inc()
            ctx.retry_after = 5.0
            request.respond(
                *self.own(
                    problem_parts(
                        Reason.SERVICE_UNAVAILABLE,
                        ctx.decision_id,
                        accept=ctx.headers.get("Accept", ""),
                        extra_headers={"Retry-After": "5"},
                        look=ctx.look,
                    )
                )
            )
            return False
        return True

    def _record_upstream(
        self,
        ctx: RequestContext,
        result: tuple[str, int | None, int, Reason | None],
        seconds: float,
        head_seconds: float | None,
    ) -> None:
        """What the upstream then did, as an event linked to the decision (audit/events.py)."""
        kind, status, answered, reason = result
        if self.gw.config.audit.upstream_events == "failures" and reason is None:
            return
        route = ctx.route
        assert route is not None
        ident, cert = ctx.identity, ctx.cert
        event = upstream_event(
            ctx.decision_id,
            route=route.name,
            upstream=route.upstream.name,
            outcome=kind,
            status=status,
            answered=answered,
            seconds=seconds,
            head_seconds=head_seconds,
            reason=reason.value if reason is not None else None,
            user=ident.user if ident else None,
            device=cert.device_id if cert else None,
            client_ip=ctx.client_ip,
        )
        try:
            self.gw.audit.record(event)
        except AuditUnavailable:
            # Answered already; the decision itself is in the log. Counted, and /readyz says.
            self.metrics.audit_unavailable.inc()

    def render(self, ctx: RequestContext, decision: Decision) -> Parts:
        gw = self.gw
        return self.own(
            render(
                ctx,
                decision,
                sign_in=bool(gw.providers),
                step_up_page=gw.mfa.available,
                cookie_name=gw.runtime.config.sessions.cookie_name,
            )
        )

    def hsts(self) -> str | None:
        s = self.gw.runtime.config.server
        return hsts_value(s.hsts_max_age, s.hsts_include_subdomains)

    def own(self, parts: Parts) -> Parts:
        """What the gateway answers itself carries its security headers (responses.py); a
        forwarded response is the upstream's."""
        status, headers, body = parts
        return status, with_security_headers(headers, self.hsts()), body

    def _refused_late(
        self, request: Request, ctx: RequestContext, reason: Reason, detail: str
    ) -> None:
        allowed_as = ctx.decision_id
        ctx.decision_id = new_decision_id(self.gw.clock.time())  # audit decision ids are unique
        ctx.findings.clear()
        outcome = self.decisions.refuse(ctx, reason, f"{detail} (after {allowed_as})", "http")
        request.respond(*self._problem(ctx, outcome.decision.reason), close=True)

    def _problem(self, ctx: RequestContext, reason: Reason) -> Parts:
        return self.own(
            problem_parts(
                reason, ctx.decision_id, accept=ctx.headers.get("Accept", ""), look=ctx.look
            )
        )

    # --- WebSocket ---------------------------------------------------------------------------
    async def _websocket(
        self, request: Request, ctx: RequestContext, target: str, headers: Any
    ) -> None:
        await in_task()  # the relay's aiohttp client and its timers
        gw = self.gw
        route = ctx.route
        assert route is not None
        up = route.upstream
        watch = Watch()
        gw.watches.add(watch)
        try:
            await bridge_websocket(
                request,
                up,
                upstream_context(up) if up.url.scheme == "https" else None,
                target,
                headers,
                decision_id=ctx.decision_id,
                recheck=lambda: self.recheck(request),
                interval=WS_RECHECK_INTERVAL,
                watch=watch,
                max_message=gw.runtime.config.server.websocket_max_message,
                ping_interval=gw.runtime.config.server.websocket_ping_interval,
            )
        finally:
            gw.watches.discard(watch)

    async def recheck(self, request: Request) -> Decision:
        """Re-run the whole decision for an open WebSocket, on the current snapshot."""
        rt, pipeline = self.gw.runtime, self.gw.pipeline
        ctx = RequestContext.from_request(
            request,
            trusted_proxies=rt.config.server.trusted_proxies,
            allow_encoded_slash=rt.config.server.allow_encoded_slash,
            clock=self.gw.clock,
        )
        return (await self.decisions.decide(ctx, rt, pipeline, recheck=True)).decision

    # --- the gateway's own pages under /.ztgw/ -----------------------------------------------
    async def _page(self, request: Request, ctx: RequestContext) -> None:
        """Small handlers on the same protocol (decision 0009): they read the request through
        `http1.Request` and answer with an aiohttp `Response` used as a value (status,
        headers, body), written here in one write. They run in a Task (OIDC's aiohttp client
        and the stores' timers need one; pages are not the hot path)."""
        await in_task()
        handler = _PAGES.get((ctx.path or "", ctx.method))
        if (
            handler is None
            and ctx.method == "GET"
            and self.gw.providers.by_callback(ctx.path or "")
        ):
            handler = signin.callback  # a provider's own callback (/.ztgw/oidc/callback/NAME)
        resp: web.StreamResponse
        path = ctx.path or ""
        if handler is None and path.startswith(STATIC_PREFIX) and ctx.method in ("GET", "HEAD"):
            # The pages' stylesheet and logo: needed before anyone signs in, public, cacheable.
            asset = static_asset(path, ctx.look)
            if asset is not None:
                body, media_type = asset
                request.respond(200, static_headers(media_type), body)
                return
        if handler is None and ctx.path == "/.ztgw/jwks.json" and ctx.method in ("GET", "HEAD"):
            resp = web.json_response(self.gw.signer.jwks, headers={"Cache-Control": "max-age=300"})
        elif handler is None:
            outcome = self.decisions.refuse(ctx, Reason.ROUTE_NOT_FOUND, ctx.path or "", "request")
            request.respond(*self.render(ctx, outcome.decision))
            return
        else:
            try:
                resp = await handler(self.gw, request, ctx)
            except StoreUnavailable:
                # Fail closed, and say so: not a stage error.
                self.metrics.store_errors.inc()
                outcome = self.decisions.refuse(
                    ctx, Reason.SERVICE_UNAVAILABLE, "state store", "endpoint"
                )
                ctx.retry_after = 5.0
                request.respond(*self.render(ctx, outcome.decision))
                return
        if await self._durable(request, ctx):
            send_web_response(request, resp, self.hsts())

    # --- what the protocol refuses or times out ----------------------------------------------
    def refuse(self, conn: Connection, request: Request | None, refusal: Refusal) -> Parts:
        """A request the protocol refused: recorded and answered like any other refusal."""
        gw = self.gw
        path, _, query = (request.target if request is not None else "").partition("?")
        headers = request.headers if request is not None and request.method else None
        ctx = RequestContext.synthetic(
            method=(request.method if request is not None else "") or "-",
            path="/",
            client_ip=conn.peer_ip,
            cert=conn.cert,
            clock=gw.clock,
        )
        ctx.raw_path, ctx.query, ctx.path = path[:2048], query[:2048], None
        ctx.host = ""
        ctx.look = gw.runtime.config.portal
        if headers is not None:
            ctx.headers = headers
        ctx.protocol_error = refusal.detail
        if refusal.reason is not Reason.STAGE_ERROR:
            self.metrics.protocol_errors.labels(refusal.reason.value).inc()
        outcome = self.decisions.refuse(ctx, refusal.reason, refusal.detail, "http")
        reason = outcome.decision.reason
        return self.own(
            problem_parts(
                reason,
                ctx.decision_id,
                accept=ctx.headers.get("Accept", ""),
                extra_headers={"Retry-After": "5"} if ctx.retry_after else None,
                look=ctx.look,
            )
        )

    def on_event(self, name: str) -> None:
        if name == "header_timeout":
            self.metrics.slow_clients.inc()
        if name in _TIMERS:
            self.metrics.connection_timeouts.labels(name.removesuffix("_timeout")).inc()


class Forwarding:
    """What one allowed request's forwarding ends with, whichever path forwarded it (the
    callback-driven exchange or the coroutine): the answer to a fault, the request-time and
    upstream metrics, and the upstream event linked to the decision."""

    __slots__ = ("ctx", "head_seconds", "path", "request", "route", "started")

    def __init__(
        self, path: RequestPath, request: Request, ctx: RequestContext, route: RouteConfig
    ) -> None:
        self.path = path
        self.request = request
        self.ctx = ctx
        self.route = route
        self.started = path.gw.clock.monotonic()
        self.head_seconds: float | None = None

    def on_head(self, seconds: float) -> None:
        if self.head_seconds is None:
            self.head_seconds = seconds
        self.path.metrics.upstream_seconds.labels(self.route.name).observe(seconds)

    def observe(self) -> float:
        now = self.path.gw.clock.monotonic()
        self.path.metrics.request_seconds.labels(self.route.name).observe(now - self.ctx.started)
        return now

    def finished(
        self, status: int | None, exc: BaseException | None, *, websocket: bool = False
    ) -> None:
        """Record the outcome; a fault that left the client unanswered is answered here."""
        path, request, ctx, route = self.path, self.request, self.ctx, self.route
        # (outcome, upstream status, status answered, refusal reason)
        result: tuple[str, int | None, int, Reason | None] | None
        try:
            if websocket:
                result = ("websocket", 101, 101, None)
            elif exc is None:
                assert status is not None
                result = ("responded", status, status, None)
            elif isinstance(exc, BodyTooLarge):
                # A chunked body that streamed past the route's limit: refused after the
                # ALLOW, and recorded as a decision of its own that names the one it overrides.
                result = ("body-too-large", None, 413, Reason.BODY_TOO_LARGE)
                path._refused_late(request, ctx, Reason.BODY_TOO_LARGE, "body over client_max_size")
            elif isinstance(exc, BodyTimeout):
                path.metrics.protocol_errors.labels(Reason.REQUEST_TIMEOUT.value).inc()
                result = ("body-timeout", None, 408, Reason.REQUEST_TIMEOUT)
                path._refused_late(request, ctx, Reason.REQUEST_TIMEOUT, "request body stalled")
            elif isinstance(exc, UpstreamFailure):
                path.metrics.upstream_errors.labels(route.name, exc.kind).inc()
                log.warning("upstream %s %s: %s", route.upstream.name, exc.kind, exc.detail)
                result = (exc.kind, None, exc.reason.status, exc.reason)
                request.respond(*path._problem(ctx, exc.reason))
            elif isinstance(exc, ClientGone):
                result = None
            else:
                result = None
                raise exc
        finally:
            now = self.observe()
        if result is not None:
            path._record_upstream(ctx, result, now - self.started, self.head_seconds)


def send_web_response(request: Request, resp: web.StreamResponse, hsts: str | None) -> None:
    """Write a page's aiohttp Response (a value: status, headers, bytes body) in one write."""
    add_security_headers(resp, hsts)
    body = resp.body if isinstance(resp, web.Response) else None
    data = body if isinstance(body, bytes | bytearray) else b""
    headers = [(k, v) for k, v in resp.headers.items() if k.lower() != "content-length"]
    for cookie in resp.cookies.values():
        headers.append(("Set-Cookie", cookie.output(header="").strip()))
    request.respond(resp.status, headers, bytes(data), reason=resp.reason or "")
