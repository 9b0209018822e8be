"""TOML configuration -> frozen dataclasses, validated in full at start-up and on reload.

A configuration that loads is one the gateway can serve safely: unknown keys, wrong types,
missing files, overlapping routes, unknown zones and contradictions are all `ConfigError`s that
name the file and the key path. `ztgateway check-config` runs exactly this loader.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields
from datetime import time as dtime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from yarl import URL

from .configreader import ConfigError, Table
from .credentials.jwt import IssuerConfig
from .credentials.oidc import OIDCClaims, OIDCProviderConfig
from .pages.branding import PortalConfig, parse_portal
from .request.headerfamilies import cert_header_problem
from .revocation.config import OCSP_FAILURE_MODES, OCSPFailure, RevocationConfig, parse_revocation
from .risk.posture import PLATFORMS, PosturePolicy, parse_version
from .risk.scoring import BlocklistError, RiskWeights
from .signals.config import TransmitterConfig, parse_transmitters

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
CertMode = Literal["required", "optional"]
RouteMode = Literal["enforce", "monitor"]
CrossSite = Literal["lax", "strict", "safe-methods"]

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
_DAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+$")
_ROUTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    client_cert: CertMode = "required"
    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 10_000
    max_header_bytes: int = 8190
    max_headers: int = 100
    client_max_size: int = 10 * 1024 * 1024
    shutdown_timeout: float = 15.0
    trusted_proxies: tuple[Network, ...] = ()
    spoofed_headers: Literal["strip", "deny"] = "strip"
    allow_encoded_slash: bool = False
    public_url: str = ""
    workers: int = 1
    body_timeout: float = 30.0
    send_timeout: float = 30.0
    max_target_bytes: int = 8190
    hosts: tuple[str, ...] = ()
    allow_trace: bool = False
    websocket_ping_interval: float = 20.0
    websocket_max_message: int = 4 * 1024 * 1024
    invalid_credentials_limit: int = 30
    """Failed credential verifications per client address within the window before further
    credentials from it are refused unverified (throttle.py); 0 turns the throttle off."""
    invalid_credentials_window: float = 60.0
    hsts_max_age: int = 31_536_000
    """Strict-Transport-Security max-age on the gateway's own answers (0: not sent)."""
    hsts_include_subdomains: bool = False
    max_pending_handshakes: int = 1024
    """Connections mid-handshake, budgeted apart from `max_connections` (established)."""
    max_pending_handshakes_per_source: int = 64
    """Of those, from one address (an IPv6 /64): one host cannot starve the others."""
    min_ready_workers: int = 1
    """With workers > 1, the supervisor's /readyz is 200 while at least this many are ready."""
    memory_trim_interval: float = 30.0
    """Seconds between returns of freed heap memory to the system (malloc_trim); 0: never."""


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path
    crl: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    reload_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class OpsConfig:
    host: str = "127.0.0.1"
    port: int = 9100
    enabled: bool = True
    admin_token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class AuditConfig:
    db: Path
    jsonl: Path | None = None
    max_queue: int = 100_000
    durability: Literal["memory", "journal", "fsync"] = "journal"
    """What an event must reach before the gateway acts on its decision (docs/audit.md)."""
    journal_dir: Path | None = None
    """The write-ahead journal's directory; None: `<db>.journal` beside the database."""
    mask_key_file: Path | None = None
    """HMAC key for masked secrets (created on first start); none: masks carry no digest."""
    mask_key_env: str = "ZTGW_AUDIT_MASK_KEY"
    checkpoint_key_file: Path | None = None
    """Ed25519 key that signs checkpoints over the chain (created on first start)."""
    checkpoint_public_keys: Path | None = None
    """PEM bundle of the public keys `audit verify` trusts; default `<checkpoint_key_file>.pub`."""
    checkpoint_interval: float = 60.0
    upstream_events: Literal["all", "failures"] = "all"
    """Which forwarded requests get an upstream-outcome event (audit/events.py)."""


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
class ClaimMapping:
    """Which token claims carry the user, email, groups, roles and scopes, per issuer."""

    user: str = "sub"
    email: str = "email"
    groups: str = "groups"
    roles: str = "roles"
    scopes: str = "scope"
    require_email_verified: bool = False
    """Take the e-mail only with `email_verified: true`; by default only `false` drops it."""
    user_namespace: str = ""
    """"" : the issuer's users are the directory's (the client certificates' and the OIDC
    provider's): "alice" is one person whichever of them says so. Otherwise its users are
    "<namespace>:<user>", never the same as anyone else's (security review L8)."""


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
USER_VERIFICATION = ("required", "preferred", "discouraged")


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


@dataclass(frozen=True, slots=True)
class AssertionConfig:
    key: Path | None
    ttl: int = 60
    issuer: str = ""
    also_publish: tuple[Path, ...] = ()
    """Keys published in /.ztgw/jwks.json beside the signing key: the next one before a
    rotation, the previous one after it (docs/deploy.md)."""


EdgeProxy = Literal["nginx", "traefik", "caddy"]
EDGE_PROXIES: tuple[EdgeProxy, ...] = ("nginx", "traefik", "caddy")


@dataclass(frozen=True, slots=True)
class ForwardAuthConfig:
    enabled: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    edge: EdgeProxy = "nginx"
    """Whose headers describe the original request (URI, method, host, client address): only
    that proxy's are read; another proxy's names in a request were sent by the client."""
    cert_header: str = ""
    """The one header in which the edge passes the client certificate it verified ("" = the
    edge passes none). The certificate is verified again here; any other certificate header
    in a request is refused (docs/security.md, "Forward-auth")."""


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "sqlite:///../var/state.db"
    base: Path = Path()


@dataclass(frozen=True, slots=True)
class DevicesConfig:
    auto_approve: bool = False
    owner_mismatch: Literal["deny", "risk"] = "deny"
    default_min_trust: TrustLevel = "approved"
    """The trust a route without `min_trust` needs of a presented device: a pending device
    (auto_approve = false) is refused until approved (security review I1)."""


@dataclass(frozen=True, slots=True)
class RiskConfig:
    trusted_zones: tuple[str, ...] = ()
    blocked_zones: tuple[str, ...] = ()
    blocklist: Path | None = None
    geoip_db: Path | None = None
    max_travel_speed_kmh: float = 900.0
    failed_attempts_window: float = 600.0
    failed_attempts_threshold: int = 5
    large_request_bytes: int = 10 * 1024 * 1024
    default_timezone: str = "UTC"
    default_working_hours: str = ""
    weights: RiskWeights = field(default_factory=RiskWeights)


@dataclass(frozen=True, slots=True)
class SessionsConfig:
    cookie_name: str = "__Host-ztgw-session"
    idle_timeout: float = 1800.0
    absolute_timeout: float = 43200.0
    anomaly_step_up: float = 0.7
    anomaly_terminate: float = 0.9
    anomaly_half_life: float = 600.0
    burst_requests: int = 50
    burst_window: float = 10.0
    lock_on_terminate: float = 0.0
    step_up_validity: float = 900.0
    persistent_cookie: bool = False
    """False: the cookie has no Max-Age and ends with the browser; the server-side idle and
    absolute timeouts hold either way."""
    max_per_device: int = 5
    """Browser sessions one user keeps on one device; a sign-in beyond it ends the oldest."""


@dataclass(frozen=True, slots=True)
class MFAConfig:
    key_file: Path | None = None
    key_env: str = "ZTGW_MFA_KEY"
    issuer: str = "ztgateway"
    max_failures: int = 5
    find_time: float = 300.0
    ban_time: float = 900.0
    window: int = 1
    enrolment_ttl: float = 900.0
    """How long a started enrolment (its secret, sealed) waits for the confirming code."""


@dataclass(frozen=True, slots=True)
class WebAuthnConfig:
    """The relying party the gateway is for security keys and passkeys (W3C WebAuthn §5.1.4).

    `rp_id` and `origins` come from here or from `[server] public_url`, never from a request's
    Host: a credential is scoped to the RP ID, and an assertion made for any other origin is
    refused (webauthn.py)."""

    rp_id: str = ""
    """Empty: WebAuthn is off (no public_url and no rp_id)."""
    rp_name: str = "ztgateway"
    origins: tuple[str, ...] = ()
    challenge_ttl: float = 300.0
    user_verification: Literal["required", "preferred", "discouraged"] = "preferred"

    @property
    def enabled(self) -> bool:
        return bool(self.rp_id and self.origins)


@dataclass(frozen=True, slots=True)
class KeysConfig:
    """Where the root of the gateway's own keys comes from (keys.py); neither: the store."""

    file: Path | None = None
    env: str = "ZTGW_GATEWAY_KEY"


@dataclass(frozen=True, slots=True)
class OIDCConfig:
    """Browser sign-in: the providers people sign in with, in the configuration's order (none
    when no [oidc] section is configured)."""

    providers: tuple[OIDCProviderConfig, ...] = ()
    post_logout_path: str = "/.ztgw/signed-out"
    backchannel_logout: bool = True
    """Accept the provider's logout tokens at /.ztgw/oidc/backchannel-logout (docs/signals.md)."""

    @property
    def provider(self) -> OIDCProviderConfig | None:
        """The first provider (the only one in the single-provider form), or None."""
        return self.providers[0] if self.providers else None

    def get(self, name: str) -> OIDCProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.providers)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: Literal["json", "text"] = "json"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    file: Path
    revision: str
    server: ServerConfig
    tls: TLSConfig
    ops: OpsConfig
    audit: AuditConfig
    upstreams: dict[str, UpstreamConfig]
    routes: tuple[RouteConfig, ...]
    zones: dict[str, tuple[Network, ...]]
    issuers: tuple[IssuerConfig, ...]
    claim_maps: dict[str, ClaimMapping]
    assertion: AssertionConfig
    forward_auth: ForwardAuthConfig
    store: StoreConfig = field(default_factory=StoreConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    posture: PosturePolicy = field(default_factory=PosturePolicy)
    risk: RiskConfig = field(default_factory=RiskConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    mfa: MFAConfig = field(default_factory=MFAConfig)
    webauthn: WebAuthnConfig = field(default_factory=WebAuthnConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    oidc: OIDCConfig = field(default_factory=OIDCConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    portal: PortalConfig = field(default_factory=PortalConfig)
    signals: tuple[TransmitterConfig, ...] = ()
    """`[signals.NAME]`: Shared Signals transmitters (ztgateway/signals/, docs/signals.md)."""
    revocation: RevocationConfig = field(default_factory=RevocationConfig)


def load_config(path: Path | str) -> GatewayConfig:
    file = Path(path).resolve()
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(file, "", f"not valid TOML: {exc}") from exc
    return parse_config(data, file, revision=hashlib.sha256(raw).hexdigest()[:16])


def parse_config(data: dict[str, object], file: Path, *, revision: str = "") -> GatewayConfig:
    root = Table(dict(data), file)
    server = _server(root.table("server"))
    tls = _tls(root.table("tls", required=True))
    ops = _ops(root.table("ops"))
    audit = _audit(root.table("audit"), file)
    zones = _zones(root.table("zones"))
    claim_maps: dict[str, ClaimMapping] = {}
    issuers = _issuers(root.named_tables("issuers"), claim_maps)
    upstreams = {name: _upstream(name, t) for name, t in root.named_tables("upstreams").items()}
    issuer_names = {i.name for i in issuers}
    oidc = _oidc(
        root.table("oidc"),
        server,
        {m.user_namespace: name for name, m in claim_maps.items() if m.user_namespace},
    )
    routes = tuple(
        _route(t, upstreams, zones, issuer_names, server, oidc.names) for t in root.tables("routes")
    )
    if not routes:
        root.fail("routes", "at least one [[routes]] table is required")
    assertion = _assertion(root.table("assertion"))
    forward_auth = _forward_auth(root.table("forward_auth"))
    store = _store(root.table("store"), file)
    devices = _devices(root.table("devices"))
    posture = _posture(root.table("posture"))
    risk = _risk(root.table("risk"), zones)
    sessions = _sessions(root.table("sessions"))
    mfa = _mfa(root.table("mfa"))
    portal = parse_portal(root.table("portal"))
    webauthn = _webauthn(root.table("webauthn"), server)
    signals = parse_transmitters(root.named_tables("signals"))
    keys_t = root.table("keys")
    keys = KeysConfig(
        file=keys_t.path("file", must_exist=False),
        env=keys_t.text("env", "ZTGW_GATEWAY_KEY"),
    )
    keys_t.done()
    for i, r in enumerate(routes):
        if r.policy.login != "never" and not oidc.providers:
            root.fail(f"routes[{i}].policy.login", "needs an [oidc] provider to sign people in")
        if r.session.step_up_factors == ("webauthn",) and not webauthn.enabled:
            root.fail(
                f"routes[{i}].session.step_up_factors",
                "webauthn needs a relying party: [webauthn] rp_id, or a [server] public_url "
                "with a host name",
            )
    revocation = parse_revocation(root.table("revocation"))
    for i, r in enumerate(routes):
        if r.policy.ocsp is not None and not revocation.ocsp:
            root.fail(f"routes[{i}].policy.ocsp", "needs [revocation] ocsp = true")
    log_t = root.table("logging")
    logging_cfg = LoggingConfig(
        level=log_t.choice("level", ("debug", "info", "warning", "error"), "info"),
        format=log_t.choice("format", ("json", "text"), "json"),  # type: ignore[arg-type]
    )
    log_t.done()
    root.done()
    _check_overlaps(routes, root)
    if ops.enabled and server.port and (ops.host, ops.port) == (server.host, server.port):
        root.fail("ops.port", "the ops listener must not share the mTLS listener's address")
    return GatewayConfig(
        file=file,
        revision=revision,
        server=server,
        tls=tls,
        ops=ops,
        audit=audit,
        upstreams=upstreams,
        routes=routes,
        zones=zones,
        issuers=issuers,
        claim_maps=claim_maps,
        assertion=assertion,
        forward_auth=forward_auth,
        store=store,
        devices=devices,
        posture=posture,
        risk=risk,
        sessions=sessions,
        mfa=mfa,
        webauthn=webauthn,
        logging=logging_cfg,
        oidc=oidc,
        keys=keys,
        portal=portal,
        signals=signals,
        revocation=revocation,
    )


def _server(t: Table) -> ServerConfig:
    cfg = ServerConfig(
        host=t.text("host", "127.0.0.1"),
        port=t.integer("port", 8443, min=0, max=65535),
        client_cert=t.choice("client_cert", ("required", "optional"), "required"),  # type: ignore[arg-type]
        handshake_timeout=t.duration("handshake_timeout", 10.0, min=0.1),
        header_timeout=t.duration("header_timeout", 10.0, min=0.1),
        idle_timeout=t.duration("idle_timeout", 60.0, min=0.1),
        max_connections=t.integer("max_connections", 10_000, min=1),
        max_header_bytes=t.integer("max_header_bytes", 8190, min=256, max=65536),
        max_headers=t.integer("max_headers", 100, min=8, max=1000),
        client_max_size=t.integer("client_max_size", 10 * 1024 * 1024, min=0),
        shutdown_timeout=t.duration("shutdown_timeout", 15.0, min=0.0),
        trusted_proxies=t.cidrs("trusted_proxies"),
        spoofed_headers=t.choice("spoofed_headers", ("strip", "deny"), "strip"),  # type: ignore[arg-type]
        allow_encoded_slash=t.flag("allow_encoded_slash", False),
        public_url=t.text("public_url", ""),
        workers=t.integer("workers", 1, min=1, max=64),
        body_timeout=t.duration("body_timeout", 30.0, min=0.1),
        send_timeout=t.duration("send_timeout", 30.0, min=0.1),
        max_target_bytes=t.integer("max_target_bytes", 8190, min=256, max=65536),
        hosts=tuple(_host_names(t)),
        allow_trace=t.flag("allow_trace", False),
        websocket_ping_interval=t.duration("websocket_ping_interval", 20.0, min=0.1),
        websocket_max_message=t.integer(
            "websocket_max_message", 4 * 1024 * 1024, min=1024, max=1 << 30
        ),
        invalid_credentials_limit=t.integer("invalid_credentials_limit", 30, min=0),
        invalid_credentials_window=t.duration("invalid_credentials_window", 60.0, min=1.0),
        hsts_max_age=t.integer("hsts_max_age", 31_536_000, min=0),
        hsts_include_subdomains=t.flag("hsts_include_subdomains", False),
        max_pending_handshakes=t.integer("max_pending_handshakes", 1024, min=1),
        max_pending_handshakes_per_source=t.integer("max_pending_handshakes_per_source", 64, min=1),
        min_ready_workers=t.integer("min_ready_workers", 1, min=1, max=64),
        memory_trim_interval=t.duration("memory_trim_interval", 30.0, min=0.0),
    )
    if cfg.min_ready_workers > cfg.workers and t.has("min_ready_workers"):
        t.fail("min_ready_workers", f"must be at most workers ({cfg.workers})")
    t.done()
    return cfg


def _host_names(t: Table) -> list[str]:
    """`server.hosts`: the Host names the data plane answers for (RFC 9110 §7.2)."""
    out = []
    for name in t.str_list("hosts", ()):
        host = name.strip().lower()
        if (
            not host
            or any(c in host for c in "/?#@ ")
            or (":" in host and not host.startswith("["))
        ):
            t.fail("hosts", f"{name!r} is not a host name (no scheme, port or path)")
        out.append(host)
    return out


def _tls(t: Table) -> TLSConfig:
    cert, key, ca = t.path("cert", required=True), t.path("key", required=True), None
    ca = t.path("client_ca", required=True)
    assert cert is not None and key is not None and ca is not None
    cfg = TLSConfig(
        cert=cert,
        key=key,
        client_ca=ca,
        crl=t.path("crl"),
        min_version=t.choice("min_version", ("TLSv1.2", "TLSv1.3"), "TLSv1.2"),  # type: ignore[arg-type]
        reload_interval=t.duration("reload_interval", 2.0, min=0.0),
    )
    t.done()
    return cfg


def _ops(t: Table) -> OpsConfig:
    cfg = OpsConfig(
        host=t.text("host", "127.0.0.1"),
        port=t.integer("port", 9100, min=0, max=65535),
        enabled=t.flag("enabled", True),
        admin_token_file=t.path("admin_token_file", must_exist=False),
    )
    t.done()
    return cfg


def _audit(t: Table, file: Path) -> AuditConfig:
    db = t.path("db", must_exist=False) or (file.parent / "../var/audit.db").resolve()
    checkpoint_key = t.path("checkpoint_key_file", must_exist=False)
    public_keys = t.path("checkpoint_public_keys", must_exist=False)
    if public_keys is None and checkpoint_key is not None:
        public_keys = checkpoint_key.with_name(checkpoint_key.name + ".pub")
    cfg = AuditConfig(
        db=db,
        jsonl=t.path("jsonl", must_exist=False),
        max_queue=t.integer("max_queue", 100_000, min=100),
        durability=t.choice("durability", ("memory", "journal", "fsync"), "journal"),  # type: ignore[arg-type]
        journal_dir=t.path("journal_dir", must_exist=False),
        mask_key_file=t.path("mask_key_file", must_exist=False),
        mask_key_env=t.text("mask_key_env", "ZTGW_AUDIT_MASK_KEY"),
        checkpoint_key_file=checkpoint_key,
        checkpoint_public_keys=public_keys,
        checkpoint_interval=t.duration("checkpoint_interval", 60.0, min=1.0, max=86400.0),
        upstream_events=t.choice("upstream_events", ("all", "failures"), "all"),  # type: ignore[arg-type]
    )
    t.done()
    return cfg


def _zones(t: Table) -> dict[str, tuple[Network, ...]]:
    zones = {name: t.cidrs(name) for name in list(t.data)}
    t.done()
    return zones


def _issuers(
    tables: dict[str, Table], claim_maps: dict[str, ClaimMapping]
) -> tuple[IssuerConfig, ...]:
    out = []
    implicit: list[str] = []
    for name, t in tables.items():
        c = t.table("claims")
        d = ClaimMapping()
        claim_maps[name] = ClaimMapping(
            user=c.text("user", d.user),
            email=c.text("email", d.email),
            groups=c.text("groups", d.groups),
            roles=c.text("roles", d.roles),
            scopes=c.text("scopes", d.scopes),
            require_email_verified=t.flag("require_email_verified", False),
            user_namespace=_namespace(t, implicit),
        )
        c.done()
        jwks_url = t.text("jwks_url")
        jwks_file = t.path("jwks_file")
        if (jwks_url is None) == (jwks_file is None):
            t.fail("jwks_url", "exactly one of jwks_url and jwks_file must be set")
        if jwks_url is not None and URL(jwks_url).scheme not in ("http", "https"):
            t.fail("jwks_url", "must be an http(s) URL")
        audiences = t.str_list("audiences")
        if not audiences:
            t.fail("audiences", "at least one audience is required")
        algorithms = t.str_list("algorithms", ("ES256",))
        try:
            issuer = IssuerConfig(
                name=name,
                issuer=t.text("issuer", required=True),
                audiences=audiences,
                algorithms=algorithms,
                jwks_url=jwks_url,
                jwks_file=jwks_file,
                jwks_ca_file=t.path("jwks_ca"),
                leeway=t.duration("leeway", 30.0, min=0.0, max=600.0),
                max_token_age=t.duration("max_token_age", None, min=1.0),
                refresh_interval=t.duration("refresh_interval", 60.0, min=1.0),
                jwks_max_age=t.duration("jwks_max_age", 3600.0, min=1.0),
                jwks_timeout=t.duration("jwks_timeout", 5.0, min=0.1),
            )
        except ValueError as exc:
            t.fail("algorithms", str(exc))
        t.done()
        out.append(issuer)
    return tuple(out)


_NAMESPACE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def _namespace(t: Table, implicit: list[str]) -> str:
    """An issuer's user namespace. Two issuers that could mint the same `sub` for different
    people must not both fall into the directory's names unnoticed: sharing it is stated."""
    value: str | None = t.text("user_namespace")
    if value is None:
        if implicit:
            t.fail(
                "user_namespace",
                f"issuers {implicit[0]!r} and this one would share user names: give each its "
                'own user_namespace, or user_namespace = "" to each that speaks for the '
                "directory's users",
            )
        implicit.append(t.where.rpartition(".")[2])
        return ""
    if value and not _NAMESPACE.match(value):
        t.fail("user_namespace", "lower-case letters, digits, '.', '-' and '_'")
    return value


def _upstream(name: str, t: Table) -> UpstreamConfig:
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


def _time_window(text: str, tz: ZoneInfo, t: Table, key: str) -> TimeWindow:
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


def _time_window_parse(text: str, tz: ZoneInfo) -> TimeWindow:
    """Parse a window outside configuration loading (per-user working hours from the store)."""
    table = Table({}, Path("<user profile>"))
    try:
        return _time_window(text, tz, table, "working_hours")
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
        _time_window(w, tz, t, f"time_windows[{i}]")
        for i, w in enumerate(t.str_list("time_windows"))
    )
    claims = _claim_values(t.table("claims"))
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


def _route(
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


def _assertion(t: Table) -> AssertionConfig:
    cfg = AssertionConfig(
        key=t.path("key"),
        ttl=int(t.duration("ttl", 60, min=5, max=3600)),
        issuer=t.text("issuer", ""),
        also_publish=_key_files(t, "also_publish"),
    )
    t.done()
    return cfg


def _key_files(t: Table, name: str) -> tuple[Path, ...]:
    from .forward.assertion import load_public_keys

    paths = []
    for i, value in enumerate(t.str_list(name)):
        path = (t.file.parent / value).resolve()
        if not path.exists():
            t.fail(f"{name}[{i}]", f"file not found: {path}")
        try:
            load_public_keys([path])
        except ValueError as exc:
            t.fail(f"{name}[{i}]", str(exc))
        paths.append(path)
    return tuple(paths)


def _forward_auth(t: Table) -> ForwardAuthConfig:
    cfg = ForwardAuthConfig(
        enabled=t.flag("enabled", False),
        trusted_proxies=t.cidrs("trusted_proxies"),
        edge=t.choice("edge", EDGE_PROXIES, "nginx"),  # type: ignore[arg-type]
        cert_header=t.text("cert_header", ""),
    )
    if cfg.enabled and not cfg.trusted_proxies:
        t.fail("trusted_proxies", "forward-auth needs the front proxy's addresses")
    if cfg.cert_header:
        problem = cert_header_problem(cfg.edge, cfg.cert_header)
        if problem:
            t.fail("cert_header", problem)
    t.done()
    return cfg


def _check_overlaps(routes: tuple[RouteConfig, ...], root: Table) -> None:
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


def _store(t: Table, file: Path) -> StoreConfig:
    url = t.text("url", "sqlite:///../var/state.db")
    if not url.startswith(("sqlite:///", "redis://", "rediss://", "unix://")):
        t.fail("url", "expected sqlite:///PATH or redis://HOST:PORT/DB")
    cfg = StoreConfig(url=url, base=file.parent)
    t.done()
    return cfg


def _devices(t: Table) -> DevicesConfig:
    cfg = DevicesConfig(
        auto_approve=t.flag("auto_approve", False),
        owner_mismatch=t.choice("owner_mismatch", ("deny", "risk"), "deny"),  # type: ignore[arg-type]
        default_min_trust=t.choice("default_min_trust", TRUST_LEVELS, "approved"),  # type: ignore[arg-type]
    )
    t.done()
    return cfg


def _posture(t: Table) -> PosturePolicy:
    d = PosturePolicy()
    checks = t.str_list("required_checks", d.required_checks)
    allowed = {
        "disk_encrypted",
        "firewall",
        "antivirus",
        "screen_lock",
        "mdm_enrolled",
        "not_jailbroken",
    }
    for i, c in enumerate(checks):
        if c not in allowed:
            t.fail(
                f"required_checks[{i}]",
                f"unknown check {c!r} (one of {', '.join(sorted(allowed))})",
            )
    versions = t.table("min_os_version")
    pairs = []
    for platform in list(versions.data):
        if platform not in PLATFORMS:
            versions.fail(platform, f"unknown platform (one of {', '.join(PLATFORMS)})")
        value = versions.text(platform)
        try:
            parse_version(value)
        except ValueError:
            versions.fail(platform, f"not a version: {value!r}")
        pairs.append((platform, value))
    versions.done()
    platforms = t.str_list("platforms", PLATFORMS)
    for i, p in enumerate(platforms):
        if p not in PLATFORMS:
            t.fail(f"platforms[{i}]", f"unknown platform {p!r}")
    max_patch = t.integer("max_patch_age_days", 30, min=0)
    cfg = PosturePolicy(
        required_checks=checks,
        min_os_version=tuple(pairs),
        max_patch_age_days=max_patch,
        max_report_age=t.duration("max_report_age", 86400.0, min=1.0),
        platforms=platforms,
    )
    t.done()
    return cfg


RISK_SIGNALS = tuple(f.name for f in fields(RiskWeights))


def _risk(t: Table, zones: dict[str, tuple[Network, ...]]) -> RiskConfig:
    trusted = t.str_list("trusted_zones")
    blocked = t.str_list("blocked_zones")
    for key, names in (("trusted_zones", trusted), ("blocked_zones", blocked)):
        for i, z in enumerate(names):
            if z not in zones:
                t.fail(f"{key}[{i}]", f"unknown zone {z!r} (define it under [zones])")
    wt = t.table("weights")
    values = {}
    for name in list(wt.data):
        if name not in RISK_SIGNALS:
            wt.fail(name, f"unknown signal (one of {', '.join(RISK_SIGNALS)})")
        values[name] = wt.number(name, 0.0, min=0.0, max=1.0)
    wt.done()
    try:
        weights = RiskWeights.from_mapping(values)
    except ValueError as exc:
        t.fail("weights", str(exc))
    tz = t.text("default_timezone", "UTC")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        t.fail("default_timezone", f"unknown time zone {tz!r}")
    hours = t.text("default_working_hours", "")
    if hours:
        _time_window(hours, ZoneInfo(tz), t, "default_working_hours")
    blocklist = t.path("blocklist")
    if blocklist is not None:
        from .risk.scoring import read_blocklist

        try:
            read_blocklist(blocklist)
        except BlocklistError as exc:
            t.fail("blocklist", str(exc))
    cfg = RiskConfig(
        trusted_zones=trusted,
        blocked_zones=blocked,
        blocklist=blocklist,
        geoip_db=t.path("geoip_db", must_exist=False),
        max_travel_speed_kmh=t.number("max_travel_speed_kmh", 900.0, min=1.0),
        failed_attempts_window=t.duration("failed_attempts_window", 600.0, min=1.0),
        failed_attempts_threshold=t.integer("failed_attempts_threshold", 5, min=1),
        large_request_bytes=t.integer("large_request_bytes", 10 * 1024 * 1024, min=1),
        default_timezone=tz,
        default_working_hours=hours,
        weights=weights,
    )
    t.done()
    return cfg


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


def _webauthn(t: Table, server: ServerConfig) -> WebAuthnConfig:
    public_parts = urlsplit(server.public_url)
    public = (
        f"{public_parts.scheme}://{public_parts.netloc}".lower()
        if public_parts.scheme and public_parts.netloc
        else None
    )
    public_host = public_parts.hostname or ""
    # An address cannot be an RP ID: without a name, WebAuthn stays off unless configured.
    derived = "" if not public_host or _looks_like_address(public_host) else public_host
    rp_id = t.text("rp_id", derived) or ""
    if rp_id and (
        rp_id != rp_id.lower() or ":" in rp_id or "/" in rp_id or _looks_like_address(rp_id)
    ):
        t.fail("rp_id", "a lower-case domain name (browsers refuse IP addresses and ports)")
    # The public origin is the default only where it can use the RP ID.
    public_fits = public is not None and _within(public_host, rp_id)
    origins = t.str_list("origins", (public,) if public and public_fits else ())
    serialised = []
    for i, origin in enumerate(origins):
        parts = urlsplit(origin)
        host = parts.hostname or ""
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (
            parts.scheme != "https" or not host or port == -1 or parts.path not in ("", "/")
            or parts.query or parts.fragment or parts.username or parts.password
        ):  # fmt: skip
            t.fail(f"origins[{i}]", "an origin is https://host[:port], nothing more")
        # RFC 6454 §6.2: the default port is not serialised (what clientDataJSON carries).
        serialised.append(f"https://{host}" + (f":{port}" if port and port != 443 else ""))
        # WebAuthn §5.1.4.1 / HTML "is a registrable domain suffix": the RP ID must be the
        # origin's host or a parent domain of it, or browsers refuse every ceremony.
        if rp_id and not _within(host, rp_id):
            t.fail(f"origins[{i}]", f"{host!r} is not {rp_id!r} or a subdomain of it (rp_id)")
    if rp_id and not origins:
        t.fail("origins", "name the https origins people reach the gateway at")
    cfg = WebAuthnConfig(
        rp_id=rp_id,
        rp_name=t.text("rp_name", "ztgateway") or "ztgateway",
        origins=tuple(serialised),
        challenge_ttl=t.duration("challenge_ttl", 300.0, min=30.0, max=3600.0),
        user_verification=t.choice("user_verification", USER_VERIFICATION, "preferred"),  # type: ignore[arg-type]
    )
    t.done()
    return cfg


def _within(host: str, rp_id: str) -> bool:
    return host == rp_id or host.endswith("." + rp_id)


def _looks_like_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _sessions(t: Table) -> SessionsConfig:
    cfg = SessionsConfig(
        cookie_name=t.text("cookie_name", "__Host-ztgw-session"),
        idle_timeout=t.duration("idle_timeout", 1800.0, min=1.0),
        absolute_timeout=t.duration("absolute_timeout", 43200.0, min=1.0),
        anomaly_step_up=t.number("anomaly_step_up", 0.7, min=0.0, max=1.0),
        anomaly_terminate=t.number("anomaly_terminate", 0.9, min=0.0, max=1.0),
        anomaly_half_life=t.duration("anomaly_half_life", 600.0, min=1.0),
        burst_requests=t.integer("burst_requests", 50, min=1),
        burst_window=t.duration("burst_window", 10.0, min=0.1),
        lock_on_terminate=t.duration("lock_on_terminate", 0.0, min=0.0),
        step_up_validity=t.duration("step_up_validity", 900.0, min=1.0),
        persistent_cookie=t.flag("persistent_cookie", False),
        max_per_device=t.integer("max_per_device", 5, min=1, max=100),
    )
    if "browser_sessions" in t.data:
        # Issue 18 (M6): a cookie session per cookie-less request let any client fill memory;
        # sessions now start only at a sign-in or a step-up.
        t.fail("browser_sessions", "was removed: sessions start at sign-in (docs/security.md)")
    if not cfg.cookie_name.startswith("__Host-"):
        t.fail("cookie_name", "must start with __Host- (RFC 6265bis: Secure, no Domain, Path=/)")
    if cfg.anomaly_step_up > cfg.anomaly_terminate:
        t.fail("anomaly_step_up", "must not exceed anomaly_terminate")
    t.done()
    return cfg


def _mfa(t: Table) -> MFAConfig:
    cfg = MFAConfig(
        key_file=t.path("key_file", must_exist=False),
        key_env=t.text("key_env", "ZTGW_MFA_KEY"),
        issuer=t.text("issuer", "ztgateway"),
        max_failures=t.integer("max_failures", 5, min=1),
        find_time=t.duration("find_time", 300.0, min=1.0),
        ban_time=t.duration("ban_time", 900.0, min=1.0),
        window=t.integer("window", 1, min=0, max=3),
        enrolment_ttl=t.duration("enrolment_ttl", 900.0, min=60.0, max=86400.0),
    )
    t.done()
    return cfg


def _claim_values(t: Table) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`claim = "value"` or `claim = ["a", "b"]` for every claim the table names."""
    out = []
    for name in list(t.data):
        value = t.data[name]
        values = (value,) if isinstance(value, str) else value
        if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
            t.fail(name, "must be a string or a list of strings")
        t._read.add(name)
        out.append((name, tuple(values)))
    t.done()
    return tuple(out)


_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# Sub-tables of the single-provider form: not provider names in the several-providers form.
_OIDC_RESERVED = frozenset({"claims", "required_claims"})
LEGACY_CALLBACK_PATH = "/.ztgw/oidc/callback"


def _oidc(t: Table, server: ServerConfig, issuer_namespaces: dict[str, str]) -> OIDCConfig:
    """`[oidc]` with `issuer` is the single-provider form (kept: one provider, its name from
    `name`, its users the directory's); otherwise each `[oidc.NAME]` table is a provider."""
    if not t.data:
        t.done()
        return OIDCConfig()
    post_logout_path = t.text("post_logout_path", "/.ztgw/signed-out")
    # Every provider's logout tokens (OIDC Back-Channel Logout 1.0; signals/backchannel.py).
    backchannel = t.flag("backchannel_logout", True)
    if t.has("issuer"):
        provider = _oidc_provider(t, t.text("name", "oidc"), server, legacy=True)
        t.done()
        _check_providers(t, [provider], set(), issuer_namespaces)
        return OIDCConfig(
            providers=(provider,),
            post_logout_path=post_logout_path,
            backchannel_logout=backchannel,
        )
    providers: list[OIDCProviderConfig] = []
    defaulted: set[str] = set()
    for name in list(t.data):
        if name in ("post_logout_path", "backchannel_logout"):
            continue
        if not isinstance(t.data[name], dict):
            t.fail(
                name,
                "unknown key: set `issuer` (and the rest) for one provider, or give each "
                "provider its own [oidc.NAME] table",
            )
        if name in _OIDC_RESERVED or not _PROVIDER_NAME.match(name):
            t.fail(
                name,
                "a provider's name is lower-case letters, digits, '-' and '_' (at most 32; "
                f"not {', '.join(sorted(_OIDC_RESERVED))}): it is in URLs and metrics labels",
            )
        pt = t.table(name)
        if not pt.has("user_namespace"):
            defaulted.add(name)
        providers.append(_oidc_provider(pt, name, server, legacy=False))
        pt.done()
    t.done()
    if not providers:
        t.fail("", "no provider: add an [oidc.NAME] table (or remove [oidc])")
    _check_providers(t, providers, defaulted, issuer_namespaces)
    return OIDCConfig(
        providers=tuple(providers),
        post_logout_path=post_logout_path,
        backchannel_logout=backchannel,
    )


def _check_providers(
    t: Table,
    providers: list[OIDCProviderConfig],
    defaulted: set[str],
    issuer_namespaces: dict[str, str],
) -> None:
    """Two providers never share users, nor callbacks (RFC 9700 §4.4.2: a distinct redirect
    URI per provider is the defence against mix-up attacks)."""
    namespaces: dict[str, str] = {}
    paths: dict[str, str] = {}
    for p in providers:
        if not p.callback_path.startswith(LEGACY_CALLBACK_PATH):
            t.fail(
                f"{p.name}.redirect_uri",
                f"the gateway answers callbacks under {LEGACY_CALLBACK_PATH} only, not at "
                f"{p.callback_path!r}",
            )
        other = namespaces.get(p.user_namespace)
        if other is not None:
            what = (
                "the directory's users"
                if not p.user_namespace
                else f"user_namespace {p.user_namespace!r}"
            )
            t.fail(
                f"{p.name}.user_namespace",
                f"providers {other!r} and {p.name!r} would share {what}: at most one provider "
                'speaks for the directory (user_namespace = ""), the others need their own',
            )
        namespaces[p.user_namespace] = p.name
        issuer = issuer_namespaces.get(p.user_namespace) if p.user_namespace else None
        if issuer is not None and p.name in defaulted:
            # An issuer's namespace is shared only when the configuration says so.
            t.fail(
                f"{p.name}.user_namespace",
                f"issuer {issuer!r} has user_namespace {p.user_namespace!r} too: set "
                f'user_namespace = "{p.user_namespace}" here if they are the same people, '
                "or another name",
            )
        other = paths.get(p.callback_path)
        if other is not None:
            t.fail(
                f"{p.name}.redirect_uri",
                f"the same callback path as provider {other!r}: each provider needs its own "
                "redirect_uri (RFC 9700 §4.4.2)",
            )
        paths[p.callback_path] = p.name


def _oidc_provider(
    t: Table, name: str, server: ServerConfig, *, legacy: bool
) -> OIDCProviderConfig:
    secret = t.text("client_secret")
    secret_file = t.path("client_secret_file")
    secret_env = t.text("client_secret_env")
    if sum(x is not None for x in (secret, secret_file, secret_env)) != 1:
        t.fail(
            "client_secret",
            "set exactly one of client_secret, client_secret_file, client_secret_env",
        )
    if secret_file is not None:
        secret = secret_file.read_text().strip()
    elif secret_env is not None:
        import os

        secret = os.environ.get(secret_env, "")
        if not secret:
            t.fail("client_secret_env", f"environment variable {secret_env} is not set")
    public = (
        server.public_url.rstrip("/")
        if server.public_url
        else f"https://{server.host}:{server.port}"
    )
    claims_t = t.table("claims")
    claims = OIDCClaims(
        user=claims_t.text("user", "sub"),
        email=claims_t.text("email", "email"),
        groups=claims_t.text("groups", "groups"),
    )
    claims_t.done()
    # The single-provider form keeps its callback and its users (the directory's); each named
    # provider has a callback of its own and, unless told otherwise, a name space of its own.
    callback = LEGACY_CALLBACK_PATH if legacy else f"{LEGACY_CALLBACK_PATH}/{name}"
    namespace: str = t.text("user_namespace", "" if legacy else name)
    if namespace and not _NAMESPACE.match(namespace):
        t.fail("user_namespace", "lower-case letters, digits, '.', '-' and '_'")
    display: str = t.text("display_name", "")
    if len(display) > 64 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in display):
        t.fail("display_name", "at most 64 printable characters")
    try:
        return OIDCProviderConfig(
            name=name,
            issuer=t.text("issuer", required=True),
            client_id=t.text("client_id", required=True),
            client_secret=str(secret),
            redirect_uri=t.text("redirect_uri", public + callback),
            scopes=t.str_list("scopes", ("openid", "email", "profile")),
            ca_file=t.path("ca_file"),
            claims=claims,
            leeway=t.duration("leeway", 30.0, min=0.0),
            max_auth_age=t.duration("max_auth_age", 600.0, min=10.0),
            max_pending_per_device=t.integer("max_pending_per_device", 5, min=1, max=100),
            required_claims=_claim_values(t.table("required_claims")),
            display_name=display,
            user_namespace=namespace,
            accept_unlabelled=legacy,
        )
    except ValueError as exc:
        t.fail("", str(exc))
