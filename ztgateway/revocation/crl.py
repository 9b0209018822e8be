"""CRLs fetched over HTTP: verified against the client CA, refreshed before nextUpdate.

Sources are the configured `crl_urls` and, when `crl_distribution_points` is on, every HTTP(S)
URL a client certificate names in its CRL distribution points (RFC 5280 §4.2.1.13), learned the
first time such a certificate is seen. A CRL is accepted only if a client CA signed it (RFC 5280
§6.3.3 (f)), it carries a nextUpdate (§5.1.2.5: conforming issuers always include it), its
thisUpdate is not in the future and it is not older than the one it replaces (a rollback to an
old CRL would un-revoke certificates; §5.2.3 CRL numbers only grow). Delta CRLs are refused
rather than half-understood.

A source is refreshed `crl_refresh_before` ahead of its nextUpdate (at the latest half way
through its validity), and retried every `crl_retry_interval` while fetching fails. Once a CRL is
past its nextUpdate it can no longer vouch for anyone (§6.3.3 (a)(2)): the issuer's certificates
are refused (fail closed), `ztgw_crl_stale` counts the source and the `ZtgwCrlStale` alert fires.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

from .config import RevocationConfig

log = logging.getLogger("ztgateway.revocation")

Fetch = Callable[[str], Awaitable[bytes]]


class CRLError(Exception):
    """A CRL that cannot be used; `result` is the bounded metric label."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, slots=True)
class VerifiedCRL:
    source: str
    issuer: str
    revoked: frozenset[int]
    this_update: float
    next_update: float
    number: int | None
    der: bytes

    def pem(self) -> bytes:
        crl = x509.load_der_x509_crl(self.der)
        return crl.public_bytes(serialization.Encoding.PEM)

    def stale(self, now: float) -> bool:
        return now >= self.next_update


def load_any_crl(data: bytes) -> x509.CertificateRevocationList:
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def verify_crl(
    data: bytes,
    cas: Sequence[x509.Certificate],
    *,
    source: str,
    now: float,
    skew: float,
) -> VerifiedCRL:
    try:
        crl = load_any_crl(data)
    except ValueError as exc:
        raise CRLError("invalid", f"{source}: not a CRL: {exc}") from exc
    issuer = next((ca for ca in cas if ca.subject == crl.issuer), None)
    if issuer is None:
        raise CRLError(
            "invalid", f"{source}: CRL issuer {crl.issuer.rfc4514_string()} is no client CA"
        )
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise CRLError("invalid", f"{source}: CRL signature does not verify against the client CA")
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.crl_sign:
            raise CRLError("invalid", f"{source}: the CA's key usage does not include cRLSign")
    except x509.ExtensionNotFound:
        pass
    try:
        crl.extensions.get_extension_for_oid(ExtensionOID.DELTA_CRL_INDICATOR)
        raise CRLError("invalid", f"{source}: delta CRLs are not supported")
    except x509.ExtensionNotFound:
        pass
    next_update = crl.next_update_utc
    if next_update is None:
        raise CRLError("invalid", f"{source}: CRL has no nextUpdate (RFC 5280 §5.1.2.5)")
    this_update = crl.last_update_utc.timestamp()
    if this_update > now + skew:
        raise CRLError("invalid", f"{source}: CRL thisUpdate is in the future")
    if next_update.timestamp() <= now:
        raise CRLError("stale", f"{source}: CRL is past its nextUpdate")
    try:
        number: int | None = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    return VerifiedCRL(
        source=source,
        issuer=crl.issuer.rfc4514_string(),
        revoked=frozenset(r.serial_number for r in crl),
        this_update=this_update,
        next_update=next_update.timestamp(),
        number=number,
        der=crl.public_bytes(serialization.Encoding.DER),
    )


def distribution_points(cert: x509.Certificate) -> tuple[str, ...]:
    """The HTTP(S) URLs of a certificate's CRL distribution points (LDAP ones are skipped)."""
    try:
        cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return ()
    urls: list[str] = []
    for point in cdp:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.lower().startswith(
                ("http://", "https://")
            ):
                urls.append(name.value)
    return tuple(urls)


def _older(new: VerifiedCRL, old: VerifiedCRL | None) -> bool:
    """A rollback: an earlier CRL of the same issuer would un-revoke certificates."""
    if old is None or old.issuer != new.issuer:
        return False
    if new.this_update < old.this_update:
        return True
    return new.number is not None and old.number is not None and new.number < old.number


@dataclass
class CRLSource:
    url: str
    crl: VerifiedCRL | None = None
    due: float = 0.0
    """When to fetch next (0: at once)."""
    failures: int = 0
    last_error: str = ""


@dataclass
class CRLSet:
    """Every fetched CRL source, what is due, and the newest verified CRL of each."""

    cfg: RevocationConfig
    cas: Sequence[x509.Certificate]
    fetch: Fetch
    on_result: Callable[[str], None] = lambda result: None
    sources: dict[str, CRLSource] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for url in self.cfg.crl_urls:
            self.sources.setdefault(url, CRLSource(url))

    def add(self, url: str) -> CRLSource:
        source = self.sources.get(url)
        if source is None:
            source = self.sources[url] = CRLSource(url)
        return source

    def _schedule(self, crl: VerifiedCRL, now: float) -> float:
        life = crl.next_update - crl.this_update
        ahead = min(self.cfg.crl_refresh_before, life / 2)
        return max(now + 1.0, crl.next_update - ahead)

    async def refresh(self, source: CRLSource, now: float) -> bool:
        """Fetch one source; True when a newer CRL was taken."""
        try:
            data = await self.fetch(source.url)
            crl = verify_crl(data, self.cas, source=source.url, now=now, skew=self.cfg.clock_skew)
            if _older(crl, source.crl):
                raise CRLError("invalid", f"{source.url}: older than the CRL already held")
        except CRLError as exc:
            return self._failed(source, now, exc.result, str(exc))
        except (OSError, TimeoutError, ValueError) as exc:
            return self._failed(source, now, "unavailable", f"{source.url}: {exc}")
        changed = source.crl is None or source.crl.der != crl.der
        source.crl, source.failures, source.last_error = crl, 0, ""
        source.due = self._schedule(crl, now)
        self.on_result("success")
        if changed:
            log.info(
                "CRL from %s: %d revoked, next update %s",
                source.url,
                len(crl.revoked),
                crl.next_update,
            )
        return changed

    def _failed(self, source: CRLSource, now: float, result: str, message: str) -> bool:
        source.failures += 1
        source.last_error = message
        source.due = now + self.cfg.crl_retry_interval
        self.on_result(result)
        log.warning("CRL fetch failed (%s): %s", result, message)
        return False

    async def refresh_due(self, now: float) -> bool:
        changed = False
        for source in list(self.sources.values()):
            if source.due <= now:
                changed = await self.refresh(source, now) or changed
        return changed

    def crls(self) -> list[VerifiedCRL]:
        return [s.crl for s in self.sources.values() if s.crl is not None]

    def stale_sources(self, now: float) -> list[CRLSource]:
        """Sources without a CRL that is still valid: never fetched, or past nextUpdate."""
        return [s for s in self.sources.values() if s.crl is None or s.crl.stale(now)]
