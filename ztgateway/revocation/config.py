"""The `[revocation]` section: where CRLs come from, OCSP, and how often the gateway looks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from yarl import URL

from ..configreader import Table

OCSPFailure = Literal["hard-fail", "soft-fail"]
OCSP_FAILURE_MODES: tuple[OCSPFailure, ...] = ("hard-fail", "soft-fail")


@dataclass(frozen=True, slots=True)
class RevocationConfig:
    crl_urls: tuple[str, ...] = ()
    """CRLs fetched over HTTP(S) and refreshed before their nextUpdate."""
    crl_distribution_points: bool = False
    """Also fetch the CRL each client certificate names in its CRL distribution points."""
    crl_refresh_before: float = 3600.0
    """Refresh a CRL this long before its nextUpdate (at the latest half way through)."""
    crl_retry_interval: float = 30.0
    ocsp: bool = False
    """Ask the OCSP responder (the certificate's AIA, or `ocsp_responder`) about each client
    certificate (RFC 6960), cached until the answer's nextUpdate."""
    ocsp_responder: str = ""
    ocsp_nonce: bool = True
    """Send an RFC 8954 nonce; an answer carrying another nonce is refused."""
    ocsp_require_nonce: bool = False
    """Refuse answers without our nonce (responders serving pre-signed answers omit it)."""
    ocsp_cache_size: int = 10_000
    ocsp_max_age: float = 3600.0
    """How long an answer without nextUpdate (RFC 6960 §4.2.2.1) is reused at most."""
    clock_skew: float = 300.0
    """Tolerance for the responder's and CRL issuer's clocks on thisUpdate/nextUpdate."""
    fetch_timeout: float = 5.0
    max_response_bytes: int = 10 * 1024 * 1024
    check_interval: float = 1.0
    """How often refreshes fall due, revocations shared by other replicas are read, and open
    connections are re-checked (0: only when `RevocationService.tick()` is called)."""

    @property
    def enabled(self) -> bool:
        return bool(self.crl_urls or self.crl_distribution_points or self.ocsp)


def _http_url(t: Table, name: str, value: str) -> str:
    try:
        url = URL(value)
    except ValueError:
        t.fail(name, f"{value!r} is not a URL")
    if url.scheme not in ("http", "https") or not url.host:
        t.fail(name, f"{value!r} must be an http:// or https:// URL")
    return value


def parse_revocation(t: Table) -> RevocationConfig:
    d = RevocationConfig()
    urls = t.str_list("crl_urls")
    for i, u in enumerate(urls):
        _http_url(t, f"crl_urls[{i}]", u)
    responder = t.text("ocsp_responder", "")
    if responder:
        _http_url(t, "ocsp_responder", responder)
    cfg = RevocationConfig(
        crl_urls=urls,
        crl_distribution_points=t.flag("crl_distribution_points", d.crl_distribution_points),
        crl_refresh_before=t.duration("crl_refresh_before", d.crl_refresh_before, min=0.0),
        crl_retry_interval=t.duration("crl_retry_interval", d.crl_retry_interval, min=0.1),
        ocsp=t.flag("ocsp", d.ocsp),
        ocsp_responder=responder,
        ocsp_nonce=t.flag("ocsp_nonce", d.ocsp_nonce),
        ocsp_require_nonce=t.flag("ocsp_require_nonce", d.ocsp_require_nonce),
        ocsp_cache_size=t.integer("ocsp_cache_size", d.ocsp_cache_size, min=1),
        ocsp_max_age=t.duration("ocsp_max_age", d.ocsp_max_age, min=0.0),
        clock_skew=t.duration("clock_skew", d.clock_skew, min=0.0, max=3600.0),
        fetch_timeout=t.duration("fetch_timeout", d.fetch_timeout, min=0.1, max=60.0),
        max_response_bytes=t.integer("max_response_bytes", d.max_response_bytes, min=1024),
        check_interval=t.duration("check_interval", d.check_interval, min=0.0),
    )
    if cfg.ocsp_require_nonce and not cfg.ocsp_nonce:
        t.fail("ocsp_require_nonce", "needs ocsp_nonce = true")
    if cfg.ocsp_responder and not cfg.ocsp:
        t.fail("ocsp_responder", "is set but ocsp = false")
    t.done()
    return cfg
