"""OCSP for client certificates (RFC 6960) with a nonce (RFC 8954): the request and the checks.

An answer is used only when every one of these holds, otherwise it is an error with a bounded
label (`OCSPError.result`), which the route's `ocsp` mode turns into a refusal (hard-fail) or a
counted pass (soft-fail):

- the response is `successful` and a BasicOCSPResponse about *this* certificate (CertID: issuer
  name hash, issuer key hash and serial, under the hash the responder chose);
- it is signed by the issuing CA itself, or by a responder certificate that the CA issued
  directly, that carries id-kp-OCSPSigning and is valid now (RFC 6960 §4.2.2.2: "authorized
  responders"); any other signer is refused (`signer`);
- thisUpdate is not in the future and nextUpdate (if any) has not passed, with `clock_skew`
  either way (§3.2 (5)); a stale answer is refused (`stale`);
- if we sent a nonce, the answer carries no other (RFC 8954 §2.1; `nonce`), and with
  `ocsp_require_nonce` it must carry ours (a pre-signed answer replayed by a man in the middle
  cannot then stand in for a fresh one).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

OCSP_REQUEST_TYPE = "application/ocsp-request"
OCSP_RESPONSE_TYPE = "application/ocsp-response"


class OCSPStatus(enum.StrEnum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class OCSPAnswer:
    status: OCSPStatus
    this_update: float
    next_update: float | None
    revoked_at: float | None = None


class OCSPError(Exception):
    """No usable answer; `result` is the metric label: unavailable, invalid, signer, stale,
    nonce."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


def responder_urls(cert: x509.Certificate) -> tuple[str, ...]:
    """The HTTP(S) OCSP responders a certificate's Authority Information Access names."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(
        d.access_location.value
        for d in aia
        if d.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
        and d.access_location.value.lower().startswith(("http://", "https://"))
    )


def build_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None) -> bytes:
    # SHA-1 CertIDs are what every responder answers (RFC 5019 §2.1.1); the ID is only a
    # lookup key here, the answer's signature is what is trusted.
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())  # noqa: S303
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _key_hash(cert: x509.Certificate) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING: ResponderID byKey (RFC 6960 §4.2.1)."""
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _verify_signature(
    key: object, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None
) -> None:
    if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
        key.verify(signature, data, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
        key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key.verify(signature, data)
    else:
        raise InvalidSignature("unsupported responder key or signature algorithm")


def _names_signer(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if resp.responder_key_hash is not None:
        return resp.responder_key_hash == _key_hash(cert)
    return resp.responder_name == cert.subject


def _signer(resp: ocsp.OCSPResponse, issuer: x509.Certificate, now: float) -> x509.Certificate:
    if _names_signer(resp, issuer):
        return issuer
    for candidate in resp.certificates:
        if not _names_signer(resp, candidate):
            continue
        try:
            candidate.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise OCSPError("signer", "responder certificate not issued by the CA") from exc
        try:
            purposes = list(
                candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            )
        except x509.ExtensionNotFound:
            purposes = []
        if ExtendedKeyUsageOID.OCSP_SIGNING not in purposes:
            raise OCSPError("signer", "responder certificate lacks id-kp-OCSPSigning")
        if not (
            candidate.not_valid_before_utc.timestamp()
            <= now
            <= candidate.not_valid_after_utc.timestamp()
        ):
            raise OCSPError("signer", "responder certificate is not valid now")
        return candidate
    raise OCSPError("signer", "answer not signed by the CA or a responder it delegated to")


def verify_response(
    der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    nonce: bytes | None,
    require_nonce: bool,
    now: float,
    skew: float,
    max_age: float,
) -> OCSPAnswer:
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise OCSPError("invalid", f"not an OCSP response: {exc}") from exc
    if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        # tryLater, internalError, unauthorized...: unsigned by design (RFC 6960 §2.3).
        raise OCSPError("unavailable", f"responder answered {resp.response_status.name}")
    signer = _signer(resp, issuer, now)
    try:
        _verify_signature(
            signer.public_key(),
            resp.signature,
            resp.tbs_response_bytes,
            resp.signature_hash_algorithm,
        )
    except InvalidSignature as exc:
        raise OCSPError("signer", "answer signature does not verify") from exc
    single = None
    for candidate in resp.responses:
        if candidate.serial_number != cert.serial_number:
            continue
        algorithm = candidate.hash_algorithm
        expected = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm).build()
        if (
            candidate.issuer_key_hash == expected.issuer_key_hash
            and candidate.issuer_name_hash == expected.issuer_name_hash
        ):
            single = candidate
            break
    if single is None:
        raise OCSPError("invalid", "answer is about another certificate")
    try:
        got: bytes | None = resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        got = None
    if nonce is not None and got is not None and got != nonce:
        raise OCSPError("nonce", "answer carries another request's nonce")
    if require_nonce and (nonce is None or got != nonce):
        raise OCSPError("nonce", "answer carries no nonce and ocsp_require_nonce is on")
    this_update = single.this_update_utc.timestamp()
    nu = single.next_update_utc
    next_update = nu.timestamp() if nu is not None else None
    if this_update > now + skew:
        raise OCSPError("stale", "answer's thisUpdate is in the future")
    if next_update is not None and next_update < now - skew:
        raise OCSPError("stale", "answer is past its nextUpdate")
    if next_update is None and this_update < now - max_age - skew:
        raise OCSPError("stale", "answer without nextUpdate is older than ocsp_max_age")
    status = single.certificate_status
    if status is ocsp.OCSPCertStatus.REVOKED:
        at = single.revocation_time_utc
        return OCSPAnswer(
            OCSPStatus.REVOKED, this_update, next_update, at.timestamp() if at else None
        )
    if status is ocsp.OCSPCertStatus.GOOD:
        return OCSPAnswer(OCSPStatus.GOOD, this_update, next_update)
    return OCSPAnswer(OCSPStatus.UNKNOWN, this_update, next_update)
