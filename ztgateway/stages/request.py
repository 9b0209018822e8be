"""The request stage: a path we can normalise, exactly one route, header hygiene, and the
route's resource-isolation policy (who may make the request).

It runs first because the route decides what every later stage requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..context import RequestContext
from ..decision import Finding, Reason, Verdict
from ..forward.headers import unprotected_identity_names
from ..request.fetchmeta import cross_site_refusal, websocket_origin_refusal
from ..request.paths import route_path_refusal

if TYPE_CHECKING:
    from ..runtime import Runtime

NAME = "request"


class RequestStage:
    name = NAME

    def __init__(self, runtime: Runtime) -> None:
        self.routes = runtime.routes
        self.metrics = runtime.metrics
        self.deny_spoofing = runtime.config.server.spoofed_headers == "deny"

    def _spoofing(self, ctx: RequestContext, names: tuple[str, ...]) -> list[Finding]:
        if not names:
            return []
        # SECURITY: the headers are stripped before forwarding either way; the finding makes
        # the attempt visible in audit and metrics. Where nothing can be stripped (forward-auth:
        # the edge passes the client's headers on), the attempt is refused.
        self.metrics.spoofed_headers.inc(len(names))
        deny = self.deny_spoofing or ctx.unstrippable
        return [
            Finding(
                NAME,
                Reason.HEADER_SPOOFED,
                Verdict.DENY if deny else None,
                risk=0.3,
                detail=", ".join(names),
            )
        ]

    async def check(self, ctx: RequestContext) -> Sequence[Finding]:
        if ctx.path is None:
            out = self._spoofing(ctx, ctx.spoofed_headers)
            out.append(
                Finding(NAME, Reason.PATH_INVALID, Verdict.DENY, detail=ctx.path_error or "")
            )
            return out
        route = self.routes.match(ctx.host, ctx.path)
        if route is None:
            out = self._spoofing(ctx, ctx.spoofed_headers)
            out.append(Finding(NAME, Reason.ROUTE_NOT_FOUND, Verdict.DENY, detail=ctx.path))
            return out
        ctx.route = route
        # The route's own identity header names (an operator's "X-Corp-User") are the gateway's
        # to set: a client's copy would reach the upstream whenever we assert no user.
        spoofed = ctx.spoofed_headers
        own = unprotected_identity_names(route.headers)
        if own and any(name in ctx.headers for name in own):
            extra = {k for k in ctx.headers if k.lower() in own}
            spoofed = ctx.spoofed_headers = tuple(sorted({*spoofed, *extra}))
        out = self._spoofing(ctx, spoofed)
        if any(f.verdict is not None for f in out):
            return out
        refusal = route_path_refusal(
            ctx.path,
            allow_path_params=route.allow_path_params,
            allow_double_encoding=route.allow_double_encoding,
            case_insensitive=route.upstream.case_insensitive,
        )
        if refusal is not None:
            # The route was chosen on the path as its upstream will read it; what that
            # upstream would read differently again is refused, never forwarded.
            out.append(Finding(NAME, Reason.PATH_INVALID, Verdict.DENY, detail=refusal))
            return out
        if ctx.content_length is not None and ctx.content_length > route.client_max_size:
            # Refused on its declared length, before a byte of the body is read (and so before
            # any 100 Continue); a chunked body is cut off at the limit while it streams.
            out.append(
                Finding(
                    NAME,
                    Reason.BODY_TOO_LARGE,
                    Verdict.DENY,
                    detail=f"{ctx.content_length} > {route.client_max_size} bytes",
                )
            )
            return out
        if ctx.websocket and not route.websocket:
            out.append(
                Finding(NAME, Reason.REQUEST_INVALID, Verdict.DENY, detail="websocket not enabled")
            )
            return out
        # Resource isolation (docs/security.md, "Ambient certificates"): the certificate comes
        # with every request a browser makes to us, whoever's page made it.
        headers = ctx.headers
        if ctx.websocket:
            refusal = websocket_origin_refusal(
                headers, ctx.authority or ctx.host, route.websocket_origins
            )
        elif "Sec-Fetch-Site" in headers or "Origin" in headers:
            refusal = cross_site_refusal(ctx.method, ctx.fetch, route.cross_site)
        else:
            refusal = None  # nothing says another site made it: an API client, or same-origin
        if refusal is not None:
            out.append(Finding(NAME, Reason.ORIGIN_DENIED, Verdict.DENY, detail=refusal))
        return out
