"""The route table: compiled once per configuration, matched on the path the upstream acts on.

Longest prefix wins, and a route naming hosts beats one that does not; identical prefixes on
overlapping hosts are refused when the configuration loads, so exactly one route matches.

The path matched is `paths.route_key()` of the normalised path: path parameters stripped (what
a servlet container maps), and lower-cased for the routes of a `case_insensitive` upstream (what
IIS serves), so `/admin;x/echo` and `/ADMIN/echo` are decided by the `/admin/` route, not by the
catch-all (docs/security.md, "Paths"). Refusing what the chosen route does not accept is the
request stage's job (`paths.route_path_refusal`).
"""

from __future__ import annotations

from .config import RouteConfig
from .request.paths import strip_path_params

_Entry = tuple[dict[str, RouteConfig], RouteConfig | None]


def _add(table: dict[str, _Entry], prefix: str, r: RouteConfig) -> None:
    hosts, any_host = table.get(prefix, ({}, None))
    if r.hosts:
        hosts = {**hosts, **dict.fromkeys(r.hosts, r)}
    else:
        any_host = r
    table[prefix] = (hosts, any_host)


class RouteTable:
    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self.routes = routes
        # prefix -> (routes with hosts, route without hosts); looked up from the longest prefix.
        # Routes of case-insensitive upstreams live in their own table under the lower-cased
        # prefix; the configuration refuses a prefix that both tables could claim.
        self._by_prefix: dict[str, _Entry] = {}
        self._folded: dict[str, _Entry] = {}
        for r in routes:
            if r.upstream.case_insensitive:
                _add(self._folded, r.prefix.lower(), r)
            else:
                _add(self._by_prefix, r.prefix, r)
        self._has_hosts = any(r.hosts for r in routes)

    def _pick(self, entry: _Entry | None, host: str) -> RouteConfig | None:
        if entry is None:
            return None
        hosts, any_host = entry
        if self._has_hosts and hosts:
            route = hosts.get(host)
            if route is not None:
                return route
        return any_host

    def match(self, host: str, path: str) -> RouteConfig | None:
        """`path` is normalised; `host` is the request host without port, lower-case."""
        exact, folded = self._by_prefix, self._folded
        path = strip_path_params(path)
        # Candidate prefixes are the path's ancestors: "/a/b/c" -> "/a/b/", "/a/", "/".
        probe = path if path.endswith("/") else path + "/"
        while True:
            route = self._pick(exact.get(probe), host)
            if route is None and folded:
                route = self._pick(folded.get(probe.lower()), host)
            if route is not None:
                return route
            if probe == "/":
                return None
            probe = probe[: probe.rstrip("/").rfind("/") + 1]
