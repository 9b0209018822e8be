"""RequestContext: everything the stages know about one request, and the views they leave on it.

The context owns its types: `Identity` (identity stage), `DeviceView` (device stage),
`SessionView` (session stage), `LockView`; a stage imports them from here, never from another
stage, and whatever reads a decided context (rendering, the session keeper, the audit event)
needs no stage module either.

`from_request()` is the only place of the pipeline that reads aiohttp's request, so stages can
be tested and explained (`policy explain`, `/decide`) from contexts built without a socket.
Each stage writes only its own field (the identity stage writes `identity`, and so on).
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict, CIMultiDictProxy

from .clock import SYSTEM_CLOCK, Clock
from .decision import Finding, new_decision_id
from .portal.branding import DEFAULT_LOOK, PortalConfig
from .request.fetchmeta import FetchContext, wants_html
from .request.fetchmeta import read as read_fetch
from .request.headerfamilies import forwarding_header, protected_header
from .request.paths import PathError, normalize_path

if TYPE_CHECKING:
    from .config import RouteConfig
    from .credentials.jwt import VerifiedToken
    from .edge.http1 import Request
    from .edge.tls import CertInfo
    from .risk.posture import PostureEvaluation
    from .store.base import Device, Session


def spoofed_headers(
    headers: CIMultiDictProxy[str], *, from_trusted_proxy: bool = False
) -> tuple[str, ...]:
    """The protected headers the sender had no business setting, sorted, each name once."""
    return tuple(
        sorted(
            {
                k
                for k in headers
                if protected_header(k) and not (from_trusted_proxy and forwarding_header(k))
            }
        )
    )


def is_websocket_handshake(method: str, headers: CIMultiDictProxy[str]) -> bool:
    """A complete RFC 6455 §4.2.1 opening handshake, as aiohttp's `ws.prepare()` will accept it.

    Only such a request is bridged. Anything less (no `Connection: upgrade`, no valid key, a POST)
    is an ordinary request whose hop-by-hop `Upgrade` is dropped: bridging it would open the
    upstream's WebSocket first and only then fail on the client's side, reported as a 502; and a
    POST "upgrade" would reach the upstream as the GET the bridge sends, not the method policy saw.
    """
    if method != "GET" or headers.get("Upgrade", "").strip().lower() != "websocket":
        return False
    connection = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    if "upgrade" not in connection:
        return False
    if headers.get("Sec-WebSocket-Version", "").strip() not in ("13", "8", "7"):
        return False
    try:
        return len(base64.b64decode(headers.get("Sec-WebSocket-Key", ""), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


@dataclass(slots=True)
class Identity:
    """Who is asking: the user (from a token or the certificate) and the device."""

    user: str | None
    source: str  # "token" | "cert" | "session" | "none"
    email: str | None = None
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    claims: dict[str, Any] = field(default_factory=dict)
    issuer: str | None = None
    token: VerifiedToken | None = None
    device_id: str | None = None
    provider: str | None = None
    """The OIDC provider that signed the session in (source "session")."""

    def to_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "source": self.source,
            "email": self.email,
            "groups": sorted(self.groups),
            "roles": sorted(self.roles),
            "scopes": sorted(self.scopes),
            "issuer": self.issuer,
            "provider": self.provider,
            "device_id": self.device_id,
            "token_bound": bool(self.token and self.token.cnf_x5t_s256),
        }


@dataclass(slots=True)
class DeviceView:
    """What the device stage found: the registered device, its trust level and posture."""

    device: Device | None
    trust: str
    posture: PostureEvaluation | None
    new: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "device": self.device.to_json() if self.device else None,
            "trust": self.trust,
            "posture": self.posture.to_json() if self.posture else None,
        }


@dataclass(slots=True)
class SessionView:
    """What the session stage learned, for the keeper (sessions.py) to write back after the
    decision and for the refusal page (an ended session's cookie is cleared)."""

    session: Session | None
    session_id: str | None
    kind: str
    anomaly: float
    cookie_value: str | None = None
    cookie_invalid: bool = False
    drifted: bool = False
    accumulated: float = 0.0
    """The event part of the anomaly score (what is stored and decays)."""


@dataclass(frozen=True, slots=True)
class LockView:
    """An account lock as the refusal page tells it: until when, in the person's time zone."""

    until: float
    timezone: str


@dataclass(slots=True)
class RequestContext:
    method: str
    host: str
    raw_path: str
    query: str
    headers: CIMultiDictProxy[str]
    client_ip: str
    peer_ip: str
    decision_id: str = field(default_factory=new_decision_id)
    started: float = 0.0
    """The clock's monotonic time when the request arrived (for durations)."""
    now: float = 0.0
    """The clock's wall time every stage judges the request at (one instant per request)."""
    path: str | None = None
    path_error: str | None = None
    cert: CertInfo | None = None
    route: RouteConfig | None = None
    identity: Identity | None = None
    device: DeviceView | None = None
    session: SessionView | None = None
    risk_score: float = 0.0
    risk_location: tuple[float, float] | None = None
    retry_after: float | None = None
    mfa_max_age: float | None = None
    mfa_fresh: bool = False
    _wants_html: bool | None = None
    _fetch: FetchContext | None = None
    authority: str = ""
    """The host (with its port) the client addressed: the Host header, or the edge's."""
    unstrippable: bool = False
    """The gateway does not forward this request itself (forward-auth): a protected header
    cannot be stripped, so the request stage refuses it."""
    spoofed_headers: tuple[str, ...] = ()
    websocket: bool = False
    forwarded_proto: str = "https"
    content_length: int | None = None
    """The declared body length (None: no body or chunked), judged against the route's limit."""
    protocol_error: str | None = None
    """What the HTTP protocol refused, when it refused the request before any stage."""
    findings: list[Finding] = field(default_factory=list)
    look: PortalConfig = DEFAULT_LOOK
    """The branding of the configuration this request is served under (its pages show it)."""
    locked: LockView | None = None
    """Set by the session stage when the account is locked (the page says until when)."""

    @property
    def wants_html(self) -> bool:
        """A browser navigation (several stages ask; the Accept header is parsed once)."""
        cached = self._wants_html
        if cached is None:
            cached = self._wants_html = wants_html(self.headers.get("Accept", ""))
        return cached

    @property
    def fetch(self) -> FetchContext:
        """Who made the request, as the browser tells (Fetch Metadata, Origin): request/fetchmeta.py."""
        cached = self._fetch
        if cached is None:
            cached = self._fetch = read_fetch(
                self.method, self.headers, self.authority or self.host, self.wants_html
            )
        return cached

    @property
    def browser(self) -> bool:
        """A browser made it (Fetch Metadata present), not an API client: what decides whether
        people's rules (sign-in, MFA) apply, rather than the Accept header's order."""
        return self.fetch.browser

    @classmethod
    def from_request(
        cls,
        request: Request,
        *,
        trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
        allow_encoded_slash: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> RequestContext:
        """The context of a request on the data plane; the connection's peer and certificate
        were taken once, when it was accepted."""
        peer_ip = request.peer_ip
        cert = request.cert
        headers = request.headers
        conn = request.conn
        memo = conn.head_memo
        method = request.method
        if (
            memo is not None
            and memo[0] is headers
            and memo[1] is trusted_proxies
            and memo[2] == method
        ):
            # The same header fields as the previous request on this connection (and the same
            # peer, the same trusted proxies): what follows from them alone is the same.
            client_ip, host, spoofed, websocket = memo[3:]
        else:
            client_ip = peer_ip
            peer_trusted = bool(trusted_proxies) and is_trusted_proxy(peer_ip, trusted_proxies)
            if peer_trusted:
                client_ip = client_ip_from_forwarded(peer_ip, headers, trusted_proxies)
            host = (request.host or "").rsplit(":", 1)[0].lower() if request.host else ""
            if host.startswith("[") and "]" in host:
                host = host[: host.index("]") + 1]
            spoofed = spoofed_headers(headers, from_trusted_proxy=peer_trusted)
            websocket = is_websocket_handshake(method, headers)
            conn.head_memo = (headers, trusted_proxies, method, client_ip, host, spoofed, websocket)
        raw_path, _, query = request.raw_path.partition("?")
        now = clock.time()
        ctx = cls(
            method=method,
            host=host,
            authority=request.headers.get("Host", ""),
            raw_path=raw_path,
            query=query,
            headers=headers,
            client_ip=client_ip,
            peer_ip=peer_ip,
            cert=cert,
            spoofed_headers=spoofed,
            websocket=websocket,
            content_length=request.content_length,
            started=clock.monotonic(),
            now=now,
            decision_id=new_decision_id(now),
        )
        ctx.path, ctx.path_error = _normalized(raw_path, allow_encoded_slash)
        return ctx

    @classmethod
    def synthetic(
        cls,
        *,
        method: str = "GET",
        path: str = "/",
        host: str = "127.0.0.1",
        headers: dict[str, str] | None = None,
        client_ip: str = "127.0.0.1",
        cert: CertInfo | None = None,
        now: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> RequestContext:
        """A context with no socket behind it: `policy explain`, `policy test`, `/decide`.

        It is judged at `now` when given (a policy test case's instant), else at the clock's.
        """
        raw_path, _, query = path.partition("?")
        h = CIMultiDictProxy(CIMultiDict(headers or {}))
        made = clock.time()
        ctx = cls(
            method=method.upper(),
            host=host.lower(),
            authority=host,
            raw_path=raw_path,
            query=query,
            headers=h,
            client_ip=client_ip,
            peer_ip=client_ip,
            cert=cert,
            spoofed_headers=spoofed_headers(h),
            # No connection to bridge here, only a question to answer: any sign of an upgrade
            # counts, so a route with websocket = false refuses it.
            websocket=h.get("Upgrade", "").lower() == "websocket",
            started=clock.monotonic(),
            now=made if now is None else now,
            decision_id=new_decision_id(made),
        )
        try:
            ctx.path = normalize_path(raw_path)
        except PathError as exc:
            ctx.path_error = str(exc)
        return ctx


@functools.lru_cache(maxsize=4096)
def _normalized(raw_path: str, allow_encoded_slash: bool) -> tuple[str | None, str | None]:
    """The normalised path or why not, once per distinct raw path (clients repeat paths)."""
    try:
        return normalize_path(raw_path, allow_encoded_slash=allow_encoded_slash), None
    except PathError as exc:
        return None, str(exc)


def client_ip_from_forwarded(
    peer_ip: str,
    headers: CIMultiDictProxy[str],
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
    *,
    header: str = "X-Forwarded-For",
) -> str:
    """Walk X-Forwarded-For from the right, skipping trusted proxies (Hypercorn's proxy_fix).

    The first address that is not a trusted proxy is the client; anything further left was
    written by the client itself and is not believed, and neither is anything left of a hop
    that is not an address (the hop right of it, a trusted proxy, is the client then). The one
    rule for the data plane and forward-auth alike: a chain names the same client on both.
    """

    if not is_trusted_proxy(peer_ip, trusted):
        return peer_ip
    hops: list[str] = []
    for value in headers.getall(header, ()):
        hops.extend(h.strip() for h in value.split(",") if h.strip())
    client = peer_ip
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break
        client = hop
        if not is_trusted_proxy(hop, trusted):
            break
    return client


def is_trusted_proxy(
    ip: str, trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in trusted)
