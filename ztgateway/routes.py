"""The route table: compiled once per configuration, matched on the normalised path.

Longest prefix wins, and a route naming hosts beats one that does not; identical prefixes on
overlapping hosts are refused when the configuration loads, so exactly one route matches.
"""

from __future__ import annotations

from .config import RouteConfig


class RouteTable:
    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self.routes = routes
        # prefix -> (routes with hosts, route without hosts); looked up from the longest prefix.
        by_prefix: dict[str, tuple[dict[str, RouteConfig], RouteConfig | None]] = {}
        for r in routes:
            hosts, any_host = by_prefix.get(r.prefix, ({}, None))
            if r.hosts:
                hosts = {**hosts, **dict.fromkeys(r.hosts, r)}
            else:
                any_host = r
            by_prefix[r.prefix] = (hosts, any_host)
        self._by_prefix = by_prefix
        self._has_hosts = any(r.hosts for r in routes)

    def match(self, host: str, path: str) -> RouteConfig | None:
        """`path` is normalised; `host` is the request host without port, lower-case."""
        by_prefix = self._by_prefix
        # Candidate prefixes are the path's ancestors: "/a/b/c" -> "/a/b/", "/a/", "/".
        probe = path if path.endswith("/") else path + "/"
        while True:
            entry = by_prefix.get(probe)
            if entry is not None:
                hosts, any_host = entry
                if self._has_hosts and hosts:
                    route = hosts.get(host)
                    if route is not None:
                        return route
                if any_host is not None:
                    return any_host
            if probe == "/":
                return None
            probe = probe[: probe.rstrip("/").rfind("/") + 1]
