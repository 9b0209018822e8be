"""Header hygiene in both directions.

Hop-by-hop headers (RFC 9110 §7.6.1) and every header named in `Connection` are dropped;
inbound forwarding and identity headers never reach the upstream (the request stage records
each attempt as a finding); the gateway then adds the headers the upstream may trust.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote

from multidict import CIMultiDict, CIMultiDictProxy

from .. import SERVER_BANNER
from ..request.headerfamilies import protected_header

if TYPE_CHECKING:
    from ..config import IdentityHeaders

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "http2-settings",
    }
)
_WEBSOCKET_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
    }
)


def _listed(connection_values: Iterable[str]) -> set[str]:
    """The header names `Connection` lists (RFC 9110 §7.6.1), lower-cased, from all its fields."""
    return {t.strip().lower() for v in connection_values for t in v.split(",") if t.strip()}


def _connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    return _listed(headers.getall("Connection", ()))


@functools.lru_cache(maxsize=256)
def identity_header_names(h: IdentityHeaders) -> frozenset[str]:
    """A route's identity header names, lower-case: only the gateway sets them (once per
    route's header table: it is frozen)."""
    return frozenset(n.lower() for n in (h.user, h.email, h.groups, h.device, h.assertion))


@functools.lru_cache(maxsize=256)
def unprotected_identity_names(h: IdentityHeaders) -> tuple[str, ...]:
    """Those of a route's identity header names that no protected family covers already (an
    operator's "X-Corp-User"); usually none."""
    return tuple(sorted(n for n in identity_header_names(h) if not protected_header(n)))


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    add: Mapping[str, str],
    *,
    forward_authorization: bool,
    websocket: bool = False,
    drop_cookies: Iterable[str] = (),
    identity_names: frozenset[str] = frozenset(),
) -> CIMultiDict[str]:
    listed = _connection_listed(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if (
            lower in HOP_BY_HOP
            or lower in listed
            or lower in ("host", "expect")
            or protected_header(name)
            or lower in identity_names
            or (lower == "authorization" and not forward_authorization)
            or (websocket and lower in _WEBSOCKET_HANDSHAKE)
        ):
            continue
        if lower == "cookie" and drop_cookies:
            kept = _strip_cookies(value, drop_cookies)
            if kept:
                out.add(name, kept)
            continue
        out.add(name, value)
    out.update(add)
    return out


# RFC 3986 unreserved plus a few sub-delims no list parser splits on; everything else (",", ";",
# whitespace, quotes, "%", controls, non-ASCII) is percent-encoded.
_LIST_ITEM_SAFE = "-._~:@!$&'()*+=/"


def list_header_value(items: Iterable[str]) -> str:
    """A comma-separated header of names (X-Forwarded-Groups) no upstream can split wrongly.

    A group called "eng,admins" is one group to the gateway's policy but two to an upstream that
    splits the header on commas (security review L6), so each item is percent-encoded first:
    "eng%2Cadmins". Plain names are unchanged; the signed assertion carries the raw list.
    """
    return ",".join(quote(item, safe=_LIST_ITEM_SAFE) for item in sorted(items))


def _strip_cookies(header: str, names: Iterable[str]) -> str:
    drop = set(names)
    kept = [
        part.strip()
        for part in header.split(";")
        if part.strip() and part.split("=", 1)[0].strip() not in drop
    ]
    return "; ".join(kept)


def upgrade_requested(headers: CIMultiDictProxy[str]) -> bool:
    """`Upgrade` offered with `Connection: upgrade`: what makes llhttp stop parsing (RFC 9110 §7.8).

    We never switch protocols except for a WebSocket, but llhttp pauses at such a request and
    aiohttp 3.14 discards whatever the same read held after it, so a pipelined request behind
    it would never be answered.
    """
    return "Upgrade" in headers and "upgrade" in _connection_listed(headers)


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        # A legacy app's Latin-1 header value: pass its characters on rather than fail.
        return raw.decode("latin-1")


_DOWNSTREAM_DROP = frozenset(n.encode() for n in HOP_BY_HOP) | {b"server"}


def downstream_raw_headers(
    raw: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[str, str]], int | None]:
    """The client's response header fields from the upstream's raw ones, and its Content-Length.

    Hop-by-hop and Connection-listed fields are dropped, the upstream's Server banner is
    replaced, and Content-Length is returned apart: the protocol writes the framing itself.
    One pass over the raw fields (this runs for every proxied response).
    """
    out: list[tuple[str, str]] = [("Server", SERVER_BANNER)]
    length: int | None = None
    connection: list[str] = []
    for name_b, value_b in raw:
        lower = name_b.lower()
        if lower in _DOWNSTREAM_DROP:
            if lower == b"connection":
                connection.append(_text(value_b))
            continue
        if lower == b"content-length":
            # llhttp has already refused a malformed or conflicting Content-Length.
            length = int(value_b)
            continue
        try:
            value = value_b.decode()
        except UnicodeDecodeError:
            value = value_b.decode("latin-1")  # a legacy app's Latin-1 value, passed on
        # Field names are tokens (llhttp's strict mode refuses anything else): ASCII.
        out.append((name_b.decode("latin-1"), value))
    if connection:
        listed = _listed(connection)
        if listed:
            out = [f for f in out if f[0].lower() not in listed]
            if "content-length" in listed:
                length = None
    return out, length
