"""The request stage: a path we can normalise, exactly one route, and header hygiene.

It runs first because the route decides what every later stage requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..context import RequestContext
from ..decision import Finding, Reason, Verdict
from ..paths import route_path_refusal

if TYPE_CHECKING:
    from ..runtime import Runtime

NAME = "request"


class RequestStage:
    name = NAME

    def __init__(self, runtime: Runtime) -> None:
        self.routes = runtime.routes
        self.metrics = runtime.metrics
        self.deny_spoofing = runtime.config.server.spoofed_headers == "deny"

    async def check(self, ctx: RequestContext) -> Sequence[Finding]:
        out: list[Finding] = []
        if ctx.spoofed_headers:
            # SECURITY: the headers are stripped before forwarding either way; the finding
            # makes the attempt visible in audit and metrics.
            self.metrics.spoofed_headers.inc(len(ctx.spoofed_headers))
            out.append(
                Finding(
                    NAME,
                    Reason.HEADER_SPOOFED,
                    Verdict.DENY if self.deny_spoofing else None,
                    risk=0.3,
                    detail=", ".join(ctx.spoofed_headers),
                )
            )
        if ctx.path is None:
            out.append(
                Finding(NAME, Reason.PATH_INVALID, Verdict.DENY, detail=ctx.path_error or "")
            )
            return out
        route = self.routes.match(ctx.host, ctx.path)
        if route is None:
            out.append(Finding(NAME, Reason.ROUTE_NOT_FOUND, Verdict.DENY, detail=ctx.path))
            return out
        ctx.route = route
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
        if ctx.websocket and not route.websocket:
            out.append(
                Finding(NAME, Reason.REQUEST_INVALID, Verdict.DENY, detail="websocket not enabled")
            )
        return out
