"""The request stage, check by check: the path, the route, spoofed headers, what the route's
upstream would read differently, the declared body size, WebSocket, and who made the request
(Fetch Metadata, Origin). Each check: what is missing, what is invalid, what is valid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from tests import factories
from ztgateway.context import RequestContext
from ztgateway.decision import Finding, Reason, Verdict
from ztgateway.runtime import Runtime
from ztgateway.stages.request import RequestStage


async def check(ctx: RequestContext, rt: Runtime | None = None) -> Sequence[Finding]:
    return await RequestStage(rt or factories.runtime()).check(ctx)


async def test_a_valid_request_gets_its_route_and_no_finding() -> None:
    ctx = factories.context(path="/docs/a.html")
    assert await check(ctx) == []
    assert ctx.route is not None and ctx.route.name == "app"


# --- the path --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/a/../../etc/passwd", "/%00", "relative"])
async def test_a_path_that_does_not_normalise_is_invalid(path: str) -> None:
    ctx = factories.context(path=path)
    assert ctx.path is None
    findings = await check(ctx)
    assert factories.verdicts(findings) == [(Reason.PATH_INVALID, Verdict.DENY)]
    assert ctx.route is None


@pytest.mark.parametrize(
    ("path", "route", "detail"),
    [
        ("/a;jsessionid=1/b", {}, "path parameters"),
        ("/a/;x/b", {"allow_path_params": True}, "path parameters on an empty segment"),
        ("/a/%252e%252e/b", {}, "double percent-encoding"),
    ],
)
async def test_a_path_the_upstream_would_read_otherwise_is_refused(
    path: str, route: dict[str, Any], detail: str
) -> None:
    rt = factories.runtime(factories.config(**route))
    findings = await check(factories.context(path=path), rt)
    assert factories.verdicts(findings) == [(Reason.PATH_INVALID, Verdict.DENY)]
    assert findings[0].detail == detail


async def test_path_parameters_pass_where_the_route_allows_them() -> None:
    rt = factories.runtime(factories.config(allow_path_params=True))
    assert await check(factories.context(path="/a;v=1/b"), rt) == []


# --- the route -------------------------------------------------------------------------------


async def test_no_route_for_the_path_is_route_not_found() -> None:
    rt = factories.runtime(factories.config(prefix="/app/"))
    ctx = factories.context(path="/other")
    assert factories.verdicts(await check(ctx, rt)) == [(Reason.ROUTE_NOT_FOUND, Verdict.DENY)]
    assert ctx.route is None


async def test_no_route_for_the_host_is_route_not_found() -> None:
    rt = factories.runtime(factories.config(hosts=["app.example"]))
    assert factories.verdicts(await check(factories.context(host="other.example"), rt)) == [
        (Reason.ROUTE_NOT_FOUND, Verdict.DENY)
    ]
    assert await check(factories.context(host="app.example"), rt) == []


# --- spoofed headers -------------------------------------------------------------------------


async def test_a_spoofed_identity_header_is_noted_and_stripped_by_default() -> None:
    ctx = factories.context(headers={"X-Forwarded-User": "root"})
    findings = await check(ctx)
    assert factories.verdicts(findings) == [(Reason.HEADER_SPOOFED, None)]
    assert findings[0].detail == "X-Forwarded-User"


async def test_a_spoofed_header_is_refused_where_the_server_says_deny() -> None:
    rt = factories.runtime(factories.config({"server": {"spoofed_headers": "deny"}}))
    findings = await check(factories.context(headers={"X-ZT-User": "root"}), rt)
    assert factories.verdicts(findings) == [(Reason.HEADER_SPOOFED, Verdict.DENY)]


async def test_a_spoofed_header_is_refused_where_nothing_can_strip_it() -> None:
    ctx = factories.context(headers={"Remote-User": "root"}, unstrippable=True)
    assert factories.verdicts(await check(ctx)) == [(Reason.HEADER_SPOOFED, Verdict.DENY)]


async def test_the_routes_own_identity_header_counts_as_spoofed() -> None:
    rt = factories.runtime(factories.config(headers={"user": "X-Corp-User"}))
    ctx = factories.context(headers={"X-Corp-User": "root"})
    findings = await check(ctx, rt)
    assert factories.verdicts(findings) == [(Reason.HEADER_SPOOFED, None)]
    assert ctx.spoofed_headers == ("X-Corp-User",)


async def test_ordinary_headers_are_not_spoofing() -> None:
    assert await check(factories.context(headers={"X-Request-Id": "1", "Accept": "*/*"})) == []


# --- the declared body -----------------------------------------------------------------------


@pytest.mark.parametrize(("length", "refused"), [(None, False), (1024, False), (1025, True)])
async def test_a_declared_body_over_the_routes_limit_is_refused(
    length: int | None, refused: bool
) -> None:
    rt = factories.runtime(factories.config(client_max_size=1024))
    findings = await check(factories.context(method="POST", content_length=length), rt)
    assert factories.verdicts(findings) == (
        [(Reason.BODY_TOO_LARGE, Verdict.DENY)] if refused else []
    )


# --- WebSocket -------------------------------------------------------------------------------


async def test_a_websocket_on_a_route_without_websockets_is_invalid() -> None:
    rt = factories.runtime(factories.config(websocket=False))
    findings = await check(factories.context(websocket=True), rt)
    assert factories.verdicts(findings) == [(Reason.REQUEST_INVALID, Verdict.DENY)]


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # not a browser
        ("https://127.0.0.1", True),  # the gateway's own origin
        ("https://evil.example", False),
        ("https://partner.example", True),  # listed by the route
    ],
)
async def test_a_websocket_from_another_origin_is_refused_unless_listed(
    origin: str | None, allowed: bool
) -> None:
    rt = factories.runtime(factories.config(websocket_origins=["https://partner.example"]))
    headers = {"Origin": origin} if origin else {}
    findings = await check(factories.context(headers=headers, websocket=True), rt)
    assert factories.verdicts(findings) == (
        [] if allowed else [(Reason.ORIGIN_DENIED, Verdict.DENY)]
    )


# --- who made the request --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "mode", "allowed"),
    [
        ("GET", {}, "strict", True),  # an API client: no Fetch Metadata
        ("GET", {"Sec-Fetch-Site": "same-origin"}, "strict", True),
        ("POST", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}, "lax", False),
        ("GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, "strict", False),
        (
            "GET",
            {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
            "safe-methods",
            True,
        ),
        ("POST", {"Origin": "https://evil.example"}, "safe-methods", False),
    ],
)
async def test_cross_site_requests_follow_the_routes_cross_site_mode(
    method: str, headers: dict[str, str], mode: str, allowed: bool
) -> None:
    rt = factories.runtime(factories.config(cross_site=mode))
    findings = await check(factories.context(method=method, headers=headers), rt)
    assert factories.verdicts(findings) == (
        [] if allowed else [(Reason.ORIGIN_DENIED, Verdict.DENY)]
    )
