"""The route table decides on the path the upstream will act on (security review H2).

Tomcat and Jetty strip `;params` from every segment and IIS ignores case, so `/admin;x/echo`
and `/ADMIN/echo` are `/admin/echo` to them. Each case goes through a real gateway with alice's
certificate to the recording demo upstream; "never forwarded" is read off the upstream.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.test_proxy import (
    ProxyFactory,
    RecordingUpstream,
    audit_event,
    exchange,
    metric,
    request_bytes,
)
from tests.support import Certs
from ztgateway.dev.tokens import issue_token

CI = {"upstreams": {"demo": {"case_insensitive": True}}}


@pytest.mark.parametrize(
    ("sent", "detail"),
    [
        ("/admin;jsessionid=x/echo", "path parameters"),
        ("/api;/echo", "path parameters"),
        ("/admin%3Bx/echo", "path parameters"),
        ("/admin%3bjsessionid=1/echo", "path parameters"),
        ("/public/x;y/echo", "path parameters"),
        ("/%252e%252e/admin/echo", "double percent-encoding"),
        ("/public/%252e%252e%252fadmin/echo", "double percent-encoding"),
        ("/public/..%252fadmin/echo", "double percent-encoding"),
        ("/public/..%255cadmin/echo", "double percent-encoding"),
        ("/public/%253b/echo", "double percent-encoding"),
        ("/public/%253F/echo", "double percent-encoding"),
        ("/public/%2500/echo", "double percent-encoding"),
        ("/public/%2525252e/echo", "double percent-encoding"),
        ("/public/%25u002e%25u002e/admin/echo", "double percent-encoding"),
    ],
)
async def test_path_an_upstream_would_fold_into_another_route_is_refused_and_never_forwarded(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, sent: str, detail: str
) -> None:
    gw = await proxy()
    r = await exchange(certs, gw, request_bytes(sent, "Accept: application/json"))
    assert r.status == 400, (sent, r.status, r.body)
    problem = r.problem()
    assert problem["reason"] == "path-invalid"
    event = await audit_event(gw, problem["decision_id"])
    assert event["result"]["reason"] == "path-invalid"
    assert event["result"]["findings"][-1]["detail"] == detail
    route = event["route"]
    assert (
        metric(gw, "ztgw_requests_total", route=route, verdict="deny", reason="path-invalid") == 1
    )
    assert recording.hits == []


async def test_path_parameters_are_routed_as_the_servlet_container_maps_them(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    """Routing ignores the parameters: /admin;x/ is the admin route, whose policy (a token of
    an admin) decides, even where that route lets parameters through."""
    gw = await proxy(
        {
            "routes": [
                {"name": "app", "prefix": "/", "upstream": "demo", "allow_path_params": True},
                {
                    "name": "admin",
                    "prefix": "/admin/",
                    "upstream": "demo",
                    "allow_path_params": True,
                    "policy": {"require_token": True, "groups": ["admins"]},
                },
            ]
        }
    )
    r = await exchange(
        certs, gw, request_bytes("/admin;jsessionid=x/echo", "Accept: application/json")
    )
    assert r.status == 401
    assert r.problem()["reason"] == "token-required"
    event = await audit_event(gw, r.problem()["decision_id"])
    assert event["route"] == "admin"
    assert recording.hits == []
    token = issue_token(certs.issuer_key, sub="alice", groups=["admins"])
    r = await exchange(
        certs, gw, request_bytes("/admin;jsessionid=x/echo", f"Authorization: Bearer {token}")
    )
    assert r.status == 200, r.body
    # Forwarded exactly as policy saw it: the upstream gets its session parameter.
    assert json.loads(r.body)["raw_path"] == "/admin;jsessionid=x/echo"
    # An empty segment with parameters is still refused: a server that strips first and
    # resolves later reads "/admin/;x/../echo" as "/echo".
    r = await exchange(
        certs, gw, request_bytes("/admin/;x/../echo", f"Authorization: Bearer {token}")
    )
    assert r.status == 200
    assert json.loads(r.body)["raw_path"] == "/admin/echo"
    r = await exchange(certs, gw, request_bytes("/admin/;x/echo", f"Authorization: Bearer {token}"))
    assert r.status == 400
    assert r.problem()["reason"] == "path-invalid"


async def test_double_encoding_passes_only_where_the_route_opts_in(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy(
        {
            "routes": [
                {"name": "app", "prefix": "/", "upstream": "demo"},
                {
                    "name": "files",
                    "prefix": "/files/",
                    "upstream": "demo",
                    "allow_double_encoding": True,
                },
            ]
        }
    )
    r = await exchange(certs, gw, request_bytes("/files/100%252e/echo"))
    assert r.status == 200, r.body
    assert json.loads(r.body)["raw_path"] == "/files/100%252e/echo"
    r = await exchange(certs, gw, request_bytes("/other/100%252e/echo"))
    assert r.status == 400
    # A single escape of "%" that decodes to no dot or separator was never a concern.
    r = await exchange(certs, gw, request_bytes("/other/100%25/echo"))
    assert r.status == 200
    assert json.loads(r.body)["raw_path"] == "/other/100%25/echo"


@pytest.mark.parametrize("sent", ["/ADMIN/echo", "/Admin/echo", "/aDmIn/x/echo"])
async def test_case_insensitive_upstream_routes_any_case_to_the_route_of_its_path(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, sent: str
) -> None:
    gw = await proxy(CI)
    r = await exchange(certs, gw, request_bytes(sent, "Accept: application/json"))
    assert r.status == 401, r.body
    problem = r.problem()
    assert problem["reason"] == "token-required"
    assert (await audit_event(gw, problem["decision_id"]))["route"] == "admin"
    assert recording.hits == []


async def test_case_sensitive_upstream_keeps_case_sensitive_routes(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    """Without the flag /ADMIN/ is another path, decided by the catch-all and forwarded as is:
    right for an upstream that itself tells /ADMIN/ from /admin/ (the demo app does)."""
    gw = await proxy()
    r = await exchange(certs, gw, request_bytes("/ADMIN/echo"))
    assert r.status == 200
    assert json.loads(r.body)["raw_path"] == "/ADMIN/echo"


@pytest.mark.parametrize(
    "sent",
    [
        "/admin./echo",
        "/admin%20/echo",
        "/ADMINI~1/echo",
        "/admin/echo::$DATA",
        "/admin/echo:stream",
        "/%C3%9F/echo",
        "/%EF%BC%A1dmin/echo",
    ],
)
async def test_windows_file_name_aliases_are_refused_for_a_case_insensitive_upstream(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, sent: str
) -> None:
    gw = await proxy(CI)
    r = await exchange(certs, gw, request_bytes(sent, "Accept: application/json"))
    assert r.status == 400, (sent, r.body)
    assert r.problem()["reason"] == "path-invalid"
    assert recording.hits == []


async def test_path_policy_globs_match_the_path_the_upstream_reads(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    overrides: dict[str, Any] = {
        **CI,
        "routes": [
            {
                "name": "app",
                "prefix": "/",
                "upstream": "demo",
                "allow_path_params": True,
                "policy": {"paths": ["/public/*"]},
            }
        ],
    }
    gw = await proxy(overrides)
    for sent in ("/public/echo", "/PUBLIC/echo", "/Public;v=1/echo"):
        r = await exchange(certs, gw, request_bytes(sent))
        assert r.status == 200, (sent, r.body)
    r = await exchange(certs, gw, request_bytes("/private/echo", "Accept: application/json"))
    assert r.status == 403
    assert r.problem()["reason"] == "path-denied"


async def test_strip_prefix_removes_the_matched_segments_whatever_their_spelling(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy(
        {
            **CI,
            "routes": [
                {"name": "app", "prefix": "/", "upstream": "demo"},
                {"name": "legacy", "prefix": "/legacy/", "upstream": "demo", "strip_prefix": True},
            ],
        }
    )
    for sent in ("/legacy/echo", "/LEGACY/echo"):
        r = await exchange(certs, gw, request_bytes(sent))
        assert r.status == 200, (sent, r.body)
        assert json.loads(r.body)["raw_path"] == "/echo"
