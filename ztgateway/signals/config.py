"""`[signals.NAME]`: the Shared Signals transmitters the gateway receives events from.

Each transmitter is validated here, at start-up and by `ztgateway check-config`, with errors that
name the file and the key (`signals.okta.poll_url: ...`).

    [signals.okta]
    issuer = "https://idp.example.com"            # the SETs' `iss` (RFC 8417 §2.2)
    jwks_url = "https://idp.example.com/ssf/jwks" # or jwks_file
    audience = "https://gw.example.com"            # the SETs' `aud`: this receiver
    algorithms = ["RS256", "ES256"]
    delivery = "push"                              # RFC 8935; or "poll" (RFC 8936)
    push_token_env = "ZTGW_SSF_PUSH_TOKEN"          # optional: Authorization: Bearer required
    max_silence = "1h"                             # alert when nothing arrived for this long
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..configreader import Table
from ..credentials.jwks import SUPPORTED_ALGORITHMS

DELIVERY_METHODS = ("push", "poll")
DEFAULT_ALGORITHMS = ("RS256", "ES256")


@dataclass(frozen=True, slots=True)
class TransmitterConfig:
    name: str
    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    jwks_url: str | None
    jwks_file: Path | None
    jwks_ca: Path | None
    delivery: str
    leeway: float = 30.0
    max_event_age: float = 86400.0
    """SETs issued longer ago are refused; their `jti` is remembered this long (replay)."""
    subject_issuers: tuple[str, ...] = ()
    """The issuers whose people this transmitter may name (RFC 9493 `iss_sub`; and the sign-in
    sessions of the providers with these issuers); default: its own issuer only."""
    push_token: str | None = None
    poll_url: str | None = None
    poll_token: str | None = None
    poll_ca: Path | None = None
    poll_interval: float = 5.0
    poll_max_events: int = 100
    poll_timeout: float = 10.0
    max_silence: float | None = None
    """An alert fires when no SET (event or verification) arrived for this long."""


def _secret(t: Table, name: str) -> str | None:
    """`NAME_env` or `NAME_file`, never the secret itself in the configuration."""
    env = t.text(f"{name}_env")
    file = t.path(f"{name}_file")
    if env is not None and file is not None:
        t.fail(f"{name}_env", f"set one of {name}_env and {name}_file, not both")
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            t.fail(f"{name}_env", f"environment variable {env} is not set")
        return value
    if file is not None:
        value = file.read_text(encoding="utf-8").strip()
        if len(value) < 16:
            t.fail(f"{name}_file", "the token must be at least 16 characters")
        return value
    return None


def _url(t: Table, name: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        t.fail(name, f"must be an absolute http(s) URL, not {value!r}")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        # SECURITY: keys and events decide who is signed out; only loopback may be plain.
        t.fail(name, "must be https (plain http only on loopback)")


def parse_transmitters(tables: dict[str, Table]) -> tuple[TransmitterConfig, ...]:
    out: list[TransmitterConfig] = []
    seen: dict[str, str] = {}
    for name, t in tables.items():
        issuer: str = t.text("issuer", required=True)
        if not issuer:
            t.fail("issuer", "must not be empty")
        if issuer in seen:
            t.fail("issuer", f"already the issuer of [signals.{seen[issuer]}]")
        seen[issuer] = name
        audience: str = t.text("audience", required=True)
        if not audience:
            t.fail("audience", "must not be empty")
        algorithms = t.str_list("algorithms", DEFAULT_ALGORITHMS)
        if not algorithms:
            t.fail("algorithms", "at least one algorithm is required")
        for i, alg in enumerate(algorithms):
            # SECURITY: RFC 8725 §3.1: never "none" or a shared-secret algorithm.
            if alg not in SUPPORTED_ALGORITHMS:
                t.fail(f"algorithms[{i}]", f"must be one of {sorted(SUPPORTED_ALGORITHMS)}")
        jwks_url = t.text("jwks_url")
        jwks_file = t.path("jwks_file")
        if (jwks_url is None) == (jwks_file is None):
            t.fail("jwks_url", "set exactly one of jwks_url and jwks_file")
        if jwks_url is not None:
            _url(t, "jwks_url", jwks_url)
        jwks_ca = t.path("jwks_ca")
        delivery = t.choice("delivery", DELIVERY_METHODS, "push")
        poll_url = t.text("poll_url")
        if delivery == "poll":
            if poll_url is None:
                t.fail("poll_url", 'is required with delivery = "poll"')
            _url(t, "poll_url", poll_url)
        elif poll_url is not None:
            t.fail("poll_url", 'only with delivery = "poll"')
        push_token = _secret(t, "push_token")
        poll_token = _secret(t, "poll_token")
        if delivery == "push" and poll_token is not None:
            t.fail("poll_token_env", 'only with delivery = "poll"')
        if delivery == "poll" and push_token is not None:
            t.fail("push_token_env", 'only with delivery = "push"')
        cfg = TransmitterConfig(
            name=name,
            issuer=issuer,
            audience=audience,
            algorithms=algorithms,
            jwks_url=jwks_url,
            jwks_file=jwks_file,
            jwks_ca=jwks_ca,
            delivery=delivery,
            leeway=t.duration("leeway", 30.0, min=0.0, max=600.0),
            max_event_age=t.duration("max_event_age", 86400.0, min=60.0, max=30 * 86400.0),
            subject_issuers=t.str_list("subject_issuers", (issuer,)),
            push_token=push_token,
            poll_url=poll_url,
            poll_token=poll_token,
            poll_ca=t.path("poll_ca"),
            poll_interval=t.duration("poll_interval", 5.0, min=0.05, max=3600.0),
            poll_max_events=t.integer("poll_max_events", 100, min=1, max=1000),
            poll_timeout=t.duration("poll_timeout", 10.0, min=0.1, max=300.0),
            max_silence=t.duration("max_silence", None, min=1.0),
        )
        if cfg.poll_ca is not None and delivery != "poll":
            t.fail("poll_ca", 'only with delivery = "poll"')
        t.done()
        out.append(cfg)
    return tuple(out)
