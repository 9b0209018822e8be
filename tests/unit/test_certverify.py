"""Reading a certificate from an edge's header: formats, sizes, garbage (security review H1).

Verification itself runs against real gateways in tests/e2e/test_security_forward_auth.py.
"""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support import Certs
from ztgateway.edge.certverify import MAX_HEADER_CERT, CertRefused, certs_from_header
from ztgateway.request.headerfamilies import (
    cert_header_problem,
    certificate_header,
    protected_header,
)


def test_nginx_escaped_pem_and_traefik_base64_chain_are_read(certs: Certs) -> None:
    leaf_pem = certs.client("alice-laptop")[0].read_bytes()
    ca_pem = certs.ca.read_bytes()
    leaf, ca = (x509.load_pem_x509_certificate(p) for p in (leaf_pem, ca_pem))
    got = certs_from_header(quote((leaf_pem + ca_pem).decode()), "pem-urlencoded")
    assert got == [leaf, ca]
    b64 = [base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in (leaf, ca)]
    assert certs_from_header(quote(",".join(b64)), "base64-der") == [leaf, ca]
    assert certs_from_header(b64[0], "base64-der") == [leaf]


@pytest.mark.parametrize(
    ("value", "fmt"),
    [
        ("garbage", "pem-urlencoded"),
        ("", "base64-der"),
        ("not base64!", "base64-der"),
        (base64.b64encode(b"not DER").decode(), "base64-der"),
        ("-----BEGIN CERTIFICATE-----%0Axx%0A-----END CERTIFICATE-----", "pem-urlencoded"),
        ("%FF%FE", "pem-urlencoded"),
        ("A" * (MAX_HEADER_CERT + 1), "base64-der"),
    ],
)
def test_unreadable_header_is_a_refusal_not_an_error(value: str, fmt: str) -> None:
    with pytest.raises(CertRefused) as info:
        certs_from_header(value, fmt)  # type: ignore[arg-type]
    assert info.value.reason.value == "client-cert-invalid"


@pytest.mark.parametrize(
    "name",
    [
        "X-SSL-Client-Cert",
        "x-forwarded-tls-client-cert",
        "Client-Cert",
        "SSL_CLIENT_CERT",
        "X-SSL-Client-Verify",
        "X-ARR-ClientCert",
        "X-Amzn-Mtls-Clientcert-Leaf",
    ],
)
def test_certificate_headers_are_one_family_and_all_protected(name: str) -> None:
    assert certificate_header(name) and protected_header(name)


def test_forward_auth_certificate_header_must_be_of_that_family() -> None:
    assert cert_header_problem("nginx", "X-SSL-Client-Cert") is None
    assert cert_header_problem("caddy", "X-Client-Cert") is None
    problem = cert_header_problem("nginx", "X-Device")
    assert problem is not None and "certificate header" in problem
    assert cert_header_problem("nginx", "X SSL") is not None
