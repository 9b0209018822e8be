"""`[upstreams.NAME]` and `[[routes]]`: where a request goes and what it must show to get there
(the per-route policy, identity headers, risk thresholds, session rules and time windows), and the
check that no two routes claim the same requests (`check_overlaps`; routes.py matches them)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import time as dtime
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from yarl import URL

from ..configreader import ConfigError, Table
from ..revocation.config import OCSP_FAILURE_MODES, OCSPFailure
from .identity import claim_values
from .listener import Network, ServerConfig

RouteMode = Literal["enforce", "monitor"]


CrossSite = Literal["lax", "strict", "safe-methods"]


HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


_DAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+$")


_ROUTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: URL
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_connections: int = 256
    max_connections_per_host: int = 256
    case_insensitive: bool = False
    """The upstream serves `/ADMIN/` as `/admin/` (IIS, Windows file systems): its routes match
    case-insensitively and paths with Windows file-name aliases are refused (docs/security.md)."""


@dataclass(frozen=True, slots=True)
class TimeWindow:
    days: frozenset[int]
    start: dtime
    end: dtime
    tz: ZoneInfo
    text: str


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    user: str = "X-Forwarded-User"
    email: str = "X-Forwarded-Email"
    groups: str = "X-Forwarded-Groups"
    device: str = "X-ZT-Device-Id"
    assertion: str = "X-ZT-Assertion"


TRUST_LEVELS = ("unknown", "registered", "approved", "compliant")


TrustLevel = Literal["unknown", "registered", "approved", "compliant"]


@dataclass(frozen=True, slots=True)
class RouteRisk:
    allow_up_to: float = 0.5
    step_up_up_to: float = 0.8
    sensitive: bool = False


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float  # tokens per second
    burst: int
    scopes: tuple[str, ...] = ("session", "user", "device", "ip")


IP_DRIFT_MODES = ("ignore", "allow_same_network", "step_up", "terminate")


StepUpFactor = Literal["totp", "webauthn"]


STEP_UP_FACTORS: tuple[StepUpFactor, ...] = ("totp", "webauthn")


@dataclass(frozen=True, slots=True)
class RouteSession:
    ip_drift: Literal["ignore", "allow_same_network", "step_up", "terminate"] = "allow_same_network"
    idle_timeout: float | None = None
    absolute_timeout: float | None = None
    mfa_max_age: float | None = None
    anomaly_step_up: float | None = None
    anomaly_terminate: float | None = None
    rate_limit: RateLimit | None = None
    step_up_factors: tuple[StepUpFactor, ...] = STEP_UP_FACTORS
    """Which second factors answer a step-up on this route; ("webauthn",) asks for a
    phishing-resistant one (docs/webauthn.md)."""
    require_user_verification: bool = False
    """The WebAuthn step-up must verify the person (PIN or biometric), not only their presence."""


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    require_client_cert: bool = True
    require_token: bool = False
    require_bound_token: bool = False
    allow_cert_identity: bool = True
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    claims: tuple[tuple[str, tuple[str, ...]], ...] = ()
    methods: frozenset[str] = frozenset()
    paths: tuple[str, ...] = ()
    cert_subjects: frozenset[str] = frozenset()
    cert_san_patterns: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()
    time_windows: tuple[TimeWindow, ...] = ()
    issuers: frozenset[str] = frozenset()
    min_trust: TrustLevel | None = None
    """None: `[devices] default_min_trust` for a request with a certificate ("approved" unless
    configured), "unknown" for one without (a route that does not require a certificate)."""
    require_signed_posture: bool = False
    login: Literal["never", "always", "browsers"] = "never"
    """Who must be a signed-in user (OIDC) rather than the certificate's user: nobody, every
    client, or browser navigations only (people sign in; machines present their certificate)."""
    ocsp: OCSPFailure | None = None
    """When OCSP cannot tell (responder down, bad or stale answer, `unknown`): refuse
    ("hard-fail", the default) or let the request through, counted and audited ("soft-fail")."""
    providers: tuple[str, ...] = ()
    """The OIDC providers whose sessions this route accepts, in the order the sign-in chooser
    offers them; () = every configured provider."""


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    prefix: str
    upstream: UpstreamConfig
    hosts: frozenset[str] = frozenset()
    mode: RouteMode = "enforce"
    policy: RoutePolicy = field(default_factory=RoutePolicy)
    headers: IdentityHeaders = field(default_factory=IdentityHeaders)
    client_max_size: int = 10 * 1024 * 1024
    forward_authorization: bool = False
    expose_detail: bool = False
    websocket: bool = True
    strip_prefix: bool = False
    allow_path_params: bool = False
    """`;params` in path segments reach the upstream (routing ignores them); refused if false."""
    allow_double_encoding: bool = False
    """Escapes a second decoding would turn into dots or separators (`%252e`) are forwarded."""
    cross_site: CrossSite = "strict"
    """Which requests another site's page may make with the user's (ambient) certificate:
    "strict" none (a link from another site gets a page to continue from), "lax" top-level
    GET navigations, "safe-methods" any GET/HEAD. Unsafe methods from another site are refused
    whatever this says (docs/security.md)."""
    websocket_origins: frozenset[str] = frozenset()
    """Origins besides the gateway's own whose pages may open this route's WebSockets."""
    risk: RouteRisk = field(default_factory=RouteRisk)
    session: RouteSession = field(default_factory=RouteSession)


def parse_upstream(name: str, t: Table) -> UpstreamConfig:
    url = URL(t.text("url", required=True))
    if url.scheme not in ("http", "https") or not url.host:
        t.fail("url", "must be an absolute http:// or https:// URL")
    if url.query_string or url.fragment:
        t.fail("url", "must not carry a query or fragment")
    cert, key = t.path("client_cert"), t.path("client_key")
    if (cert is None) != (key is None):
        t.fail("client_cert", "client_cert and client_key go together")
    ca = t.path("ca")
    if url.scheme == "http" and (ca or cert):
        t.fail("ca", "TLS settings need an https:// url")
    cfg = UpstreamConfig(
        name=name,
        url=url,
        ca=ca,
        client_cert=cert,
        client_key=key,
        connect_timeout=t.duration("connect_timeout", 5.0, min=0.01),
        read_timeout=t.duration("read_timeout", 60.0, min=0.01),
        max_connections=t.integer("max_connections", 256, min=1),
        max_connections_per_host=t.integer("max_connections_per_host", 256, min=1),
        case_insensitive=t.flag("case_insensitive", False),
    )
    t.done()
    return cfg


def read_time_window(text: str, tz: ZoneInfo, t: Table, key: str) -> TimeWindow:
    """`mon-fri 08:00-18:00` or `sat,sun 10:00-12:00`; end before start spans midnight."""
    m = re.fullmatch(r"\s*([a-z,\-]+)\s+(\d{2}):(\d{2})-(\d{2}):(\d{2})\s*", text)
    if not m:
        t.fail(key, f"expected like 'mon-fri 08:00-18:00', not {text!r}")
    days: set[int] = set()
    for part in m.group(1).split(","):
        if "-" in part:
            a, _, b = part.partition("-")
            if a not in _DAYS or b not in _DAYS:
                t.fail(key, f"unknown day in {part!r}")
            i = _DAYS[a]
            while True:
                days.add(i)
                if i == _DAYS[b]:
                    break
                i = (i + 1) % 7
        elif part in _DAYS:
            days.add(_DAYS[part])
        else:
            t.fail(key, f"unknown day {part!r}")
    h1, m1, h2, m2 = (int(m.group(i)) for i in range(2, 6))
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59:
        t.fail(key, f"bad time in {text!r}")
    end = dtime(23, 59, 59, 999999) if h2 == 24 else dtime(h2, m2)
    return TimeWindow(frozenset(days), dtime(h1, m1), end, tz, text.strip())


def parse_time_window(text: str, tz: ZoneInfo) -> TimeWindow:
    """Parse a window outside configuration loading (per-user working hours from the store)."""
    table = Table({}, Path("<user profile>"))
    try:
        return read_time_window(text, tz, table, "working_hours")
    except ConfigError as exc:
        raise ValueError(exc.message) from exc


def _policy(
    t: Table,
    zones: dict[str, tuple[Network, ...]],
    issuer_names: set[str],
    provider_names: tuple[str, ...] = (),
) -> RoutePolicy:
    methods = frozenset(m.upper() for m in t.str_list("methods"))
    bad = methods - HTTP_METHODS
    if bad:
        t.fail("methods", f"unknown method {sorted(bad)[0]!r}")
    zone_names = t.str_list("zones")
    for i, z in enumerate(zone_names):
        if z not in zones:
            t.fail(f"zones[{i}]", f"unknown zone {z!r} (define it under [zones])")
    tz_name = t.text("timezone", "UTC")
    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        t.fail("timezone", f"unknown time zone {tz_name!r}")
    windows = tuple(
        read_time_window(w, tz, t, f"time_windows[{i}]")
        for i, w in enumerate(t.str_list("time_windows"))
    )
    claims = claim_values(t.table("claims"))
    issuers = frozenset(t.str_list("issuers"))
    for name in issuers - issuer_names:
        t.fail("issuers", f"unknown issuer {name!r} (define it under [issuers])")
    providers = t.str_list("providers")
    if t.has("providers") and not providers:
        t.fail("providers", "an empty list would let nobody sign in: leave it out to allow all")
    for i, p in enumerate(providers):
        if p not in provider_names:
            known = ", ".join(provider_names) or "none configured"
            t.fail(f"providers[{i}]", f"unknown provider {p!r} (configured: {known})")
        if p in providers[:i]:
            t.fail(f"providers[{i}]", f"provider {p!r} is listed twice")
    policy = RoutePolicy(
        require_client_cert=t.flag("require_client_cert", True),
        require_token=t.flag("require_token", False),
        require_bound_token=t.flag("require_bound_token", False),
        allow_cert_identity=t.flag("allow_cert_identity", True),
        users=frozenset(t.str_list("users")),
        groups=frozenset(t.str_list("groups")),
        roles=frozenset(t.str_list("roles")),
        scopes=frozenset(t.str_list("scopes")),
        claims=claims,
        methods=methods,
        paths=t.str_list("paths"),
        cert_subjects=frozenset(t.str_list("cert_subjects")),
        cert_san_patterns=t.str_list("cert_san_patterns"),
        zones=zone_names,
        time_windows=windows,
        issuers=issuers,
        min_trust=(
            t.choice("min_trust", TRUST_LEVELS, "unknown") if t.has("min_trust") else None  # type: ignore[arg-type]
        ),
        require_signed_posture=t.flag("require_signed_posture", False),
        login=t.choice("login", ("never", "always", "browsers"), "never"),  # type: ignore[arg-type]
        ocsp=t.choice("ocsp", OCSP_FAILURE_MODES, "hard-fail") if t.has("ocsp") else None,  # type: ignore[arg-type]
        providers=providers,
    )
    if policy.require_bound_token and not policy.require_token:
        t.fail("require_bound_token", "needs require_token = true")
    if policy.require_bound_token and not policy.require_client_cert:
        t.fail("require_bound_token", "a bound token needs require_client_cert = true")
    if policy.require_token and not issuer_names:
        t.fail("require_token", "no [issuers] are configured to verify tokens")
    for i, p in enumerate(policy.paths):
        if not p.startswith("/"):
            t.fail(f"paths[{i}]", "must start with '/'")
    t.done()
    return policy


def _headers(t: Table) -> IdentityHeaders:
    d = IdentityHeaders()
    h = IdentityHeaders(
        user=t.text("user", d.user),
        email=t.text("email", d.email),
        groups=t.text("groups", d.groups),
        device=t.text("device", d.device),
        assertion=t.text("assertion", d.assertion),
    )
    for name in ("user", "email", "groups", "device", "assertion"):
        if not _HEADER_NAME.match(getattr(h, name)):
            t.fail(name, "must be a header name of letters, digits and '-'")
    t.done()
    return h


def parse_route(
    t: Table,
    upstreams: dict[str, UpstreamConfig],
    zones: dict[str, tuple[Network, ...]],
    issuer_names: set[str],
    server: ServerConfig,
    provider_names: tuple[str, ...] = (),
) -> RouteConfig:
    name = t.text("name", required=True)
    if not _ROUTE_NAME.match(name):
        t.fail("name", "lower-case letters, digits, '-' and '_' (it is a metrics label)")
    prefix = t.text("prefix", "/")
    if not prefix.startswith("/") or not prefix.endswith("/"):
        t.fail("prefix", "must start and end with '/' so '/api/' never matches '/apiary'")
    if "//" in prefix or "/./" in prefix or "/../" in prefix:
        t.fail("prefix", "must be a normalised path")
    if any(c in prefix for c in ";%\\?#") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in prefix):
        t.fail("prefix", "must be a decoded path without ';', '%', '\\', '?', '#' or controls")
    up_ref = t.text("upstream", required=True)
    if up_ref in upstreams:
        upstream = upstreams[up_ref]
    elif "://" in up_ref:
        url = URL(up_ref)
        if url.scheme != "http" or not url.host:
            t.fail(
                "upstream", "an inline upstream must be an http:// URL; use [upstreams.X] for TLS"
            )
        upstream = UpstreamConfig(name=f"{name}-inline", url=url)
    else:
        t.fail("upstream", f"unknown upstream {up_ref!r} (define it under [upstreams])")
    hosts = frozenset(h.lower() for h in t.str_list("hosts"))
    route = RouteConfig(
        name=name,
        prefix=prefix,
        upstream=upstream,
        hosts=hosts,
        mode=t.choice("mode", ("enforce", "monitor"), "enforce"),  # type: ignore[arg-type]
        policy=_policy(t.table("policy"), zones, issuer_names, provider_names),
        headers=_headers(t.table("headers")),
        client_max_size=t.integer("client_max_size", server.client_max_size, min=0),
        forward_authorization=t.flag("forward_authorization", False),
        expose_detail=t.flag("expose_detail", False),
        websocket=t.flag("websocket", True),
        strip_prefix=t.flag("strip_prefix", False),
        allow_path_params=t.flag("allow_path_params", False),
        allow_double_encoding=t.flag("allow_double_encoding", False),
        cross_site=t.choice("cross_site", ("strict", "lax", "safe-methods"), "strict"),  # type: ignore[arg-type]
        websocket_origins=_origins(t, "websocket_origins"),
        risk=_route_risk(t.table("risk")),
        session=_route_session(t.table("session")),
    )
    if route.policy.require_client_cert is False and server.client_cert == "required":
        pass  # the listener demands a certificate anyway; the route just does not insist
    t.done()
    return route


def _origins(t: Table, key: str) -> frozenset[str]:
    """Origins as browsers serialise them (RFC 6454 §6.2): scheme://host[:port], no default."""
    out = set()
    for i, origin in enumerate(t.str_list(key)):
        try:
            url = URL(origin.strip().lower())
            ok = (
                url.scheme in ("http", "https")
                and bool(url.host)
                and url.raw_path in ("", "/")
                and not (url.query_string or url.fragment or url.user)
            )
        except ValueError:
            ok = False
        if not ok:
            t.fail(f"{key}[{i}]", "an origin is scheme://host[:port], e.g. https://app.example")
        port = "" if url.is_default_port() else f":{url.port}"
        host = str(url.raw_host)
        out.add(f"{url.scheme}://[{host}]{port}" if ":" in host else f"{url.scheme}://{host}{port}")
    return frozenset(out)


def check_overlaps(routes: tuple[RouteConfig, ...], root: Table) -> None:
    """Two routes that could claim the same request are ambiguous: refuse at load.

    Routes nest (the longest prefix wins, see docs/decisions/0002-routing.md); what is refused
    is the same prefix on overlapping host sets, and duplicate names. For the routes of a
    case-insensitive upstream "the same prefix" ignores case: `/Admin/` on one upstream and
    `/admin/` on a case-insensitive one would both claim `/ADMIN/x`.
    """
    seen_names: dict[str, int] = {}
    for i, r in enumerate(routes):
        if r.name in seen_names:
            root.fail(f"routes[{i}].name", f"duplicate route name {r.name!r}")
        seen_names[r.name] = i
        for j in range(i):
            o = routes[j]
            folds = r.upstream.case_insensitive or o.upstream.case_insensitive
            if o.prefix != r.prefix:
                if not (folds and o.prefix.lower() == r.prefix.lower()):
                    continue
                if not r.hosts or not o.hosts or r.hosts & o.hosts:
                    root.fail(
                        f"routes[{i}].prefix",
                        f"overlaps route {o.name!r} ({o.prefix!r} and {r.prefix!r} differ only "
                        "in case, and one upstream is case_insensitive)",
                    )
                continue
            if not r.hosts or not o.hosts or r.hosts & o.hosts:
                both_any = not r.hosts and not o.hosts
                if both_any or (r.hosts & o.hosts):
                    root.fail(
                        f"routes[{i}].prefix",
                        f"overlaps route {o.name!r} (same prefix {r.prefix!r} and hosts)",
                    )


def _route_risk(t: Table) -> RouteRisk:
    r = RouteRisk(
        allow_up_to=t.number("allow_up_to", 0.5, min=0.0, max=1.0),
        step_up_up_to=t.number("step_up_up_to", 0.8, min=0.0, max=1.0),
        sensitive=t.flag("sensitive", False),
    )
    if r.allow_up_to > r.step_up_up_to:
        t.fail("allow_up_to", "must not exceed step_up_up_to")
    t.done()
    return r


def _route_session(t: Table) -> RouteSession:
    rl_t = t.table("rate_limit")
    rate_limit = None
    if rl_t.data:
        scopes = rl_t.str_list("scopes", ("session", "user", "device", "ip"))
        for i, sc in enumerate(scopes):
            if sc not in ("session", "user", "device", "ip"):
                rl_t.fail(f"scopes[{i}]", f"unknown scope {sc!r} (session, user, device, ip)")
        rate_limit = RateLimit(
            rate=rl_t.number("rate", required=True, min=0.001),
            burst=rl_t.integer("burst", required=True, min=1),
            scopes=scopes,
        )
    rl_t.done()
    cfg = RouteSession(
        ip_drift=t.choice("ip_drift", IP_DRIFT_MODES, "allow_same_network"),  # type: ignore[arg-type]
        idle_timeout=t.duration("idle_timeout", None, min=1.0),
        absolute_timeout=t.duration("absolute_timeout", None, min=1.0),
        mfa_max_age=t.duration("mfa_max_age", None, min=1.0),
        anomaly_step_up=t.number("anomaly_step_up", None, min=0.0, max=1.0),
        anomaly_terminate=t.number("anomaly_terminate", None, min=0.0, max=1.0),
        rate_limit=rate_limit,
        step_up_factors=_step_up_factors(t),
        require_user_verification=t.flag("require_user_verification", False),
    )
    if cfg.require_user_verification and cfg.step_up_factors != ("webauthn",):
        # A TOTP code cannot say whether a person or a script typed it.
        t.fail("require_user_verification", 'needs step_up_factors = ["webauthn"]')
    if (
        cfg.anomaly_step_up is not None
        and cfg.anomaly_terminate is not None
        and cfg.anomaly_step_up > cfg.anomaly_terminate
    ):
        t.fail("anomaly_step_up", "must not exceed anomaly_terminate")
    t.done()
    return cfg


def _step_up_factors(t: Table) -> tuple[StepUpFactor, ...]:
    factors = t.str_list("step_up_factors", STEP_UP_FACTORS)
    if not factors:
        t.fail("step_up_factors", "name at least one factor (totp, webauthn)")
    for i, factor in enumerate(factors):
        if factor not in STEP_UP_FACTORS:
            t.fail(f"step_up_factors[{i}]", f"unknown factor {factor!r} (totp, webauthn)")
    if len(set(factors)) != len(factors):
        t.fail("step_up_factors", "names a factor twice")
    # Kept in the one canonical order, so the route's set compares equal however it was written.
    return tuple(f for f in STEP_UP_FACTORS if f in factors)
