"""The whole file: reads the TOML, parses every section (the sibling modules, one concern
each), checks what spans sections (logins need a provider, a WebAuthn-only step-up a relying party,
OCSP on a route `[revocation] ocsp`, routes must not overlap, the ops listener apart from the mTLS
one) and returns one frozen `GatewayConfig`."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..configreader import ConfigError, Table
from ..credentials.jwt import IssuerConfig
from ..pages.branding import PortalConfig, parse_portal
from ..revocation.config import RevocationConfig, parse_revocation
from ..risk.posture import PosturePolicy
from ..signals.config import TransmitterConfig, parse_transmitters
from .identity import (
    AssertionConfig,
    ClaimMapping,
    KeysConfig,
    OIDCConfig,
    parse_assertion,
    parse_issuers,
    parse_oidc,
)
from .listener import (
    ForwardAuthConfig,
    Network,
    OpsConfig,
    ServerConfig,
    TLSConfig,
    parse_forward_auth,
    parse_ops,
    parse_server,
    parse_tls,
)
from .risk import DevicesConfig, RiskConfig, parse_devices, parse_posture, parse_risk, parse_zones
from .routes import RouteConfig, UpstreamConfig, check_overlaps, parse_route, parse_upstream
from .sessions import (
    MFAConfig,
    SessionsConfig,
    WebAuthnConfig,
    parse_mfa,
    parse_sessions,
    parse_webauthn,
)
from .state import AuditConfig, StoreConfig, parse_audit, parse_store


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
    server = parse_server(root.table("server"))
    tls = parse_tls(root.table("tls", required=True))
    ops = parse_ops(root.table("ops"))
    audit = parse_audit(root.table("audit"), file)
    zones = parse_zones(root.table("zones"))
    claim_maps: dict[str, ClaimMapping] = {}
    issuers = parse_issuers(root.named_tables("issuers"), claim_maps)
    upstreams = {
        name: parse_upstream(name, t) for name, t in root.named_tables("upstreams").items()
    }
    issuer_names = {i.name for i in issuers}
    oidc = parse_oidc(
        root.table("oidc"),
        server,
        {m.user_namespace: name for name, m in claim_maps.items() if m.user_namespace},
    )
    routes = tuple(
        parse_route(t, upstreams, zones, issuer_names, server, oidc.names)
        for t in root.tables("routes")
    )
    if not routes:
        root.fail("routes", "at least one [[routes]] table is required")
    assertion = parse_assertion(root.table("assertion"))
    forward_auth = parse_forward_auth(root.table("forward_auth"))
    store = parse_store(root.table("store"), file)
    devices = parse_devices(root.table("devices"))
    posture = parse_posture(root.table("posture"))
    risk = parse_risk(root.table("risk"), zones)
    sessions = parse_sessions(root.table("sessions"))
    mfa = parse_mfa(root.table("mfa"))
    portal = parse_portal(root.table("portal"))
    webauthn = parse_webauthn(root.table("webauthn"), server)
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
    check_overlaps(routes, root)
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
