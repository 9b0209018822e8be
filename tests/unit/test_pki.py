"""The development PKI: in-memory issuance, the on-disk layout, revocation, and the `certs` CLI.

Certificates are checked with the same tools that will consume them: cryptography for structure
and signatures, Python's ssl (OpenSSL) for a real handshake and CRL enforcement, PyJWT for the
issuer JWKS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import socket
import ssl
import stat
import threading
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from ztgateway.clock import ManualClock
from ztgateway.commands import certs as certs_cmd
from ztgateway.credentials.jwks import jwk_thumbprint
from ztgateway.dev import pki

UTC = dt.UTC


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.generate()


@pytest.fixture
def pki_dir(tmp_path: Path) -> pki.PKIPaths:
    return pki.init_pki(tmp_path / "certs")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ext(cert: x509.Certificate, cls: type[Any]) -> Any:
    return cert.extensions.get_extension_for_class(cls).value


def _verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raises InvalidSignature unless `issuer`'s public key made `cert`'s signature."""
    public = issuer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    public.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )


# --------------------------------------------------------------------------- init and layout


def test_init_creates_every_file_with_private_keys_mode_0600(pki_dir: pki.PKIPaths) -> None:
    public = [pki_dir.ca_cert, pki_dir.server_cert, pki_dir.crl, pki_dir.issuer_jwks]
    public.append(pki_dir.revoked)
    secret = [pki_dir.ca_key, pki_dir.server_key, pki_dir.issuer_key, pki_dir.assertion_key]
    for name in ("alice-laptop", "bob-phone"):
        pem, key, p12 = pki_dir.client_paths(name)
        public.append(pem)
        secret += [key, p12]
    for path in public + secret:
        assert path.is_file(), path
    for path in secret:
        assert _mode(path) == 0o600, path
    assert set(pki_dir.secret_files()) <= set(secret)
    assert json.loads(pki_dir.revoked.read_text()) == []
    crl = x509.load_pem_x509_crl(pki_dir.crl.read_bytes())
    assert len(list(crl)) == 0
    # No temp files from the atomic writes are left behind.
    leftovers = [p for p in pki_dir.directory.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_init_refuses_to_overwrite_an_existing_ca_without_force(pki_dir: pki.PKIPaths) -> None:
    before = pki_dir.ca_cert.read_bytes()
    with pytest.raises(pki.PKIError, match=r"ca\.pem already exists"):
        pki.init_pki(pki_dir.directory)
    assert pki_dir.ca_cert.read_bytes() == before


def test_init_refuses_when_only_the_ca_key_exists(tmp_path: Path) -> None:
    paths = pki.PKIPaths(tmp_path)
    paths.ca_key.write_bytes(b"not really a key")
    with pytest.raises(pki.PKIError, match=r"ca\.key already exists"):
        pki.init_pki(tmp_path)


def test_init_with_force_replaces_the_ca_and_forgets_old_revocations(
    pki_dir: pki.PKIPaths,
) -> None:
    old_ca = pki_dir.ca_cert.read_bytes()
    pki.revoke(pki_dir.directory, "alice-laptop")
    pki.issue_client(pki_dir.directory, "carol-tablet", user="carol")

    pki.init_pki(pki_dir.directory, force=True)

    assert pki_dir.ca_cert.read_bytes() != old_ca
    assert json.loads(pki_dir.revoked.read_text()) == []
    # A client of the old CA would only fail later and confusingly; it is removed instead.
    assert not pki_dir.client_paths("carol-tablet")[0].exists()
    ca = pki.load_ca(pki_dir.directory)
    assert ca.issued(pki.load_certificate(pki_dir.client_paths("alice-laptop")[0]))


def test_client_names_that_escape_the_clients_dir_are_refused(pki_dir: pki.PKIPaths) -> None:
    for bad in ("../evil", "a/b", "", ".hidden", "x" * 65, "dev:ice"):
        with pytest.raises(pki.PKIError, match="invalid client name"):
            pki.issue_client(pki_dir.directory, bad, user="mallory")


# --------------------------------------------------------------------------- client certificates


def test_client_cert_has_the_identity_layout_and_client_auth(pki_dir: pki.PKIPaths) -> None:
    cert = pki.load_certificate(pki_dir.client_paths("alice-laptop")[0])

    def attr(oid: x509.ObjectIdentifier) -> list[str]:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]

    assert attr(NameOID.COMMON_NAME) == ["alice-laptop"]
    assert attr(NameOID.USER_ID) == ["alice"]
    assert attr(NameOID.ORGANIZATION_NAME) == ["ztgateway dev"]
    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:ztgw:device:alice-laptop"
    ]
    assert san.get_values_for_type(x509.RFC822Name) == ["alice@example.test"]
    assert list(_ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _ext(cert, x509.BasicConstraints).ca is False
    assert cert.not_valid_before_utc.tzinfo is not None


def test_client_cert_chains_to_its_ca_and_not_to_another(pki_dir: pki.PKIPaths) -> None:
    ca = pki.load_ca(pki_dir.directory)
    cert = pki.load_certificate(pki_dir.client_paths("bob-phone")[0])

    _verify_signed_by(cert, ca.cert)
    assert cert.issuer == ca.cert.subject
    aki = _ext(cert, x509.AuthorityKeyIdentifier).key_identifier
    assert aki == _ext(ca.cert, x509.SubjectKeyIdentifier).digest
    assert ca.issued(cert)
    assert not pki.CertificateAuthority.generate("other CA").issued(cert)


def test_client_cert_email_and_custom_eku(ca: pki.CertificateAuthority) -> None:
    issued = ca.issue_client(
        "kiosk-1", user="dave", email="dave@corp.test", eku=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    san = _ext(issued.cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.RFC822Name) == ["dave@corp.test"]
    assert list(_ext(issued.cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]

    bare = ca.issue_client("kiosk-2", user="dave", eku=None)
    with pytest.raises(x509.ExtensionNotFound):
        bare.cert.extensions.get_extension_for_oid(ExtensionOID.EXTENDED_KEY_USAGE)


def test_client_serials_are_random_and_distinct(ca: pki.CertificateAuthority) -> None:
    serials = {ca.issue_client("d", user="u").serial for _ in range(5)}
    assert len(serials) == 5
    assert all(s.bit_length() > 64 for s in serials)


def test_rsa_client_key_is_supported(ca: pki.CertificateAuthority) -> None:
    issued = ca.issue_client("legacy-pc", user="erin", key_type="rsa")
    assert isinstance(issued.key, rsa.RSAPrivateKey)
    assert issued.key.key_size == 2048
    assert ca.issued(issued.cert)


def test_p12_loads_with_the_published_password_only(pki_dir: pki.PKIPaths) -> None:
    pem, _key, p12 = pki_dir.client_paths("alice-laptop")
    data = p12.read_bytes()

    key, cert, extra = pkcs12.load_key_and_certificates(data, pki.P12_PASSWORD.encode())

    assert pki.P12_PASSWORD == "ztgateway"
    assert cert == pki.load_certificate(pem)
    assert key is not None and cert is not None
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert extra == [pki.load_certificate(pki_dir.ca_cert)]
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(data, b"wrong")


def test_issued_write_uses_0600_for_the_key(ca: pki.CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue_client("dev-1", user="u")
    issued.write(tmp_path / "sub" / "c.pem", tmp_path / "sub" / "c.key")
    assert _mode(tmp_path / "sub" / "c.key") == 0o600
    assert (tmp_path / "sub" / "c.pem").read_bytes() == issued.cert_pem()
    assert issued.fingerprint_sha256() == issued.cert.fingerprint(hashes.SHA256()).hex()
    assert issued.fingerprint_sha256().islower()
    assert b"BEGIN PRIVATE KEY" in issued.key_pem()  # PKCS#8, unencrypted


def test_issue_client_refuses_to_overwrite_without_force(pki_dir: pki.PKIPaths) -> None:
    pem, _key, _p12 = pki.issue_client(pki_dir.directory, "carol-tablet", user="carol")
    first = pem.read_bytes()
    with pytest.raises(pki.PKIError, match=r"carol-tablet\.pem already exists"):
        pki.issue_client(pki_dir.directory, "carol-tablet", user="carol")
    assert pem.read_bytes() == first

    pki.issue_client(pki_dir.directory, "carol-tablet", user="carol", days=10, force=True)
    cert = pki.load_certificate(pem)
    assert pem.read_bytes() != first
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=10, minutes=6)


def test_issue_client_without_a_ca_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(pki.PKIError, match="certs init"):
        pki.issue_client(tmp_path, "carol-tablet", user="carol")


# --------------------------------------------------------------------------- server certificate


def test_server_cert_covers_localhost_and_loopback_for_server_auth(
    pki_dir: pki.PKIPaths,
) -> None:
    cert = pki.load_certificate(pki_dir.server_cert)
    san = _ext(cert, x509.SubjectAlternativeName)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert list(_ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ku = _ext(cert, x509.KeyUsage)
    assert ku.digital_signature and not ku.key_encipherment and not ku.key_cert_sign
    assert _ext(cert, x509.BasicConstraints).ca is False
    _verify_signed_by(cert, pki.load_certificate(pki_dir.ca_cert))


def test_rsa_server_cert_adds_key_encipherment(ca: pki.CertificateAuthority) -> None:
    issued = ca.issue_server("rsa.localhost", dns=["rsa.localhost"], ips=[], key_type="rsa")
    assert _ext(issued.cert, x509.KeyUsage).key_encipherment
    assert _ext(issued.cert, x509.SubjectAlternativeName).get_values_for_type(x509.IPAddress) == []


def test_server_cert_with_a_bad_ip_is_refused(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(pki.PKIError, match="invalid IP"):
        ca.issue_server("x", ips=["999.1.1.1"])


# --------------------------------------------------------------------------- validity windows


def test_expired_certificate_via_not_after(ca: pki.CertificateAuthority) -> None:
    end = dt.datetime.now(UTC) - dt.timedelta(days=1)
    cert = ca.issue_client("old-laptop", user="alice", not_after=end).cert
    assert cert.not_valid_after_utc == end.replace(microsecond=0)
    assert cert.not_valid_before_utc < cert.not_valid_after_utc


def test_not_yet_valid_certificate_via_not_before(ca: pki.CertificateAuthority) -> None:
    start = dt.datetime.now(UTC) + dt.timedelta(days=2)
    cert = ca.issue_server("future", not_before=start, days=5).cert
    assert cert.not_valid_before_utc == start.replace(microsecond=0)
    assert cert.not_valid_after_utc == (start + dt.timedelta(days=5)).replace(microsecond=0)


def test_default_not_before_is_backdated_for_clock_skew(ca: pki.CertificateAuthority) -> None:
    now = dt.datetime.now(UTC)
    cert = ca.issue_client("skewed", user="u").cert
    backdate = now - cert.not_valid_before_utc
    assert dt.timedelta(minutes=4) < backdate <= dt.timedelta(minutes=6)


def test_inverted_or_naive_validity_is_refused(ca: pki.CertificateAuthority) -> None:
    now = dt.datetime.now(UTC)
    with pytest.raises(pki.PKIError, match="must be later"):
        ca.issue_client("d", user="u", not_before=now, not_after=now - dt.timedelta(hours=1))
    with pytest.raises(pki.PKIError, match="timezone-aware"):
        ca.issue_client("d", user="u", not_after=dt.datetime(2030, 1, 1))


# --------------------------------------------------------------------------- revocation and CRL


def test_revoke_puts_the_serial_in_a_validly_signed_crl(pki_dir: pki.PKIPaths) -> None:
    serial = pki.revoke(pki_dir.directory, "alice-laptop")

    alice = pki.load_certificate(pki_dir.client_paths("alice-laptop")[0])
    bob = pki.load_certificate(pki_dir.client_paths("bob-phone")[0])
    ca = pki.load_certificate(pki_dir.ca_cert)
    crl = x509.load_pem_x509_crl(pki_dir.crl.read_bytes())
    ca_public = ca.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    assert serial == alice.serial_number
    assert crl.is_signature_valid(ca_public)
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(bob.serial_number) is None
    assert crl.issuer == ca.subject
    entries = json.loads(pki_dir.revoked.read_text())
    assert entries[0]["name"] == "alice-laptop"
    assert int(entries[0]["serial"], 16) == serial
    assert dt.datetime.fromisoformat(entries[0]["revoked_at"]).tzinfo is not None


def test_revoking_twice_keeps_one_entry(pki_dir: pki.PKIPaths) -> None:
    first = pki.revoke(pki_dir.directory, "alice-laptop")
    second = pki.revoke(pki_dir.directory, "alice-laptop")
    pki.revoke(pki_dir.directory, "bob-phone")

    assert first == second
    crl = x509.load_pem_x509_crl(pki_dir.crl.read_bytes())
    assert sorted(r.serial_number for r in crl).count(first) == 1
    assert len(list(crl)) == 2
    assert len(json.loads(pki_dir.revoked.read_text())) == 2


def test_revoke_unknown_client_is_an_error(pki_dir: pki.PKIPaths) -> None:
    with pytest.raises(pki.PKIError, match="unknown client 'nobody'"):
        pki.revoke(pki_dir.directory, "nobody")


def test_revoke_refuses_a_certificate_from_another_ca(pki_dir: pki.PKIPaths) -> None:
    stranger = pki.CertificateAuthority.generate("stranger").issue_client("eve-pc", user="eve")
    pem, key, _p12 = pki_dir.client_paths("eve-pc")
    stranger.write(pem, key)
    with pytest.raises(pki.PKIError, match="not issued by the CA"):
        pki.revoke(pki_dir.directory, "eve-pc")


def test_crl_has_number_aki_and_revocation_times(ca: pki.CertificateAuthority) -> None:
    when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    last = dt.datetime(2024, 6, 1, tzinfo=UTC)
    crl = ca.crl({7: when, 9: when}, last_update=last, next_update_days=3)
    later = ca.crl([7], last_update=last + dt.timedelta(seconds=1))

    assert crl.last_update_utc == last
    assert crl.next_update_utc == last + dt.timedelta(days=3)
    entry = crl.get_revoked_certificate_by_serial_number(7)
    assert entry is not None and entry.revocation_date_utc == when
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    later_number = later.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert later_number > number
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca.cert, x509.SubjectKeyIdentifier).digest
    other = pki.CertificateAuthority.generate("other").cert.public_key()
    assert isinstance(other, ec.EllipticCurvePublicKey)
    assert not crl.is_signature_valid(other)


def test_refresh_crl_resigns_from_revoked_json(pki_dir: pki.PKIPaths) -> None:
    serial = pki.revoke(pki_dir.directory, "bob-phone")
    pki_dir.crl.unlink()
    crl = pki.refresh_crl(pki_dir.directory)
    assert [r.serial_number for r in crl] == [serial]
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=pki.DISK_CRL_DAYS)


# --------------------------------------------------------------------------- intermediate CA


def test_intermediate_issues_leaves_that_chain_to_the_root(ca: pki.CertificateAuthority) -> None:
    inter = ca.issue_intermediate()
    leaf = inter.issue_client("via-inter", user="frank")
    _verify_signed_by(leaf.cert, inter.cert)
    _verify_signed_by(inter.cert, ca.cert)
    assert _ext(inter.cert, x509.BasicConstraints).path_length == 0
    assert not ca.issued(leaf.cert)


# --------------------------------------------------------------------------- real TLS


def _server_context(paths: pki.PKIPaths, *, with_crl: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(paths.server_cert, paths.server_key)
    ctx.load_verify_locations(cafile=paths.ca_cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if with_crl:
        ctx.load_verify_locations(cafile=paths.crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def _client_context(ca_file: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=ca_file)
    ctx.load_cert_chain(cert, key)
    return ctx


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> dict[str, Any]:
    """A full TLS exchange over a connected socket pair; the server echoes the client's
    certificate subject so the test sees what OpenSSL verified, not what we hoped it sent."""
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(5)
    client_sock.settimeout(5)
    out: dict[str, Any] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                peer = tls.getpeercert()
                out["peer"] = peer
                tls.recv(4)
                tls.sendall(b"pong")
        except (ssl.SSLError, OSError) as exc:
            out["server_error"] = exc
        finally:
            server_sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
            tls.sendall(b"ping")
            out["reply"] = tls.recv(4)
    except (ssl.SSLError, OSError) as exc:
        out["client_error"] = exc
    finally:
        client_sock.close()
        thread.join(10)
    assert not thread.is_alive()
    return out


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_with_alice_cert_succeeds(pki_dir: pki.PKIPaths, hostname: str) -> None:
    pem, key, _ = pki_dir.client_paths("alice-laptop")
    out = _handshake(
        _server_context(pki_dir, with_crl=True),
        _client_context(pki_dir.ca_cert, pem, key),
        hostname,
    )
    assert "server_error" not in out and "client_error" not in out, out
    assert out["reply"] == b"pong"
    subject = dict(rdn[0] for rdn in out["peer"]["subject"])
    assert subject["commonName"] == "alice-laptop"
    assert subject["userId"] == "alice"


def test_tls_revoked_client_is_refused_by_openssl_with_the_crl(pki_dir: pki.PKIPaths) -> None:
    pki.revoke(pki_dir.directory, "alice-laptop")
    pem, key, _ = pki_dir.client_paths("alice-laptop")
    out = _handshake(
        _server_context(pki_dir, with_crl=True),
        _client_context(pki_dir.ca_cert, pem, key),
        "localhost",
    )
    assert isinstance(out.get("server_error"), ssl.SSLCertVerificationError), out
    assert "revoked" in str(out["server_error"])
    assert out.get("reply") != b"pong"


def test_tls_client_cert_from_another_ca_is_refused(pki_dir: pki.PKIPaths, tmp_path: Path) -> None:
    stranger = pki.CertificateAuthority.generate("stranger").issue_client("eve-pc", user="eve")
    stranger.write(tmp_path / "eve.pem", tmp_path / "eve.key")
    out = _handshake(
        _server_context(pki_dir),
        _client_context(pki_dir.ca_cert, tmp_path / "eve.pem", tmp_path / "eve.key"),
        "localhost",
    )
    assert isinstance(out.get("server_error"), ssl.SSLCertVerificationError), out
    assert out.get("reply") != b"pong"


# --------------------------------------------------------------------------- JWKS and JWK


def test_issuer_jwks_verifies_a_token_signed_by_issuer_key(pki_dir: pki.PKIPaths) -> None:
    jwks = json.loads(pki_dir.issuer_jwks.read_text())
    (jwk,) = jwks["keys"]
    assert jwk["alg"] == "ES256" and jwk["use"] == "sig" and jwk["kty"] == "EC"
    assert "d" not in jwk  # public only
    assert jwk["kid"] == jwk_thumbprint(jwk)
    claims = {"sub": "alice", "aud": "ztgw", "iss": "dev", "iat": 1, "exp": 4_102_444_800}
    token = jwt.encode(
        claims, pki_dir.issuer_key.read_bytes(), algorithm="ES256", headers={"kid": jwk["kid"]}
    )

    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
    assert jwt.decode(token, key, algorithms=["ES256"], audience="ztgw") == claims

    forged = jwt.encode(claims, pki_dir.assertion_key.read_bytes(), algorithm="ES256")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, key, algorithms=["ES256"], audience="ztgw")


def test_jwk_from_public_key_defaults_and_overrides() -> None:
    rsa_jwk = pki.jwk_from_public_key(pki.generate_key("rsa").public_key())
    assert rsa_jwk["alg"] == "RS256" and "key_ops" not in rsa_jwk
    assert rsa_jwk["kid"] == jwk_thumbprint(rsa_jwk)
    ec_jwk = pki.jwk_from_public_key(pki.generate_key("ec").public_key(), "k1", "ES256")
    assert (ec_jwk["kid"], ec_jwk["alg"], ec_jwk["crv"]) == ("k1", "ES256", "P-256")


# --------------------------------------------------------------------------- CLI


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="ztgateway")
    commands = parser.add_subparsers(dest="command", required=True)
    certs_cmd.register(commands)
    args = parser.parse_args(argv)
    code = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_init_prints_files_fingerprints_and_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "certs"
    code, out, err = _cli(["certs", "init", "--dir", str(directory)], capsys)

    assert code == 0 and err == ""
    paths = pki.PKIPaths(directory)
    alice = pki.load_certificate(paths.client_paths("alice-laptop")[0])
    assert pki.fingerprint_sha256(alice) in out
    assert str(paths.ca_key) in out and str(paths.client_paths("bob-phone")[2]) in out
    assert "PKCS#12 password: ztgateway" in out

    code, out, err = _cli(["certs", "init", "--dir", str(directory)], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "ca.pem already exists" in err

    code, _out, _err = _cli(["certs", "init", "--dir", str(directory), "--force"], capsys)
    assert code == 0


def test_cli_issue_client_revoke_and_show(
    pki_dir: pki.PKIPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(pki_dir.directory)
    code, out, err = _cli(
        [
            *("certs", "issue-client", "carol-tablet", "--user", "carol"),
            *("--email", "c@x.test", "--days", "30", "--dir", d),
        ],
        capsys,
    )
    assert code == 0 and err == ""
    pem = pki_dir.client_paths("carol-tablet")[0]
    assert str(pem) in out
    cert = pki.load_certificate(pem)

    code, out, err = _cli(
        ["certs", "issue-client", "carol-tablet", "--user", "c", "--dir", d], capsys
    )
    assert code == 2 and "already exists" in err

    code, out, err = _cli(["certs", "show", str(pem)], capsys)
    assert code == 0
    assert "CN=carol-tablet" in out and "UID=carol" in out
    assert "URI:urn:ztgw:device:carol-tablet" in out and "email:c@x.test" in out
    assert f"{cert.serial_number:x}" in out
    assert pki.fingerprint_sha256(cert) in out
    assert "clientAuth" in out and "status:      valid" in out
    assert cert.not_valid_after_utc.isoformat() in out

    code, out, err = _cli(["certs", "revoke", "carol-tablet", "--dir", d], capsys)
    assert code == 0
    assert f"serial {cert.serial_number:x}" in out and "reload" in out
    crl = x509.load_pem_x509_crl(pki_dir.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

    code, out, err = _cli(["certs", "revoke", "nobody", "--dir", d], capsys)
    assert code == 2 and err.startswith("error: unknown client")

    code, out, err = _cli(["certs", "crl", "--dir", d], capsys)
    assert code == 0 and "1 revoked" in out


def test_cli_show_server_cert_and_unreadable_input(
    pki_dir: pki.PKIPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _err = _cli(["certs", "show", str(pki_dir.server_cert)], capsys)
    assert code == 0 and "DNS:localhost" in out and "IP:127.0.0.1" in out and "serverAuth" in out

    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    for path in (junk, tmp_path / "missing.pem"):
        code, out, err = _cli(["certs", "show", str(path)], capsys)
        assert code == 2 and out == "" and err.startswith("error: ")


def test_cli_issue_client_rejects_non_positive_days(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli(["certs", "issue-client", "x", "--user", "u", "--days", "0"], capsys)
    assert exc.value.code == 2
    assert "must be positive" in capsys.readouterr().err


def test_describe_reports_expired_certificates(ca: pki.CertificateAuthority) -> None:
    expired = ca.issue_client("old", user="u", not_after=dt.datetime.now(UTC) - dt.timedelta(1))
    assert "status:      expired" in certs_cmd.describe(expired.cert)
    future = ca.issue_client("new", user="u", not_before=dt.datetime.now(UTC) + dt.timedelta(1))
    assert "status:      not yet valid" in certs_cmd.describe(future.cert)


# -- renewal: `make run` a year from now still starts (certs init --renew)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_renew_makes_a_pki_where_there_is_none(tmp_path: Path) -> None:
    renewal = pki.renew_pki(tmp_path / "certs")
    assert renewal.created and renewal.reason == "no CA"
    assert pki.PKIPaths(tmp_path / "certs").ca_cert.exists()


def test_renew_leaves_a_fresh_pki_alone(tmp_path: Path) -> None:
    clock = ManualClock(dt.datetime(2031, 3, 3, 12, 0, tzinfo=UTC))
    paths = pki.init_pki(tmp_path, clock=clock)
    before = {p: p.read_bytes() for p in paths.directory.rglob("*") if p.is_file()}
    clock.advance(86400 * 200)
    assert pki.renew_pki(tmp_path, clock=clock) == pki.Renewal()
    assert {p: p.read_bytes() for p in paths.directory.rglob("*") if p.is_file()} == before


def test_renew_reissues_what_expires_soon_and_keeps_identities_and_revocations(
    tmp_path: Path,
) -> None:
    clock = ManualClock(dt.datetime(2031, 3, 3, 12, 0, tzinfo=UTC))
    paths = pki.init_pki(tmp_path, clock=clock)
    pki.issue_client(tmp_path, "carol-tab", user="carol", email="carol@corp.test", clock=clock)
    pki.revoke(tmp_path, "bob-phone", clock=clock)
    ca_before, server_before = _cert(paths.ca_cert), _cert(paths.server_cert)
    bob_before = _cert(paths.client_paths("bob-phone")[0])
    clock.advance(86400 * 350)  # client certificates (365 days) and the CRL are 15 days from expiry

    renewal = pki.renew_pki(tmp_path, clock=clock)

    assert not renewal.created
    assert set(renewal.renewed) == {"alice-laptop", "carol-tab", "crl"}
    assert _cert(paths.ca_cert) == ca_before and _cert(paths.server_cert) == server_before
    assert _cert(paths.client_paths("bob-phone")[0]) == bob_before  # revoked stays revoked
    now = clock.now()
    carol = _cert(paths.client_paths("carol-tab")[0])
    assert carol.not_valid_before_utc <= now < carol.not_valid_after_utc - dt.timedelta(days=300)
    assert carol.subject.get_attributes_for_oid(NameOID.USER_ID)[0].value == "carol"
    san = carol.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["carol@corp.test"]
    assert pki.CertificateAuthority.load(paths.ca_cert, paths.ca_key).issued(carol)
    bundle = pkcs12.load_key_and_certificates(
        paths.client_paths("carol-tab")[2].read_bytes(), pki.P12_PASSWORD.encode()
    )
    assert bundle[1] == carol  # the .p12 was re-made with the new certificate and key
    crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    assert crl.next_update_utc is not None and crl.next_update_utc > now + dt.timedelta(days=300)
    assert crl.get_revoked_certificate_by_serial_number(bob_before.serial_number) is not None


def test_renew_replaces_a_pki_whose_ca_is_about_to_expire(tmp_path: Path) -> None:
    clock = ManualClock(dt.datetime(2031, 3, 3, 12, 0, tzinfo=UTC))
    paths = pki.init_pki(tmp_path, clock=clock)
    old_ca = _cert(paths.ca_cert)
    clock.advance(86400 * (3650 - 10))
    renewal = pki.renew_pki(tmp_path, clock=clock)
    assert renewal.created and "CA valid until" in renewal.reason
    new_ca = _cert(paths.ca_cert)
    assert new_ca != old_ca and new_ca.not_valid_after_utc > clock.now() + dt.timedelta(days=3000)
    alice = _cert(paths.client_paths("alice-laptop")[0])
    assert pki.CertificateAuthority.load(paths.ca_cert, paths.ca_key).issued(alice)


def test_cli_init_renew_is_quiet_when_nothing_is_due(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    certs_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["certs", "init", "--renew", "--dir", str(tmp_path)])
    assert args.func(args) == 0
    assert "created a development PKI" in capsys.readouterr().out
    args = parser.parse_args(["certs", "init", "--renew", "--dir", str(tmp_path)])
    assert args.func(args) == 0
    assert capsys.readouterr().out == ""
