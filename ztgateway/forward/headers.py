"""Header hygiene in both directions.

Hop-by-hop headers (RFC 9110 §7.6.1) and every header named in `Connection` are dropped;
inbound forwarding and identity headers never reach the upstream (the request stage records
each attempt as a finding); the gateway then adds the headers the upstream may trust.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from ..context import protected_header
from ..responses import SERVER

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
SERVER_BANNER = SERVER
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


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    add: Mapping[str, str],
    *,
    forward_authorization: bool,
    websocket: bool = False,
    drop_cookies: Iterable[str] = (),
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
    out: list[tuple[str, str]] = [("Server", SERVER)]
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
