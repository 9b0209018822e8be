"""Exactly one route matches: longest prefix, host-specific before any-host."""

from __future__ import annotations

from yarl import URL

from ztgateway.config import RouteConfig, UpstreamConfig
from ztgateway.routes import RouteTable

UP = UpstreamConfig(name="u", url=URL("http://127.0.0.1:1"))


def route(name: str, prefix: str, hosts: frozenset[str] = frozenset()) -> RouteConfig:
    return RouteConfig(name=name, prefix=prefix, upstream=UP, hosts=hosts)


TABLE = RouteTable(
    (
        route("root", "/"),
        route("api", "/api/"),
        route("api-v2", "/api/v2/"),
        route("admin-b", "/admin/", frozenset({"b.example"})),
    )
)


def name(host: str, path: str) -> str | None:
    r = TABLE.match(host, path)
    return r.name if r else None


def test_longest_prefix_wins() -> None:
    assert name("a", "/api/v2/users") == "api-v2"
    assert name("a", "/api/v1/users") == "api"
    assert name("a", "/other") == "root"


def test_prefix_matches_whole_segments_only() -> None:
    assert name("a", "/apiary") == "root"
    assert name("a", "/api") == "api"


def test_host_specific_route_only_for_its_host() -> None:
    assert name("b.example", "/admin/x") == "admin-b"
    assert name("c.example", "/admin/x") == "root"


def test_no_route_when_nothing_covers_the_path() -> None:
    table = RouteTable((route("api", "/api/"),))
    assert table.match("a", "/") is None
    assert table.match("a", "/x/api/") is None


def test_matching_cost_does_not_depend_on_route_count() -> None:
    many = RouteTable(tuple(route(f"r{i}", f"/svc{i}/") for i in range(1000)))
    assert many.match("a", "/svc999/x") is not None
    assert many.match("a", "/svc1000/x") is None


CI = UpstreamConfig(name="iis", url=URL("http://127.0.0.1:2"), case_insensitive=True)


def test_path_parameters_are_ignored_when_matching() -> None:
    """Servlet containers strip ";..." from every segment before mapping (security review H2)."""
    assert name("a", "/api;jsessionid=1/v2;x/users") == "api-v2"
    assert name("a", "/api;/x") == "api"
    assert name("b.example", "/admin;x/y") == "admin-b"


def test_routes_of_a_case_insensitive_upstream_match_any_case() -> None:
    table = RouteTable(
        (
            route("root", "/"),
            RouteConfig(name="admin", prefix="/admin/", upstream=CI),
            RouteConfig(name="deep", prefix="/Admin/Deep/", upstream=CI),
        )
    )

    def at(path: str) -> str | None:
        r = table.match("a", path)
        return r.name if r else None

    assert at("/ADMIN/x") == "admin"
    assert at("/aDmIn;x/y") == "admin"
    assert at("/admin/deep/x") == "deep"
    assert at("/ADMIN/DEEP") == "deep"
    assert at("/adminx") == "root"


def test_case_sensitive_routes_stay_case_sensitive_beside_folded_ones() -> None:
    table = RouteTable(
        (
            route("root", "/"),
            route("api", "/api/"),
            RouteConfig(name="legacy", prefix="/legacy/", upstream=CI),
        )
    )
    assert table.match("a", "/API/x").name == "root"  # type: ignore[union-attr]
    assert table.match("a", "/LEGACY/x").name == "legacy"  # type: ignore[union-attr]
