"""The one factory of SSLContexts, the parsed client-certificate identity, and the CRL.

Server contexts are rebuilt whenever the certificate, CA bundle or CRL change (file polling and
SIGHUP, `tlsmaterial.TLSManager`); a new connection always gets the newest context, and because
revocation is also re-checked per request against the newest CRL (by serial), neither a
keep-alive connection nor a resumed TLS session outlives a revocation.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import ssl
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..config import TLSConfig, UpstreamConfig
from .tlsalert import AlertingContext

log = logging.getLogger("ztgateway.tls")

# Mozilla "intermediate" TLS 1.2 suites (forward secret AEAD only); TLS 1.3 suites are all AEAD.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
DEVICE_URI_PREFIX = "urn:ztgw:device:"


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What the gateway knows about a client certificate, parsed once per certificate."""

    der: bytes
    subject: str
    common_name: str
    user: str | None
    email: str | None
    device_id: str
    sans: tuple[str, ...]
    serial: int
    fingerprint_sha256: str
    issuer: str
    not_before: float
    not_after: float
    client_auth: bool
    is_ca: bool = False
    """basicConstraints cA=TRUE or keyCertSign: a CA's certificate is never a client's."""
    spki_sha256: str = ""
    """SHA-256 of the SubjectPublicKeyInfo: what a device is pinned to (docs/security.md)."""

    def to_json(self) -> dict[str, object]:
        return _cert_json(self)

    def _json(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "user": self.user,
            "device_id": self.device_id,
            "sans": list(self.sans),
            "serial": format(self.serial, "x"),
            "fingerprint_sha256": self.fingerprint_sha256,
            "issuer": self.issuer,
            "not_after": datetime.fromtimestamp(self.not_after, UTC).isoformat(),
        }


@functools.lru_cache(maxsize=4096)
def _cert_json(cert: CertInfo) -> dict[str, object]:
    """Formatted once per certificate: the audit event of every request carries it."""
    return cert._json()


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """`issuer` signed `cert` directly (names match and the signature verifies)."""
    if issuer.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def parse_client_cert(der: bytes) -> CertInfo:
    cert = x509.load_der_x509_certificate(der)
    subject = cert.subject

    def attr(oid: x509.ObjectIdentifier) -> str | None:
        values = subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else None

    sans: list[str] = []
    device_uri: str | None = None
    emails: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            sans.append(f"URI:{uri}")
            if uri.startswith(DEVICE_URI_PREFIX) and device_uri is None:
                device_uri = uri[len(DEVICE_URI_PREFIX) :]
        for address in san.get_values_for_type(x509.RFC822Name):
            sans.append(f"email:{address}")
            emails.append(address)
        for dns in san.get_values_for_type(x509.DNSName):
            sans.append(f"DNS:{dns}")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in eku
    except x509.ExtensionNotFound:
        client_auth = True  # RFC 5280 §4.2.1.12: no EKU means any purpose
    is_ca = False
    with contextlib.suppress(x509.ExtensionNotFound):
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with contextlib.suppress(x509.ExtensionNotFound):
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        is_ca = is_ca or usage.key_cert_sign
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    fingerprint = hashlib.sha256(der).hexdigest()
    cn = attr(NameOID.COMMON_NAME) or ""
    email: str | None = emails[0] if emails else attr(NameOID.EMAIL_ADDRESS)
    # The UID attribute names the user; without one, the whole e-mail address does. Its local
    # part alone would make alice@partner.example the directory's "alice" (review L8).
    user = attr(NameOID.USER_ID) or email
    return CertInfo(
        der=der,
        subject=subject.rfc4514_string(),
        common_name=cn,
        user=user,
        email=email,
        device_id=device_uri or f"sha256:{fingerprint[:32]}",
        sans=tuple(sans),
        serial=cert.serial_number,
        fingerprint_sha256=fingerprint,
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        client_auth=client_auth,
        is_ca=is_ca,
        spki_sha256=hashlib.sha256(spki).hexdigest(),
    )


class CertInfoCache:
    """Bounded LRU from DER bytes to CertInfo: a device reconnecting is not parsed again."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: OrderedDict[bytes, CertInfo] = OrderedDict()

    def get(self, der: bytes) -> CertInfo:
        info = self._items.get(der)
        if info is None:
            info = parse_client_cert(der)
            self._items[der] = info
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return info


@dataclass(frozen=True, slots=True)
class RevocationList:
    revoked_serials: frozenset[int] = frozenset()
    next_update: float | None = None
    issuer: str = ""
    configured: bool = False
    """A CRL file is configured: a certificate of another issuer has no CRL to be checked in."""

    def is_revoked(self, serial: int) -> bool:
        return serial in self.revoked_serials


def load_crl(path: Path, ca_cert: x509.Certificate | None = None) -> RevocationList:
    data = path.read_bytes()
    crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
    if ca_cert is not None and not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise ValueError(f"{path}: CRL signature does not verify against the client CA")
    nu = crl.next_update_utc
    return RevocationList(
        revoked_serials=frozenset(r.serial_number for r in crl),
        next_update=nu.timestamp() if nu else None,
        issuer=crl.issuer.rfc4514_string(),
        configured=True,
    )


def _harden(ctx: ssl.SSLContext, min_version: str) -> None:
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    # No set_ecdh_curve(): with OpenSSL 3 it replaces the group list with that one curve, which
    # refused clients offering only X25519 or P-384 and cost every browser (X25519 key share
    # first) a HelloRetryRequest round trip (RFC 8446 §4.1.4). OpenSSL's default list also has
    # X448, P-521 and the FFDHE groups, beyond Mozilla intermediate: limit it to exactly its
    # three, X25519 first (what browsers send a key share for).
    limit_groups(ctx)


TLS_GROUPS = b"X25519:P-256:P-384"
SESSION_TICKETS = 1
_SSL_CTRL_SET_GROUPS_LIST = 92  # openssl/ssl.h


@functools.cache
def _libssl() -> ctypes.CDLL:
    """The OpenSSL the ssl module is linked against, through the _ssl extension's handle."""
    import _ssl

    lib = ctypes.CDLL(getattr(_ssl, "__file__", None))
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    return lib


def limit_groups(ctx: ssl.SSLContext) -> None:
    """SSL_CTX_set1_groups_list(ctx, "X25519:P-256:P-384"), which Python's ssl module lacks.

    The SSL_CTX pointer is the first field after the object header of CPython's PySSLContext;
    it is checked (its options must read back as the context's) before anything is written,
    and the gateway refuses to start rather than serve with groups it did not choose."""
    lib = _libssl()
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        raise RuntimeError("cannot reach this Python's OpenSSL context to limit TLS groups")
    if lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(TLS_GROUPS)) != 1:
        raise RuntimeError(f"OpenSSL refused the TLS groups {TLS_GROUPS.decode()}")


_SNI_ATTRIBUTE = "ztgw_sni"


def _remember_sni(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext
) -> None:
    # The protocol compares it with each request's Host (http1.Connection): the name the
    # handshake asked for is only known here.
    if name:
        setattr(ssl_object, _SNI_ATTRIBUTE, name)


def server_name(ssl_object: object) -> str | None:
    """The SNI of a finished server-side handshake (None: the client sent none)."""
    name = getattr(ssl_object, _SNI_ATTRIBUTE, None)
    return name if isinstance(name, str) else None


def server_context(cfg: TLSConfig, client_cert: str, extra_crls: bytes = b"") -> ssl.SSLContext:
    """mTLS server context: the client certificate is verified against the CA (and CRLs).

    `extra_crls`: PEM CRLs fetched by the revocation service (revocation/crl.py), verified
    already; loaded beside the file CRL so that OpenSSL refuses a revoked certificate in the
    handshake with certificate_revoked (decision 0017)."""
    # AlertingContext: a refused handshake still sends OpenSSL's alert (tlsalert.py).
    ctx = AlertingContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, cfg.min_version)
    ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
    ctx.load_verify_locations(cafile=str(cfg.client_ca))
    if cfg.crl is not None:
        # A PEM file may hold CRLs; OpenSSL's lookup loads them beside the CA certificates.
        ctx.load_verify_locations(cafile=str(cfg.crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if extra_crls:
        # Only a file lookup loads CRLs (cadata takes certificates only).
        with tempfile.NamedTemporaryFile(prefix="ztgw-crls-", suffix=".pem") as tmp:
            tmp.write(extra_crls)
            tmp.flush()
            ctx.load_verify_locations(cafile=tmp.name)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    # OpenSSL checks the clientAuth EKU ("ssl_client" purpose) on the server side by default.
    ctx.verify_mode = ssl.CERT_REQUIRED if client_cert == "required" else ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.sni_callback = _remember_sni
    # One TLS 1.3 session ticket per handshake, not OpenSSL's two (as Go's crypto/tls does): a
    # ticket made after a full handshake carries the verified client certificate, and each cost
    # ~200 µs of CPU here (OpenSSL 3.0, in-memory full handshakes with this context: 1,470
    # µs of server CPU with two, 1,268 with one). A client resuming gets a fresh ticket on that connection; only a second connection
    # opened in parallel before then makes a full handshake.
    ctx.num_tickets = SESSION_TICKETS
    return ctx


def upstream_context(up: UpstreamConfig) -> ssl.SSLContext:
    """Client context towards an https upstream: verified, optional service-to-service mTLS."""
    ctx = ssl.create_default_context(cafile=str(up.ca) if up.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if up.client_cert and up.client_key:
        ctx.load_cert_chain(str(up.client_cert), str(up.client_key))
    return ctx


# X509_V_ERR_* (openssl/x509_vfy.h) -> bounded metric label.
_VERIFY_CODE_REASONS: dict[int, str] = {
    2: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT
    3: "crl_unavailable",  # UNABLE_TO_GET_CRL
    9: "not_yet_valid",  # CERT_NOT_YET_VALID
    10: "expired",  # CERT_HAS_EXPIRED
    11: "crl_not_yet_valid",  # CRL_NOT_YET_VALID
    12: "crl_expired",  # CRL_HAS_EXPIRED
    18: "unknown_ca",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "unknown_ca",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    23: "revoked",  # CERT_REVOKED
    26: "bad_purpose",  # INVALID_PURPOSE
}


def handshake_failure_reason(exc: BaseException) -> str:
    """A bounded label for a refused handshake (Python's ssl module otherwise hides them)."""
    text = str(exc).lower()
    if isinstance(exc, TimeoutError | ConnectionAbortedError) and (
        "timeout" in text or "longer than" in text
    ):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        # The X509_V_ERR_* codes are OpenSSL ABI; the messages are not (1.1.1 says "unsupported
        # certificate purpose", 3.x "unsuitable certificate purpose"), so codes come first.
        by_code = _VERIFY_CODE_REASONS.get(exc.verify_code)
        if by_code is not None:
            return by_code
        msg = (exc.verify_message or "").lower()
        for needle, label in (
            ("revoked", "revoked"),
            ("crl has expired", "crl_expired"),
            ("expired", "expired"),
            ("not yet valid", "not_yet_valid"),
            ("certificate purpose", "bad_purpose"),
            ("local issuer", "unknown_ca"),
            ("self-signed", "unknown_ca"),
            ("self signed", "unknown_ca"),
            ("unable to get certificate crl", "crl_unavailable"),
        ):
            if needle in msg:
                return label
        return "verify_failed"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        for needle, label in (
            ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_certificate"),
            ("CERTIFICATE_REQUIRED", "no_certificate"),
            ("UNSUPPORTED_PROTOCOL", "protocol_version"),
            ("VERSION", "protocol_version"),
            ("NO_SHARED_CIPHER", "no_shared_cipher"),
            ("HTTP_REQUEST", "plain_http"),
            ("WRONG_VERSION_NUMBER", "not_tls"),
            ("UNKNOWN_CA", "unknown_ca"),
            ("CERTIFICATE_VERIFY_FAILED", "verify_failed"),
            ("SSLV3_ALERT", "client_alert"),
            ("TLSV1_ALERT", "client_alert"),
        ):
            if needle in reason:
                return label
        return "tls_error"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError | OSError):
        return "connection_lost"
    return "other"
