"""The development PKI: a private CA, the gateway's server certificate, client certificates, a CRL
and the signing keys of the dev token issuer and of the gateway's upstream assertion.

Two layers. `CertificateAuthority` and `Issued` work in memory so tests can mint exactly the
certificate a scenario needs (expired, not yet valid, wrong EKU, another CA) without touching disk.
`init_pki`, `issue_client` and `revoke` keep the on-disk layout described by `PKIPaths`, which
`make run`, the CLI and an operator share.

This is for development and tests only: the CA key sits unencrypted next to the certificates and
the PKCS#12 password is a published constant. No gateway module uses any of it (the gateway reads
certificates, keys and CRLs an operator's CA made: `edge/tls.py`, `revocation/`).

It stays one module of about 930 lines because the two layers share every certificate profile
(key usages, EKUs, SANs, validity with clock skew) and the on-disk layer is a thin loop over the
in-memory one; a split would put the profile in one file and half of its callers in another.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
    ObjectIdentifier,
)
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ..clock import SYSTEM_CLOCK, Clock
from ..credentials.jwks import jwk_thumbprint

KeyType: TypeAlias = Literal["ec", "rsa"]
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# Browsers, the macOS keychain and Playwright import password-less PKCS#12 files unreliably, so
# the dev bundles carry a password; it is public on purpose and protects nothing.
P12_PASSWORD = "ztgateway"  # noqa: S105
ORGANIZATION = "ztgateway dev"
DEVICE_URI_PREFIX = "urn:ztgw:device:"
DEFAULT_EMAIL_DOMAIN = "example.test"  # RFC 2606: can never belong to anyone
CLOCK_SKEW = dt.timedelta(minutes=5)
ISSUER_ALG = "ES256"
# The CRL on disk outlives the in-memory default: OpenSSL refuses every client once a CRL's
# nextUpdate has passed (X509_V_ERR_CRL_HAS_EXPIRED), which would silently break a dev setup
# left alone for a month. `refresh_crl` / `certs crl` re-signs it.
DISK_CRL_DAYS = 365
DEFAULT_CLIENTS: tuple[tuple[str, str], ...] = (("alice-laptop", "alice"), ("bob-phone", "bob"))

# Names become file names under clients/ and part of a URN, so neither path separators nor URI
# delimiters may appear.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RSA_BITS = 2048


# RFC 7638 §3.2: only the required members take part in the thumbprint, in this set per kty.
class PKIError(Exception):
    """A PKI operation the operator can fix (existing files, unknown client, unreadable key)."""


# --------------------------------------------------------------------------- keys and helpers


def generate_key(key_type: KeyType = "ec") -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    raise PKIError(f"unknown key type {key_type!r}; expected 'ec' or 'rsa'")


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(path: Path) -> PrivateKey:
    """Only EC and RSA keys are accepted because those are the only ones this PKI signs with."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise PKIError(f"cannot read private key {path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PKIError(f"{path} holds a {type(key).__name__}; expected an EC or RSA key")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    """Accepts PEM or DER, since operators hand `certs show` whatever their tools exported."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PKIError(f"cannot read certificate {path}: {exc.strerror or exc}") from exc
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise PKIError(f"{path} is not an X.509 certificate: {exc}") from exc


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _signing_hash() -> hashes.SHA256:
    # P-256 pairs with SHA-256 (RFC 5480 §4); SHA-256 is also the floor for RSA today.
    return hashes.SHA256()


def _require_aware(value: dt.datetime | None, name: str) -> None:
    if value is not None and value.tzinfo is None:
        raise PKIError(f"{name} must be timezone-aware (naive datetimes are ambiguous)")


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None, now: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    """Fill in whichever bound is missing so that asking only for an expired (or only for a
    future) certificate yields a sensible window of `days` rather than an inverted one."""
    _require_aware(not_before, "not_before")
    _require_aware(not_after, "not_after")
    lifetime = dt.timedelta(days=days)
    if not_before is None:
        not_before = now - CLOCK_SKEW
        if not_after is not None and not_after <= not_before:
            not_before = not_after - lifetime
    if not_after is None:
        not_after = not_before + lifetime if not_before > now else now + lifetime
    if not_after <= not_before:
        raise PKIError(f"not_after ({not_after}) must be later than not_before ({not_before})")
    return not_before.astimezone(dt.UTC), not_after.astimezone(dt.UTC)


def _check_name(name: str, what: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise PKIError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# --------------------------------------------------------------------------- in-memory layer


@dataclass(frozen=True)
class Issued:
    """A certificate together with its private key, as a test or the CLI needs them."""

    key: PrivateKey
    cert: x509.Certificate

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return private_key_pem(self.key)

    def fingerprint_sha256(self) -> str:
        return fingerprint_sha256(self.cert)

    def write(self, cert_path: Path, key_path: Path) -> None:
        # Key first: a certificate on disk without its key is worse than the reverse, because
        # tools would pick it up and fail later with a less obvious error.
        atomic_write(key_path, self.key_pem(), mode=0o600)
        atomic_write(cert_path, self.cert_pem(), mode=0o644)

    def to_pkcs12(
        self, ca_chain: Sequence[x509.Certificate] = (), *, password: str = P12_PASSWORD
    ) -> bytes:
        """3DES/SHA-1 PKCS#12 because the macOS keychain and older NSS builds reject the
        PBES2/AES form; with a public password neither the cipher nor the iteration count
        (OpenSSL's default, PKCS12_DEFAULT_ITER) protects anything anyway."""
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(2048)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())  # noqa: S303
            .build(password.encode())
        )
        cn = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        friendly = str(cn[0].value) if cn else None
        return pkcs12.serialize_key_and_certificates(
            friendly.encode() if friendly else None,
            self.key,
            self.cert,
            list(ca_chain) or None,
            encryption,
        )


class CertificateAuthority:
    """A signing CA. Root or intermediate; either can issue leaves and CRLs.

    Validity windows and CRL times start at its clock's "now", so a test can mint material for
    any instant (`CertificateAuthority.generate(clock=ManualClock(...))`).
    """

    def __init__(
        self, cert: x509.Certificate, key: PrivateKey, *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        if _public_der(cert.public_key()) != _public_der(key.public_key()):
            raise PKIError("the CA private key does not match the CA certificate")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise PKIError("the CA certificate lacks BasicConstraints CA=true")
        self.cert = cert
        self.key = key
        self.clock = clock

    @classmethod
    def generate(
        cls,
        common_name: str = "ztgateway dev CA",
        *,
        key_type: KeyType = "ec",
        days: int = 3650,
        clock: Clock = SYSTEM_CLOCK,
    ) -> CertificateAuthority:
        key = generate_key(key_type)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            ]
        )
        not_before, not_after = _validity(days, None, None, clock.now())
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # path_length=1 leaves room for one intermediate (issue_intermediate), no deeper.
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, _signing_hash())
        )
        return cls(cert, key, clock=clock)

    @classmethod
    def load(
        cls, cert_path: Path, key_path: Path, *, clock: Clock = SYSTEM_CLOCK
    ) -> CertificateAuthority:
        cert = load_certificate(cert_path)
        key = load_private_key(key_path)
        try:
            return cls(cert, key, clock=clock)
        except PKIError as exc:
            raise PKIError(f"{cert_path} / {key_path}: {exc}") from exc

    # -- issuing

    def issue_server(
        self,
        common_name: str,
        *,
        dns: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
        days: int = 825,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key_type: KeyType = "ec",
    ) -> Issued:
        """825 days is the longest lifetime Apple platforms accept for a TLS server cert."""
        key = generate_key(key_type)
        san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        try:
            san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        except ValueError as exc:
            raise PKIError(f"invalid IP address for the server certificate: {exc}") from exc
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            ]
        )
        builder = self._leaf_builder(subject, key, days, not_before, not_after)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        builder = builder.add_extension(
            # RSA key transport in TLS 1.2 needs keyEncipherment (RFC 5246 §7.4.2); EC never does.
            _leaf_key_usage(key_encipherment=isinstance(key, rsa.RSAPrivateKey)),
            critical=True,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return Issued(key, builder.sign(self.key, _signing_hash()))

    def issue_client(
        self,
        device: str,
        *,
        user: str,
        email: str | None = None,
        days: int = 365,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        eku: Sequence[ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
        key_type: KeyType = "ec",
        crl_url: str | None = None,
        ocsp_url: str | None = None,
    ) -> Issued:
        """The identity layout (CN=device, UID=user, device URN and email in the SAN) is a
        contract with the certificate stage; change both together. `eku=None` (or empty) omits
        the extension, which tests use to build a certificate that is not for client auth.
        `crl_url` / `ocsp_url` name where relying parties find its revocation status (CRL
        distribution point, RFC 5280 §4.2.1.13; OCSP in Authority Information Access,
        §4.2.2.1), which the gateway's revocation service follows."""
        _check_name(device, "device name")
        if not user:
            raise PKIError("a client certificate needs a user")
        key = generate_key(key_type)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, device),
                x509.NameAttribute(NameOID.USER_ID, user),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            ]
        )
        san = x509.SubjectAlternativeName(
            [
                x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device),
                x509.RFC822Name(email or f"{user}@{DEFAULT_EMAIL_DOMAIN}"),
            ]
        )
        builder = (
            self._leaf_builder(subject, key, days, not_before, not_after)
            .add_extension(san, critical=False)
            .add_extension(_leaf_key_usage(key_encipherment=False), critical=True)
        )
        # RFC 5280 §4.2.1.12: an ExtendedKeyUsage must list at least one purpose.
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if crl_url:
            point = x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(crl_url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        if ocsp_url:
            access = x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
            )
            builder = builder.add_extension(
                x509.AuthorityInformationAccess([access]), critical=False
            )
        return Issued(key, builder.sign(self.key, _signing_hash()))

    def issue_intermediate(
        self,
        common_name: str = "ztgateway dev intermediate CA",
        *,
        key_type: KeyType = "ec",
        days: int = 1825,
    ) -> CertificateAuthority:
        """For chain-building tests: leaves issued by the result need the intermediate sent
        alongside them, exactly like a real deployment."""
        key = generate_key(key_type)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            ]
        )
        not_before, not_after = _validity(days, None, None, self.clock.now())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(min(not_after, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(self._aki(), critical=False)
            .sign(self.key, _signing_hash())
        )
        return CertificateAuthority(cert, key, clock=self.clock)

    def crl(
        self,
        revoked: Iterable[int] | Mapping[int, dt.datetime],
        *,
        next_update_days: int = 30,
        last_update: dt.datetime | None = None,
        crl_number: int | None = None,
    ) -> x509.CertificateRevocationList:
        """`revoked` is serial numbers, or serial -> revocation time when the real times are
        known. The CRL number defaults to milliseconds since the epoch of `last_update`, so
        successive CRLs from the same CA increase monotonically (RFC 5280 §5.2.3) without a
        counter on disk."""
        _require_aware(last_update, "last_update")
        last = (last_update or self.clock.now()).astimezone(dt.UTC)
        entries: dict[int, dt.datetime]
        if isinstance(revoked, Mapping):
            entries = {}
            for serial, when in revoked.items():
                _require_aware(when, "revocation time")
                entries[int(serial)] = when
        else:
            entries = dict.fromkeys((int(s) for s in revoked), last)
        number = crl_number if crl_number is not None else int(last.timestamp() * 1000)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(last)
            .next_update(last + dt.timedelta(days=next_update_days))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(self._aki(), critical=False)
        )
        for serial, when in sorted(entries.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(when.astimezone(dt.UTC))
                .build()
            )
        return builder.sign(self.key, _signing_hash())

    # -- verification helpers used by tests and `revoke`

    def issued(self, cert: x509.Certificate) -> bool:
        """Signature and issuer-name check only; path validation is the TLS stack's job."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return private_key_pem(self.key)

    # -- internals

    def _aki(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    def _leaf_builder(
        self,
        subject: x509.Name,
        key: PrivateKey,
        days: int,
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
    ) -> x509.CertificateBuilder:
        start, end = _validity(days, not_before, not_after, self.clock.now())
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(self._aki(), critical=False)
        )


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage(*, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


# --------------------------------------------------------------------------- JWK


def jwk_from_public_key(
    public_key: PublicKey, kid: str | None = None, alg: str | None = None
) -> dict[str, Any]:
    """`alg` defaults from the key (ES256/ES384/ES512, RS256); `kid` to the RFC 7638 thumbprint
    so that the same key always gets the same kid, on every machine."""
    jwk: dict[str, Any]
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        jwk = dict(ECAlgorithm.to_jwk(public_key, as_dict=True))
        default_alg = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(jwk["crv"])
    elif isinstance(public_key, rsa.RSAPublicKey):
        jwk = dict(RSAAlgorithm.to_jwk(public_key, as_dict=True))
        default_alg = "RS256"
    else:
        raise PKIError(f"cannot express a {type(public_key).__name__} as a JWK")
    # RFC 7517 §4.3: "use" and "key_ops" SHOULD NOT be used together; "use" is what JWKS
    # consumers look at.
    jwk.pop("key_ops", None)
    chosen_alg = alg or default_alg
    if chosen_alg is None:
        raise PKIError(f"no default JWS algorithm for curve {jwk.get('crv')!r}; pass alg")
    jwk["use"] = "sig"
    jwk["alg"] = chosen_alg
    jwk["kid"] = kid or jwk_thumbprint(jwk)
    return jwk


# --------------------------------------------------------------------------- on-disk layer


@dataclass(frozen=True)
class PKIPaths:
    """Where each piece of the dev PKI lives, so no caller spells a file name itself."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def crl(self) -> Path:
        """PEM, re-signed by every `revoke`."""
        return self.directory / "ca.crl"

    @property
    def clients_dir(self) -> Path:
        return self.directory / "clients"

    @property
    def issuer_key(self) -> Path:
        """ES256 key of the dev token issuer (`ztgateway token`)."""
        return self.directory / "issuer.key"

    @property
    def issuer_jwks(self) -> Path:
        """Public JWKS for `issuer_key`: what the gateway is configured to trust."""
        return self.directory / "issuer.jwks.json"

    @property
    def assertion_key(self) -> Path:
        """ES256 key the gateway signs its upstream assertion JWT with."""
        return self.directory / "assertion.key"

    @property
    def revoked(self) -> Path:
        """JSON list of {"name", "serial" (lowercase hex string), "revoked_at" (ISO 8601 UTC)}:
        the CRL's source of truth. Serials are strings because a 159-bit integer does not
        survive JSON parsers that use doubles."""
        return self.directory / "revoked.json"

    def client_paths(self, name: str) -> tuple[Path, Path, Path]:
        """(certificate PEM, private key PEM, PKCS#12 bundle)."""
        _check_name(name, "client name")
        base = self.clients_dir / name
        return base.with_suffix(".pem"), base.with_suffix(".key"), base.with_suffix(".p12")

    def secret_files(self) -> tuple[Path, ...]:
        return (self.ca_key, self.server_key, self.issuer_key, self.assertion_key)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Temp file in the same directory + os.replace: a reader (the gateway reloading its CRL,
    or a crash mid-write) sees the old file or the new one, never half of one. The mode is set
    before any byte is written so a private key is never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_crl(
    paths: PKIPaths, ca: CertificateAuthority, revoked: Mapping[int, dt.datetime]
) -> None:
    crl = ca.crl(revoked, next_update_days=DISK_CRL_DAYS)
    atomic_write(paths.crl, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _write_es256_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    atomic_write(path, private_key_pem(key), mode=0o600)
    return key


def _write_client(
    paths: PKIPaths, ca: CertificateAuthority, issued: Issued, name: str
) -> tuple[Path, Path, Path]:
    pem, key, p12 = paths.client_paths(name)
    issued.write(pem, key)
    atomic_write(p12, issued.to_pkcs12([ca.cert]), mode=0o600)
    return pem, key, p12


def init_pki(
    directory: Path,
    *,
    force: bool = False,
    clients: Sequence[tuple[str, str]] = DEFAULT_CLIENTS,
    clock: Clock = SYSTEM_CLOCK,
) -> PKIPaths:
    """Create a complete dev PKI. With `force` the whole PKI is replaced: client material and
    revocations of the old CA are removed, since nothing signed by it can be trusted any more."""
    paths = PKIPaths(Path(directory))
    for existing in (paths.ca_cert, paths.ca_key):
        if existing.exists() and not force:
            raise PKIError(
                f"{existing} already exists; use --force (force=True) to replace the whole PKI"
            )
    for name, _user in clients:
        _check_name(name, "client name")

    ca = CertificateAuthority.generate(clock=clock)
    if force and paths.clients_dir.is_dir():
        for stale in paths.clients_dir.iterdir():
            if stale.suffix in {".pem", ".key", ".p12"} and stale.is_file():
                stale.unlink()

    _write_server(paths, ca)

    issuer = _write_es256_key(paths.issuer_key)
    jwks = {"keys": [jwk_from_public_key(issuer.public_key(), alg=ISSUER_ALG)]}
    atomic_write(paths.issuer_jwks, (json.dumps(jwks, indent=2) + "\n").encode(), mode=0o644)
    _write_es256_key(paths.assertion_key)

    atomic_write(paths.revoked, b"[]\n", mode=0o644)
    _write_crl(paths, ca, {})
    paths.clients_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, user in clients:
        _write_client(paths, ca, ca.issue_client(name, user=user), name)

    # The CA goes last: a run that dies half-way leaves no ca.pem behind, so a plain re-run
    # works without --force.
    atomic_write(paths.ca_key, ca.key_pem(), mode=0o600)
    atomic_write(paths.ca_cert, ca.cert_pem(), mode=0o644)
    return paths


def _write_server(paths: PKIPaths, ca: CertificateAuthority) -> None:
    server = ca.issue_server("localhost", dns=("localhost",), ips=("127.0.0.1", "::1"))
    server.write(paths.server_cert, paths.server_key)


def load_ca(directory: Path, *, clock: Clock = SYSTEM_CLOCK) -> CertificateAuthority:
    paths = PKIPaths(Path(directory))
    if not paths.ca_cert.exists() or not paths.ca_key.exists():
        raise PKIError(f"no CA in {paths.directory}; run `ztgateway certs init` first")
    return CertificateAuthority.load(paths.ca_cert, paths.ca_key, clock=clock)


def issue_client(
    directory: Path,
    name: str,
    *,
    user: str,
    email: str | None = None,
    days: int = 365,
    force: bool = False,
    clock: Clock = SYSTEM_CLOCK,
) -> tuple[Path, Path, Path]:
    """Re-issuing with `force` does not revoke the old certificate: revoke it first, because
    `revoke` reads the serial from clients/<name>.pem."""
    paths = PKIPaths(Path(directory))
    targets = paths.client_paths(name)
    if not force:
        for target in targets:
            if target.exists():
                raise PKIError(f"{target} already exists; use --force to re-issue")
    if days <= 0:
        raise PKIError("days must be positive")
    ca = load_ca(paths.directory, clock=clock)
    return _write_client(paths, ca, ca.issue_client(name, user=user, email=email, days=days), name)


def read_revoked(directory: Path) -> list[dict[str, Any]]:
    """The revocation list, tolerant of integer serials written by hand."""
    path = PKIPaths(Path(directory)).revoked
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, list) or not all(
        isinstance(e, dict) and "serial" in e and "revoked_at" in e for e in data
    ):
        raise PKIError(f"{path} must be a JSON list of {{name, serial, revoked_at}} objects")
    return data


def _revocation_map(entries: Sequence[Mapping[str, Any]], path: Path) -> dict[int, dt.datetime]:
    out: dict[int, dt.datetime] = {}
    for entry in entries:
        try:
            raw = entry["serial"]
            serial = raw if isinstance(raw, int) else int(str(raw), 16)
            when = dt.datetime.fromisoformat(str(entry["revoked_at"]))
        except (TypeError, ValueError) as exc:
            raise PKIError(f"{path}: bad entry {dict(entry)!r}: {exc}") from exc
        out[serial] = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return out


def revoke(directory: Path, name: str, *, clock: Clock = SYSTEM_CLOCK) -> int:
    """Idempotent: revoking twice keeps one entry (and re-signs the CRL, which also refreshes
    its nextUpdate)."""
    paths = PKIPaths(Path(directory))
    pem_path = paths.client_paths(name)[0]
    if not pem_path.exists():
        raise PKIError(f"unknown client {name!r}: {pem_path} does not exist")
    cert = load_certificate(pem_path)
    ca = load_ca(paths.directory, clock=clock)
    if not ca.issued(cert):
        raise PKIError(f"{pem_path} was not issued by the CA in {paths.directory}")
    entries = read_revoked(paths.directory)
    revoked = _revocation_map(entries, paths.revoked)
    serial = cert.serial_number
    if serial not in revoked:
        now = clock.now().replace(microsecond=0)
        entries.append({"name": name, "serial": f"{serial:x}", "revoked_at": now.isoformat()})
        revoked[serial] = now
        atomic_write(paths.revoked, (json.dumps(entries, indent=2) + "\n").encode(), mode=0o644)
    _write_crl(paths, ca, revoked)
    return serial


def refresh_crl(directory: Path, *, clock: Clock = SYSTEM_CLOCK) -> x509.CertificateRevocationList:
    """Re-sign ca.crl from revoked.json, e.g. before its nextUpdate passes."""
    paths = PKIPaths(Path(directory))
    ca = load_ca(paths.directory, clock=clock)
    revoked = _revocation_map(read_revoked(paths.directory), paths.revoked)
    _write_crl(paths, ca, revoked)
    return x509.load_pem_x509_crl(paths.crl.read_bytes())


RENEW_BEFORE = dt.timedelta(days=30)
"""Dev material this close to its expiry is renewed by `certs init --renew` (`make run`)."""


@dataclass(frozen=True)
class Renewal:
    """What `renew_pki` did: nothing, or made a PKI, or re-issued some of it."""

    created: bool = False
    """There was no PKI (or its CA was unusable): a complete new one was made."""
    reason: str = ""
    renewed: tuple[str, ...] = ()
    """Re-issued in place: "server", "crl" and client names."""


def renew_pki(
    directory: Path,
    *,
    within: dt.timedelta = RENEW_BEFORE,
    clients: Sequence[tuple[str, str]] = DEFAULT_CLIENTS,
    clock: Clock = SYSTEM_CLOCK,
) -> Renewal:
    """Keep a dev PKI usable: re-issue whatever has expired or expires within `within`.

    Without a CA, or with a CA that is expired, not yet valid or about to expire, the whole
    PKI is made anew (clients must import their new bundles). Otherwise the server
    certificate and each client certificate this CA issued are re-issued in place, same
    names and identities (revoked ones stay revoked and are not renewed), and the CRL is
    re-signed before its nextUpdate. Keys of the dev token issuer and the assertion do not
    expire and are kept.
    """
    paths = PKIPaths(Path(directory))
    if not paths.ca_cert.exists() or not paths.ca_key.exists():
        init_pki(paths.directory, force=True, clients=clients, clock=clock)
        return Renewal(created=True, reason="no CA")
    ca = load_ca(paths.directory, clock=clock)
    now = clock.now()
    horizon = now + within
    if not ca.cert.not_valid_before_utc <= now or ca.cert.not_valid_after_utc <= horizon:
        init_pki(paths.directory, force=True, clients=clients, clock=clock)
        return Renewal(created=True, reason=f"CA valid until {ca.cert.not_valid_after_utc}")
    renewed: list[str] = []

    def stale(path: Path) -> bool:
        if not path.exists():
            return True
        cert = load_certificate(path)
        return (
            not ca.issued(cert)
            or cert.not_valid_before_utc > now
            or cert.not_valid_after_utc <= horizon
        )

    if stale(paths.server_cert) or not paths.server_key.exists():
        _write_server(paths, ca)
        renewed.append("server")
    revoked = _revocation_map(read_revoked(paths.directory), paths.revoked)
    if paths.clients_dir.is_dir():
        for pem in sorted(paths.clients_dir.glob("*.pem")):
            cert = load_certificate(pem)
            if not ca.issued(cert) or cert.serial_number in revoked or not stale(pem):
                continue
            user = _subject(cert, NameOID.USER_ID) or pem.stem
            email = _san_email(cert)
            lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
            days = max(1, round((lifetime - CLOCK_SKEW) / dt.timedelta(days=1)))
            _write_client(
                paths, ca, ca.issue_client(pem.stem, user=user, email=email, days=days), pem.stem
            )
            renewed.append(pem.stem)
    crl_stale = True
    if paths.crl.exists():
        crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
        next_update = crl.next_update_utc
        crl_stale = next_update is None or next_update <= horizon or crl.last_update_utc > now
    if crl_stale:
        _write_crl(paths, ca, revoked)
        renewed.append("crl")
    return Renewal(renewed=tuple(renewed))


def _subject(cert: x509.Certificate, oid: ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None


def _san_email(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    emails = san.get_values_for_type(x509.RFC822Name)
    return emails[0] if emails else None
