"""`[sessions]`, `[mfa]` and `[webauthn]`: the browser session and the second factors that
step it up (the relying party comes from `[server] public_url`, never from a request)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from ..configreader import Table
from .listener import ServerConfig

USER_VERIFICATION = ("required", "preferred", "discouraged")


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


def parse_webauthn(t: Table, server: ServerConfig) -> WebAuthnConfig:
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


def parse_sessions(t: Table) -> SessionsConfig:
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


def parse_mfa(t: Table) -> MFAConfig:
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
