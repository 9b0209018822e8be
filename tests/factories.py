"""Factories for the pipeline's types: valid and allowed by default, any part overridable.

`context()` is a request alice makes from her laptop (a valid client certificate, on loopback,
at `NOW`); `config()` a configuration with one route that lets her in; `runtime()` the snapshot
the stages are built from, over an injected store and clock; `device()`, `session()` and
`user()` what the store holds about her. Run through `pipeline()`, the defaults are an ALLOW
(tests/unit/stages/test_factories.py proves it), so a test changes exactly the part it is
about, and what it sees refused is refused for that part.

No TOML and no PKI on disk: the configuration is the parsed form of a dict (the one validated
constructor, `config.parse_config`) and the certificate is the parsed form `CertInfo`; a token
issuer (`Issuer`) makes its key in memory and writes only its public JWK Set. The
store is a real SQLite file (`tests/unit/stages/conftest.py`), read through the same cache
the gateway reads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support import deep_merge
from ztgateway.clock import Clock, ManualClock
from ztgateway.config import GatewayConfig, parse_config
from ztgateway.context import Identity, RequestContext
from ztgateway.credentials.jwt import TokenVerifier, cert_thumbprint_s256
from ztgateway.decision import Finding, Reason, Verdict
from ztgateway.dev.tokens import public_jwks
from ztgateway.edge.tls import CertInfo, RevocationList
from ztgateway.metrics import Metrics
from ztgateway.pipeline import Pipeline, default_stages
from ztgateway.risk.posture import BOOL_CHECKS
from ztgateway.routes import RouteTable
from ztgateway.runtime import Runtime
from ztgateway.sessions import cookie_session_id
from ztgateway.store.base import Device, PostureRecord, Session, Store, UserRecord

NOW = datetime(2027, 3, 10, 10, 0, tzinfo=UTC).timestamp()
"""A Wednesday, 10:00 UTC: inside working hours, so no time-of-day signal fires by default."""
CLIENT_IP = "127.0.0.1"
USER = "alice"
DEVICE_ID = "alice-laptop"
COOKIE = "alice-session-cookie-value"
"""The browser's session cookie; `session()` is stored under its hash."""

_HERE = Path(__file__).resolve()

BASE_CONFIG: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 0},
    # parse_config only checks that the TLS files exist; no stage reads them.
    "tls": {"cert": str(_HERE), "key": str(_HERE), "client_ca": str(_HERE)},
    "zones": {"loopback": ["127.0.0.0/8"], "corp": ["10.0.0.0/8"]},
    "risk": {"trusted_zones": ["loopback"]},
    "upstreams": {"demo": {"url": "http://127.0.0.1:9"}},
    "routes": [{"name": "app", "prefix": "/", "upstream": "demo"}],
}


def config_data(overrides: dict[str, Any] | None = None, **route: Any) -> dict[str, Any]:
    """The configuration as a dict: BASE_CONFIG, `overrides` merged in, and `route` merged
    into the one route (`policy={...}`, `session={...}`, `risk={...}`, ...)."""
    data = deep_merge(copy.deepcopy(BASE_CONFIG), overrides or {})
    if route:
        data["routes"] = [deep_merge(dict(data["routes"][0]), route), *data["routes"][1:]]
    return data


def config(overrides: dict[str, Any] | None = None, **route: Any) -> GatewayConfig:
    return parse_config(config_data(overrides, **route), _HERE, revision="factories")


def cert(**changes: Any) -> CertInfo:
    """alice's laptop's client certificate: valid an hour before and a year after NOW."""
    values: dict[str, Any] = {
        "der": b"alice-laptop-certificate",
        "subject": "CN=alice,O=ztgateway dev",
        "common_name": USER,
        "user": USER,
        "email": "alice@example.com",
        "device_id": DEVICE_ID,
        "sans": ("email:alice@example.com", f"uri:urn:ztgw:device:{DEVICE_ID}"),
        "serial": 0xA11CE,
        "fingerprint_sha256": "f1" * 32,
        "issuer": "CN=ztgateway dev CA",
        "not_before": NOW - 3600,
        "not_after": NOW + 365 * 86400,
        "client_auth": True,
        "spki_sha256": "5b" * 32,
    }
    values.update(changes)
    return CertInfo(**values)


_alice_cert = cert


class _Alice:
    """`context()`'s default certificate: alice's laptop's (`cert=None`: none at all)."""


def device(for_cert: CertInfo | None = None, **changes: Any) -> Device:
    """The registry entry of that certificate's device: approved, pinned to its key."""
    c = for_cert or cert()
    values: dict[str, Any] = {
        "device_id": c.device_id,
        "fingerprint": c.fingerprint_sha256,
        "subject": c.subject,
        "owner": c.user,
        "state": "approved",
        "first_seen": NOW - 86400,
        "last_seen": NOW - 60,
        "last_ip": CLIENT_IP,
        "spki": c.spki_sha256,
    }
    values.update(changes)
    return Device(**values)


def session(cookie: str = COOKIE, **changes: Any) -> Session:
    """alice's browser session on her laptop, started an hour ago from where she is now."""
    values: dict[str, Any] = {
        "session_id": cookie_session_id(cookie),
        "kind": "cookie",
        "user": USER,
        "device_id": DEVICE_ID,
        "start_ip": CLIENT_IP,
        "last_ip": CLIENT_IP,
        "user_agent": "Mozilla/5.0 (factories)",
        "created": NOW - 3600,
        "last_seen": NOW - 60,
        "expires_at": NOW + 8 * 3600,
        "anomaly_at": NOW - 60,
    }
    values.update(changes)
    return Session(**values)


def user(**changes: Any) -> UserRecord:
    """alice's account: she knows her laptop already (no new-device signal)."""
    values: dict[str, Any] = {"user": USER, "known_devices": (DEVICE_ID,)}
    values.update(changes)
    return UserRecord(**values)


def posture(**report: Any) -> PostureRecord:
    """A compliant posture report from alice's laptop, collected a minute before NOW;
    `report` changes its fields (`firewall=False`, `collected_at=...`)."""
    body: dict[str, Any] = {
        "platform": "linux",
        "os_version": "6.8",
        "last_patch": datetime.fromtimestamp(NOW - 2 * 86400, UTC).date().isoformat(),
        **dict.fromkeys(BOOL_CHECKS, True),
        "jailbroken": False,
        "collected_at": NOW - 60,
    }
    body.update(report)
    return PostureRecord(
        device_id=DEVICE_ID,
        report=body,
        received_at=NOW - 60,
        collected_at=body["collected_at"],
        signed=True,
        digest="d" * 64,
    )


def clock(at: float = NOW) -> ManualClock:
    return ManualClock(at)


def runtime(
    cfg: GatewayConfig | None = None,
    *,
    store: Store | None = None,
    tokens: TokenVerifier | None = None,
    revoked: frozenset[int] = frozenset(),
    dry_run: bool = False,
    clock: Clock | None = None,
    overrides: dict[str, Any] | None = None,
    **route: Any,
) -> Runtime:
    """The snapshot the stages are built from (a fresh Metrics registry each time), of `cfg`
    or else of `config(overrides, **route)`."""
    cfg = cfg or config(overrides, **route)
    revocations = RevocationList(revoked_serials=revoked) if revoked else RevocationList()
    return Runtime(
        config=cfg,
        routes=RouteTable(cfg.routes),
        metrics=Metrics(),
        revocations=lambda: revocations,
        tokens=tokens,
        store=store,
        dry_run=dry_run,
        clock=clock or ManualClock(NOW),
    )


def pipeline(rt: Runtime) -> Pipeline:
    return Pipeline(default_stages(rt))


def context(
    *,
    method: str = "GET",
    path: str = "/",
    host: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    client_ip: str = CLIENT_IP,
    cert: CertInfo | type[_Alice] | None = _Alice,
    now: float = NOW,
    **fields: Any,
) -> RequestContext:
    """alice's request from her laptop (pass `cert=None` for one without a certificate);
    `fields` set the context's own fields afterwards (route, identity, risk_score, ...)."""
    ctx = RequestContext.synthetic(
        method=method,
        path=path,
        host=host,
        headers=headers,
        client_ip=client_ip,
        cert=_alice_cert() if cert is _Alice else cert,  # type: ignore[arg-type]
        now=now,
        clock=ManualClock(now),
    )
    for name, value in fields.items():
        setattr(ctx, name, value)
    return ctx


def routed(rt: Runtime, **kw: Any) -> RequestContext:
    """A context its route is already matched for (what the request stage leaves behind)."""
    ctx = context(**kw)
    assert ctx.path is not None
    ctx.route = rt.routes.match(ctx.host, ctx.path)
    assert ctx.route is not None, f"no route for {ctx.path}"
    return ctx


def identified(rt: Runtime, **kw: Any) -> RequestContext:
    """A routed context its certificate has identified (what the identity stage leaves)."""
    ctx = routed(rt, **kw)
    if "identity" not in kw:
        ctx.identity = cert_identity(ctx.cert)
    return ctx


def verdicts(findings: Sequence[Finding]) -> list[tuple[Reason, Verdict | None]]:
    """What a stage found, as (reason, verdict) pairs: what its tests compare."""
    return [(f.reason, f.verdict) for f in findings]


def cert_identity(c: CertInfo | None = None) -> Identity:
    """What the identity stage makes of a certificate alone."""
    c = c or cert()
    return Identity(user=c.user, source="cert", email=c.email, device_id=c.device_id)


@dataclasses.dataclass
class Issuer:
    """A token issuer of our own: an ES256 key made in memory, its JWK Set in `folder` (the
    verifier reads a `jwks_file`), and `token()` to sign claims with it at NOW."""

    folder: Path
    name: str = "corp"
    issuer: str = "https://idp.example"
    audience: str = "ztgateway"
    key: ec.EllipticCurvePrivateKey = dataclasses.field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def __post_init__(self) -> None:
        self.jwks = self.folder / f"{self.name}-jwks.json"
        self.jwks.write_text(json.dumps(public_jwks(self.key.public_key(), kid="k1")))

    def config(self) -> dict[str, Any]:
        """The `[issuers]` table to merge into a configuration."""
        return {
            "issuers": {
                self.name: {
                    "issuer": self.issuer,
                    "audiences": [self.audience],
                    "algorithms": ["ES256"],
                    "jwks_file": str(self.jwks),
                }
            }
        }

    def token(self, *, bound_to: CertInfo | None = None, **claims: Any) -> str:
        body: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": USER,
            "iat": int(NOW) - 10,
            "exp": int(NOW) + 300,
        }
        if bound_to is not None:
            body["cnf"] = {"x5t#S256": cert_thumbprint_s256(bound_to.der)}
        body.update(claims)
        return pyjwt.encode(body, self.key, algorithm="ES256", headers={"kid": "k1"})

    async def verifier(self, cfg: GatewayConfig) -> TokenVerifier:
        """The configuration's verifier, its key files loaded, judging at NOW."""
        tokens = TokenVerifier(cfg.issuers, clock=ManualClock(NOW).time)
        await tokens.start()
        return tokens
