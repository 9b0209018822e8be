"""What an attacker tries at the gateway's edges (issue 18, "Beyond the examples").

Headers an upstream trusts for identity, the original URL or the client's address; Host and SNI
that are not the gateway's; CA certificates as client certificates; key-exchange groups outside
X25519/P-256/P-384; floods of invalid credentials; the security headers of what the gateway
answers itself. A real gateway with the session PKI, the recording demo upstream.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e.test_mtls import attempt, tls_client
from tests.e2e.test_proxy import (
    ProxyFactory,
    RecordingUpstream,
    audit_event,
    exchange,
    finding_reasons,
    metric,
    request_bytes,
)
from tests.support import Certs, Reply, client_ssl
from ztgateway.app import Gateway
from ztgateway.dev.pki import CertificateAuthority
from ztgateway.dev.tokens import issue_token

# ------------------------------------------------------------------------------------------
# headers that speak for someone


SPOOFABLE = [
    "X-Remote-User",
    "Remote-User",
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-MS-CLIENT-PRINCIPAL-NAME",
    "X-MS-CLIENT-PRINCIPAL",
    "X-Amzn-Oidc-Identity",
    "X-Goog-Authenticated-User-Email",
    "Cf-Access-Authenticated-User-Email",
    "X-WEBAUTH-USER",
    "X-Authenticated-Userid",
    "X-Consumer-Username",
    "X-Forwarded-Preferred-Username",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Original-Method",
    "X-HTTP-Method-Override",
    "X-Forwarded-Uri",
    "True-Client-IP",
    "CF-Connecting-IP",
    "Fastly-Client-IP",
    "X-Cluster-Client-IP",
    "X-Real-IP",
    "X-Client-Cert",
    "Client-Cert",
    "SSL_CLIENT_CERT",
    "X-ARR-ClientCert",
    "X-Forwarded-Client-Cert",
    "X-Amzn-Mtls-Clientcert",
    "X-SSL-Client-S-DN",
    "Front-End-Https",
]


@pytest.mark.parametrize("name", SPOOFABLE)
async def test_vendor_identity_url_address_and_certificate_headers_are_stripped_and_audited(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, name: str
) -> None:
    gw = await proxy()
    r = await exchange(certs, gw, request_bytes("/echo", f"{name}: admin"))
    assert r.status == 200, r.body
    seen = json.loads(r.body)["headers_map"]
    assert name.lower() not in seen
    assert name.lower().replace("_", "-") not in seen
    event = await audit_event(gw, r.headers["X-ZT-Decision-Id"])
    spoofing = [f for f in event["result"]["findings"] if f["reason"] == "header-spoofed"]
    assert spoofing and name in spoofing[0]["detail"]
    assert metric(gw, "ztgw_spoofed_headers_total") == 1


async def test_vendor_header_is_refused_in_deny_mode(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy({"server": {"spoofed_headers": "deny"}})
    r = await exchange(certs, gw, request_bytes("/echo", "X-MS-CLIENT-PRINCIPAL-NAME: admin"))
    assert r.status == 400
    assert r.problem()["reason"] == "header-spoofed"
    assert recording.hits == []


async def test_a_routes_own_identity_header_names_are_the_gateways_alone(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    """An operator's custom header (X-Corp-User) is set by the gateway only when there is a
    user: a client's copy used to reach the upstream whenever the gateway asserted none."""
    gw = await proxy(
        {
            "routes": [
                {
                    "name": "app",
                    "prefix": "/",
                    "upstream": "demo",
                    "policy": {"allow_cert_identity": False},
                    "headers": {"user": "X-Corp-User", "groups": "X-Corp-Roles"},
                }
            ]
        }
    )
    r = await exchange(
        certs, gw, request_bytes("/echo", "X-Corp-User: admin", "X-Corp-Roles: admins")
    )
    assert r.status == 200, r.body
    seen = json.loads(r.body)["headers_map"]
    assert "x-corp-user" not in seen and "x-corp-roles" not in seen
    event = await audit_event(gw, r.headers["X-ZT-Decision-Id"])
    assert "header-spoofed" in finding_reasons(event)
    token = issue_token(certs.issuer_key, sub="alice", groups=["eng"])
    r = await exchange(certs, gw, request_bytes("/echo", f"Authorization: Bearer {token}"))
    seen = json.loads(r.body)["headers_map"]
    assert seen["x-corp-user"] == "alice" and seen["x-corp-roles"] == "eng"


# ------------------------------------------------------------------------------------------
# Host and SNI


@pytest.mark.parametrize(
    "host", ["evil.example", "127.0.0.1.evil.example", "localhost.evil", "[::2]", "10.0.0.1"]
)
async def test_host_that_is_not_the_gateways_is_misdirected_and_never_forwarded(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, host: str
) -> None:
    gw = await proxy()
    request = f"GET /echo HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n\r\n"
    r = await exchange(certs, gw, request.encode())
    assert r.status == 421
    problem = r.problem()
    assert problem["reason"] == "host-misdirected"
    event = await audit_event(gw, problem["decision_id"])
    assert event["result"]["reason"] == "host-misdirected"
    assert recording.hits == []


async def test_the_gateways_own_pages_answer_only_for_its_names(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy()
    for path in ("/.ztgw/jwks.json", "/.ztgw/whoami", "/.ztgw/login"):
        request = f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nAccept: application/json\r\n\r\n"
        r = await exchange(certs, gw, request.encode())
        assert r.status == 421, (path, r.status)
        assert r.problem()["reason"] == "host-misdirected"


async def test_the_gateways_names_and_configured_hosts_are_answered(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy()
    for host in ("127.0.0.1", "localhost", "LOCALHOST", f"127.0.0.1:{gw.port}"):
        r = await exchange(certs, gw, f"GET /echo HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert r.status == 200, (host, r.body)
    gw = await proxy({"server": {"hosts": ["gw.corp.example"]}})
    for host, status in (("gw.corp.example", 200), ("localhost", 421), ("x.corp.example", 421)):
        r = await exchange(certs, gw, f"GET /echo HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert r.status == status, host


async def sni_exchange(certs: Certs, gw: Gateway, sni: str, host: str) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=client_ssl(certs), server_hostname=sni
    )
    try:
        writer.write(f"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_host_other_than_the_sni_of_the_connection_is_misdirected(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy({"server": {"hosts": ["localhost", "other.localhost"]}})
    assert (await sni_exchange(certs, gw, "localhost", "localhost")).startswith(b"HTTP/1.1 200")
    fronted = await sni_exchange(certs, gw, "localhost", "other.localhost")
    assert fronted.startswith(b"HTTP/1.1 421"), fronted[:100]
    assert b"host-misdirected" in fronted
    assert recording.paths() == ["/echo"]


# ------------------------------------------------------------------------------------------
# CA certificates as clients


def sub_ca_with_client_auth(certs: Certs, tmp_path: Path) -> tuple[Path, Path]:
    """A CA certificate (cA=TRUE, keyCertSign) that also says clientAuth, signed by our CA:
    the shape of a sub-CA key that left its vault."""
    root = CertificateAuthority.load(certs.ca, certs.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "rogue sub-CA"),
                    x509.NameAttribute(NameOID.USER_ID, "alice"),
                ]
            )
        )
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.cert.public_key()),  # type: ignore[arg-type]
            False,
        )
        .sign(root.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem, key_path = tmp_path / "rogue.pem", tmp_path / "rogue.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem, key_path


async def test_ca_certificate_presented_as_a_client_certificate_is_refused(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, tmp_path: Path
) -> None:
    gw = await proxy()
    pem, key = sub_ca_with_client_auth(certs, tmp_path)
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(pem), str(key))
    outcome = await attempt(gw.port or 0, ctx)
    if isinstance(outcome, OSError):
        # OpenSSL refused it at the handshake already: refused either way.
        return
    assert isinstance(outcome, Reply)
    assert outcome.status == 403, outcome.body
    problem = outcome.json()
    assert problem["reason"] == "client-cert-invalid"
    event = await audit_event(gw, problem["decision_id"])
    assert "CA certificate" in event["result"]["findings"][-1]["detail"]
    assert recording.hits == []


# ------------------------------------------------------------------------------------------
# key exchange groups


@pytest.mark.parametrize("group", ["X448", "secp521r1", "ffdhe2048"])
async def test_tls_1_3_client_offering_only_a_group_outside_the_three_is_refused(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream, group: str
) -> None:
    gw = await proxy()
    ctx = tls_client(certs, version=ssl.TLSVersion.TLSv1_3)
    try:
        ctx.set_ecdh_curve(group)  # OpenSSL 3: the client offers this group and no other
    except (ValueError, ssl.SSLError):
        pytest.fail(f"this OpenSSL cannot offer {group}: the test would prove nothing")
    outcome = await attempt(gw.port or 0, ctx)
    assert isinstance(outcome, OSError), f"group {group} accepted: {outcome!r}"


# ------------------------------------------------------------------------------------------
# floods of invalid credentials


async def test_flood_of_invalid_tokens_from_one_address_is_refused_before_verification(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy({"server": {"invalid_credentials_limit": 3}})
    good = issue_token(certs.issuer_key, sub="alice")
    header, payload, _ = good.split(".")
    forged = f"{header}.{payload}.{'A' * 86}"  # right shape, wrong signature: costs a verify
    # Another device at another address: the failures it piles up are its own (they also
    # raise the risk of its user and device), not alice's.
    other = aiohttp.TCPConnector(ssl=client_ssl(certs, "carol-laptop"), local_addr=("127.0.0.2", 0))
    url = f"https://127.0.0.1:{gw.port}/api/echo"
    async with aiohttp.ClientSession(connector=other) as attacker:
        for _ in range(3):
            async with attacker.get(url, headers={"Authorization": f"Bearer {forged}"}) as r:
                assert r.status == 401
                assert (await r.json(content_type=None))["reason"] == "token-signature-invalid"
        verified = metric(
            gw, "ztgw_token_validations_total", issuer="dev", result="token-signature-invalid"
        )
        for _ in range(5):
            async with attacker.get(url, headers={"Authorization": f"Bearer {forged}"}) as r:
                assert r.status == 429
                assert (await r.json(content_type=None))["reason"] == "credentials-throttled"
                assert int(r.headers["Retry-After"]) >= 1
        # Refused without a signature check.
        assert (
            metric(
                gw, "ztgw_token_validations_total", issuer="dev", result="token-signature-invalid"
            )
            == verified
        )
    mine = aiohttp.TCPConnector(ssl=client_ssl(certs), local_addr=("127.0.0.1", 0))
    async with (
        aiohttp.ClientSession(connector=mine) as s,
        s.get(url, headers={"Authorization": f"Bearer {good}"}) as r,
    ):
        assert r.status == 200, await r.text()
    assert [p for p in recording.paths() if p == "/api/echo"] == ["/api/echo"]


# ------------------------------------------------------------------------------------------
# security headers on the gateway's own answers

OWN = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cross-origin-resource-policy": "same-origin",
}


def assert_own_headers(headers: dict[str, str], *, hsts: bool = True) -> None:
    h = {k.lower(): v for k, v in headers.items()}
    for name, value in OWN.items():
        assert h.get(name) == value, (name, h)
    assert "frame-ancestors 'none'" in h["content-security-policy"]
    assert h["referrer-policy"] in ("same-origin", "no-referrer", "strict-origin-when-cross-origin")
    if hsts:
        assert h["strict-transport-security"] == "max-age=31536000"
    else:
        assert "strict-transport-security" not in h


async def test_every_answer_of_the_gateway_itself_carries_the_security_headers(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy()
    answers = [
        await exchange(certs, gw, request_bytes("/api/echo", "Accept: application/json")),  # 401
        await exchange(certs, gw, request_bytes("/%2e%2e/x")),  # 400 path-invalid
        await exchange(certs, gw, request_bytes("/.ztgw/nothing-here")),  # 404
        await exchange(certs, gw, request_bytes("/.ztgw/jwks.json")),  # 200, ours
        await exchange(
            certs, gw, request_bytes("/echo", "Transfer-Encoding: chunked", version="1.0")
        ),
        await exchange(certs, gw, request_bytes("/echo", "Host: evil.example")),
    ]
    for r in answers:
        assert_own_headers(dict(r.headers))
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/metrics", "/admin/devices", "/nothing"):
            async with s.get(f"http://127.0.0.1:{gw.ops_port}{path}") as r:
                assert_own_headers(dict(r.headers), hsts=False)


async def test_hsts_can_be_switched_off_and_widened(
    proxy: ProxyFactory, certs: Certs, recording: RecordingUpstream
) -> None:
    gw = await proxy({"server": {"hsts_max_age": 0}})
    r = await exchange(certs, gw, request_bytes("/api/echo"))
    assert "Strict-Transport-Security" not in r.headers
    gw = await proxy({"server": {"hsts_max_age": 600, "hsts_include_subdomains": True}})
    r = await exchange(certs, gw, request_bytes("/api/echo"))
    assert r.headers["Strict-Transport-Security"] == "max-age=600; includeSubDomains"
