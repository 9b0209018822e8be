"""TOML configuration -> frozen dataclasses, validated in full at start-up and on reload.

A configuration that loads is one the gateway can serve safely: unknown keys, wrong types,
missing files, overlapping routes, unknown zones and contradictions are all `ConfigError`s that
name the file and the key path. `ztgateway check-config` runs exactly this loader.

One module a concern: `listener` ([server], [tls], [ops], [forward_auth]), `identity` ([issuers],
[oidc], [assertion], [keys]), `routes` ([upstreams], [[routes]], time windows and the overlap
check), `sessions` ([sessions], [mfa], [webauthn]), `risk` ([zones], [devices], [posture],
[risk]), `state` ([audit], [store]), `loader` (the file as a whole), and `reloading` (what a
reload can apply to a running gateway). The names below are the package's interface; the
section readers (`configreader.Table`) are shared with the sections other packages own
([portal], [signals], [revocation]).
"""

from __future__ import annotations

from .identity import LEGACY_CALLBACK_PATH, AssertionConfig, ClaimMapping, KeysConfig, OIDCConfig
from .listener import (
    EDGE_PROXIES,
    CertMode,
    EdgeProxy,
    ForwardAuthConfig,
    Network,
    OpsConfig,
    ServerConfig,
    TLSConfig,
)
from .loader import GatewayConfig, LoggingConfig, load_config, parse_config
from .risk import RISK_SIGNALS, DevicesConfig, RiskConfig
from .routes import (
    HTTP_METHODS,
    IP_DRIFT_MODES,
    STEP_UP_FACTORS,
    TRUST_LEVELS,
    CrossSite,
    IdentityHeaders,
    RateLimit,
    RouteConfig,
    RouteMode,
    RoutePolicy,
    RouteRisk,
    RouteSession,
    StepUpFactor,
    TimeWindow,
    TrustLevel,
    UpstreamConfig,
    parse_time_window,
)
from .sessions import USER_VERIFICATION, MFAConfig, SessionsConfig, WebAuthnConfig
from .state import AuditConfig, StoreConfig

__all__ = [
    "EDGE_PROXIES",
    "HTTP_METHODS",
    "IP_DRIFT_MODES",
    "LEGACY_CALLBACK_PATH",
    "RISK_SIGNALS",
    "STEP_UP_FACTORS",
    "TRUST_LEVELS",
    "USER_VERIFICATION",
    "AssertionConfig",
    "AuditConfig",
    "CertMode",
    "ClaimMapping",
    "CrossSite",
    "DevicesConfig",
    "EdgeProxy",
    "ForwardAuthConfig",
    "GatewayConfig",
    "IdentityHeaders",
    "KeysConfig",
    "LoggingConfig",
    "MFAConfig",
    "Network",
    "OIDCConfig",
    "OpsConfig",
    "RateLimit",
    "RiskConfig",
    "RouteConfig",
    "RouteMode",
    "RoutePolicy",
    "RouteRisk",
    "RouteSession",
    "ServerConfig",
    "SessionsConfig",
    "StepUpFactor",
    "StoreConfig",
    "TLSConfig",
    "TimeWindow",
    "TrustLevel",
    "UpstreamConfig",
    "WebAuthnConfig",
    "load_config",
    "parse_config",
    "parse_time_window",
]
