"""Verify a client certificate that did not arrive in our own TLS handshake.

Forward-auth gets the client's certificate in a header from the edge proxy, and `/decide` in a
request body. Neither was verified by our listener, so each is verified here as the listener's
OpenSSL context verifies a handshake (`tls.server_context`): a path to a self-signed trust
anchor of `[tls] client_ca` (the bundle's other certificates, and any the edge sends after the
leaf, serve as intermediates), every certificate valid at the clock's now, the clientAuth
extended key usage, not a CA certificate, and, when a CRL is configured, a CRL of the leaf's
issuer that has not expired and does not list it (OpenSSL's VERIFY_CRL_CHECK_LEAF). Path
validation is cryptography's (the RFC 5280 / CA/B Forum profile of rustls-webpki), which is
stricter than OpenSSL's defaults in places (no SHA-1, no RSA under 2048 bits): stricter fails
closed.

A verified certificate is remembered (bounded, per TLS material) until the first not-after of
its chain, so an edge's steady traffic costs one path validation per device, not per request;
revocation is looked up on every call, against the newest CRL.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ..decision import Reason
from ..request.headerfamilies import CertFormat
from .tls import CertInfo, RevocationList, issued_by, parse_client_cert

MAX_HEADER_CERT = 64 * 1024
"""A header longer than this is refused before any parsing (a chain of a few certificates)."""


class CertRefused(Exception):
    """The certificate must not be believed: `reason` is the refusal's, `detail` for audit."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _self_signed(cert: x509.Certificate) -> bool:
    return issued_by(cert, cert)


def certs_from_header(value: str, fmt: CertFormat) -> list[x509.Certificate]:
    """The leaf first, then what the edge sent after it. Raises CertRefused if unreadable.

    - pem-urlencoded: nginx `$ssl_client_escaped_cert` (URL-encoded PEM, one or more blocks);
    - base64-der: Traefik `passTLSClientCert` (`pem: true`: URL-encoded base64 DER, the chain
      comma-separated) and Caddy `{http.request.tls.client.certificate_der_base64}`.
    """
    if len(value) > MAX_HEADER_CERT:
        raise CertRefused(Reason.CLIENT_CERT_INVALID, "forwarded certificate too large")
    try:
        if fmt == "pem-urlencoded":
            certs = x509.load_pem_x509_certificates(unquote(value).encode("ascii"))
        else:
            parts = [p.strip() for p in unquote(value).split(",") if p.strip()]
            certs = [
                x509.load_der_x509_certificate(base64.b64decode(p, validate=True)) for p in parts
            ]
    except (ValueError, UnicodeEncodeError, binascii.Error) as exc:
        raise CertRefused(Reason.CLIENT_CERT_INVALID, "unparseable forwarded certificate") from exc
    if not certs:
        raise CertRefused(Reason.CLIENT_CERT_INVALID, "no certificate in the forwarded header")
    return certs


@dataclass(frozen=True, slots=True)
class _Verified:
    info: CertInfo
    valid_from: float
    valid_until: float


class ClientCertVerifier:
    """Built with the TLS material (`tlsmaterial.build_material`), so it follows CA and CRL reloads."""

    def __init__(
        self, client_ca: Path, revocations: RevocationList, *, cache_size: int = 4096
    ) -> None:
        bundle = x509.load_pem_x509_certificates(client_ca.read_bytes())
        anchors = [c for c in bundle if _self_signed(c)]
        # Like OpenSSL without X509_V_FLAG_PARTIAL_CHAIN: only a self-signed certificate of
        # the bundle is a trust anchor; the others help build the path.
        self._intermediates = [c for c in bundle if not _self_signed(c)]
        self._store = Store(anchors) if anchors else None
        self._revocations = revocations
        self._cache: OrderedDict[tuple[bytes, ...], _Verified] = OrderedDict()
        self._cache_size = cache_size

    def verify_header(self, value: str, fmt: CertFormat, now: float) -> CertInfo:
        certs = certs_from_header(value, fmt)
        return self.verify(certs[0], certs[1:], now)

    def verify_pem(self, pem: bytes, now: float) -> CertInfo:
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError as exc:
            raise CertRefused(Reason.CLIENT_CERT_INVALID, "unparseable certificate") from exc
        return self.verify(certs[0], certs[1:], now)

    def verify(
        self, leaf: x509.Certificate, extra: Sequence[x509.Certificate], now: float
    ) -> CertInfo:
        """The leaf's CertInfo, or CertRefused with the reason the listener would have had."""
        key = (leaf.public_bytes(Encoding.DER), *(c.public_bytes(Encoding.DER) for c in extra))
        hit = self._cache.get(key)
        if hit is not None and hit.valid_from <= now <= hit.valid_until:
            self._cache.move_to_end(key)
            info = hit.info
        else:
            verified = self._verify_path(leaf, extra, now, key[0])
            self._cache[key] = verified
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            info = verified.info
        self._check_revocation(leaf, info, now)
        return info

    def _verify_path(
        self, leaf: x509.Certificate, extra: Sequence[x509.Certificate], now: float, der: bytes
    ) -> _Verified:
        if self._store is None:
            raise CertRefused(Reason.CLIENT_CERT_INVALID, "client_ca holds no trust anchor")
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        verifier = PolicyBuilder().store(self._store).time(when).build_client_verifier()
        try:
            # SECURITY: the chain, validity at `now`, the clientAuth EKU, and "not a CA" (the
            # end-entity profile refuses basicConstraints cA=TRUE) are checked here.
            chain = verifier.verify(leaf, [*extra, *self._intermediates]).chain
        except VerificationError as exc:
            raise CertRefused(Reason.CLIENT_CERT_INVALID, f"not verified: {exc}"[:300]) from exc
        try:
            info = parse_client_cert(der)
        except ValueError as exc:
            raise CertRefused(Reason.CLIENT_CERT_INVALID, "unparseable certificate") from exc
        if info.is_ca:
            raise CertRefused(Reason.CLIENT_CERT_INVALID, "a CA certificate is not a client")
        return _Verified(
            info,
            valid_from=max(c.not_valid_before_utc.timestamp() for c in chain),
            valid_until=min(c.not_valid_after_utc.timestamp() for c in chain),
        )

    def _check_revocation(self, leaf: x509.Certificate, info: CertInfo, now: float) -> None:
        crl = self._revocations
        if not crl.configured:
            return
        if crl.next_update is not None and now > crl.next_update:
            # The listener refuses every handshake then (crl_expired): fail closed alike.
            raise CertRefused(Reason.CLIENT_CERT_INVALID, "the CRL has expired")
        if crl.issuer != leaf.issuer.rfc4514_string():
            # OpenSSL's VERIFY_CRL_CHECK_LEAF refuses a leaf whose issuer has no CRL.
            raise CertRefused(Reason.CLIENT_CERT_INVALID, "no CRL for the certificate's issuer")
        if crl.is_revoked(info.serial):
            raise CertRefused(Reason.CLIENT_CERT_REVOKED, f"serial {info.serial:x}")


__all__ = ["CertFormat", "CertRefused", "ClientCertVerifier", "certs_from_header"]
