"""Who made a request, as far as a browser tells: Fetch Metadata and Origin.

A browser presents the client certificate the user selected on every request to the gateway's
origin, including those another site's page makes (`<img>`, `<script>`, `fetch(..., {mode:
"no-cors"})`, form posts); SameSite does not apply to certificates. Identity from a certificate
is therefore ambient, and a request carrying it says nothing about the user's intent (security
review M2). What the browser does say, and a page cannot forge, is where the request came from:
`Sec-Fetch-Site` / `-Mode` / `-Dest` (W3C Fetch Metadata; every current engine) and `Origin`
(RFC 6454; on unsafe methods and CORS requests, also from older browsers).

This module only reads those headers; the request stage applies the route's resource-isolation
policy (`cross_site`, `websocket_origins`) and the identity stage asks `browser` instead of
guessing from the Accept header's order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SAFE_METHODS = frozenset({"GET", "HEAD"})
_NESTED = frozenset({"iframe", "frame", "embed", "object", "fencedframe"})


@dataclass(frozen=True, slots=True)
class FetchContext:
    browser: bool
    """A browser made the request: it sent Fetch Metadata, or (an older browser) it navigates
    with `text/html` first. Command-line and API clients send no `Sec-Fetch-*`."""
    navigation: bool
    """A top-level navigation: the user followed a link or typed the address."""
    cross_site: bool
    """Another site or origin made it (`Sec-Fetch-Site` cross-site or same-site, else an
    `Origin` that is not the gateway's own)."""
    site: str
    """What the browser said, for the audit detail: the Sec-Fetch-Site value or the Origin."""


def own_origin(host: str) -> str:
    """The gateway's origin for a request to `host` (the Host header, with its port)."""
    h = host.strip().lower()
    if h.endswith(":443"):
        h = h[:-4]
    return "https://" + h


def wants_html(accept: str) -> bool:
    """A browser navigation, not an API client: text/html listed before any JSON type."""
    if not accept or "text/html" not in accept:
        return False
    a = accept.lower()
    json_at = min((i for i in (a.find("application/json"), a.find("+json")) if i >= 0), default=-1)
    return json_at < 0 or a.find("text/html") < json_at


def read(
    method: str, headers: Mapping[str, str], host_header: str, wants_html: bool
) -> FetchContext:
    """`headers` is the request's case-insensitive multidict."""
    get = headers.get
    site = (get("Sec-Fetch-Site") or "").strip().lower()
    mode = (get("Sec-Fetch-Mode") or "").strip().lower()
    dest = (get("Sec-Fetch-Dest") or "").strip().lower()
    origin = (get("Origin") or "").strip().lower()
    has_metadata = bool(site or mode or dest)
    if has_metadata:
        navigation = mode == "navigate" and dest not in _NESTED
    else:
        navigation = wants_html and method in SAFE_METHODS
    if site:
        # "same-site" is another origin of the same registrable domain (or, for an IP address,
        # another port): another application, whose XSS must not drive this one.
        cross = site in ("cross-site", "same-site")
        said = site
    elif origin:
        # Browsers without Fetch Metadata send Origin on unsafe methods and CORS requests;
        # "null" is an opaque origin (sandboxed frame, data: URL, privacy-redirected form).
        cross = origin != own_origin(host_header)
        said = "origin " + origin[:100]
    else:
        cross, said = False, ""
    return FetchContext(has_metadata or wants_html, navigation, cross, said)


def cross_site_refusal(method: str, fetch: FetchContext, mode: str) -> str | None:
    """Why the route refuses this cross-site request outright, or None. `mode` is the route's
    `cross_site`: "strict" (the default) and "lax" let top-level GET navigations through,
    "safe-methods" any GET/HEAD (e.g. images another of your sites embeds). Under "strict" such
    a navigation is still never identified by the certificate alone (`ambient_refusal`)."""
    if not fetch.cross_site:
        return None
    if method not in SAFE_METHODS:
        # SECURITY: never for unsafe methods, whatever the route says: that is CSRF.
        return f"cross-site {method} ({fetch.site})"
    if mode == "safe-methods" or fetch.navigation:
        return None
    return f"cross-site subresource or script request ({fetch.site})"


def ambient_refusal(fetch: FetchContext, mode: str) -> str | None:
    """Why the certificate alone may not identify this request, or None: under "strict" a
    navigation another site started (a link, a redirect chain through it) carries only what a
    session or token says; the certificate came along whatever the person meant."""
    if fetch.cross_site and mode == "strict":
        return f"a link from another site ({fetch.site}): the certificate alone does not count"
    return None


def websocket_origin_refusal(
    headers: Mapping[str, str], host_header: str, allowed: frozenset[str]
) -> str | None:
    """A WebSocket handshake from a browser page on another origin (cross-site WebSocket
    hijacking): the Origin must be the gateway's own or one the route lists. Clients that are
    not browsers send no Origin."""
    origin = (headers.get("Origin") or "").strip().lower()
    if not origin:
        return None
    if origin == own_origin(host_header) or origin in allowed:
        return None
    return f"websocket from origin {origin[:100]}"


__all__ = [
    "FetchContext",
    "ambient_refusal",
    "cross_site_refusal",
    "own_origin",
    "read",
    "websocket_origin_refusal",
]
