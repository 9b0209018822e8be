"""Forward-auth believes a forwarded certificate only as the listener would (security review H1).

Calls go straight to `/forward-auth` on a real gateway's ops listener from the trusted edge's
address (127.0.0.1), the way nginx's `auth_request` calls it; the certificates are the session
PKI's and a foreign "Mallory CA". tests/e2e/test_forward_auth_nginx.py runs the same through a
real nginx.
"""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import GatewayFactory
from tests.e2e.test_mtls import eventually, revoke
from tests.support import Certs, audit_event, metric
from ztgateway.app import Gateway
from ztgateway.dev.pki import CertificateAuthority, atomic_write

NGINX_EDGE = {
    "enabled": True,
    "trusted_proxies": ["127.0.0.1/32"],
    "edge": "nginx",
    "cert_header": "X-SSL-Client-Cert",
}
TRAEFIK_EDGE = {**NGINX_EDGE, "edge": "traefik", "cert_header": "X-Forwarded-Tls-Client-Cert"}


def pem_of(certs: Certs, name: str) -> bytes:
    return certs.client(name)[0].read_bytes()


def nginx_value(pem: bytes) -> str:
    return quote(pem.decode())


def traefik_value(*pems: bytes) -> str:
    ders = [
        x509.load_pem_x509_certificate(p).public_bytes(serialization.Encoding.DER) for p in pems
    ]
    return quote(",".join(base64.b64encode(d).decode() for d in ders))


async def ask(
    gw: Gateway, headers: dict[str, str], *, uri: str = "/echo", edge: str = "nginx"
) -> tuple[int, dict[str, str], dict[str, Any] | None]:
    base = (
        {"X-Original-URI": uri, "X-Original-Method": "GET", "X-Forwarded-For": "10.1.2.3"}
        if edge == "nginx"
        else {"X-Forwarded-Uri": uri, "X-Forwarded-Method": "GET", "X-Forwarded-For": "10.1.2.3"}
    )
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"http://127.0.0.1:{gw.ops_port}/forward-auth",
            headers={**base, "Accept": "application/json", **headers},
        ) as r,
    ):
        body = await r.json(content_type=None) if r.status != 200 else None
        return r.status, dict(r.headers), body


async def refused(gw: Gateway, headers: dict[str, str], reason: str, **kw: Any) -> str:
    status, _, body = await ask(gw, headers, **kw)
    assert status in (401, 403), (status, body)
    assert body is not None and body["reason"] == reason, body
    event = await audit_event(gw, body["decision_id"])
    assert event["result"]["reason"] == reason
    detail: str = event["result"]["findings"][-1].get("detail", "")
    return detail


@pytest.fixture
async def edge_gw(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory({"forward_auth": NGINX_EDGE})


async def test_certificate_of_our_ca_in_the_configured_header_is_the_identity(
    edge_gw: Gateway, certs: Certs
) -> None:
    status, headers, _ = await ask(
        edge_gw, {"X-SSL-Client-Cert": nginx_value(pem_of(certs, "alice-laptop"))}
    )
    assert status == 200
    assert headers["X-Forwarded-User"] == "alice"
    assert headers["X-ZT-Device-Id"] == "alice-laptop"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("mallory-laptop", "not verified"),  # another CA, UID=alice
        ("old-laptop", "not valid at validation time"),  # expired
        ("server-cert-as-client", "EKU"),  # serverAuth only
    ],
)
async def test_certificate_the_listener_would_refuse_is_refused_in_a_header(
    edge_gw: Gateway, certs: Certs, name: str, why: str
) -> None:
    detail = await refused(
        edge_gw, {"X-SSL-Client-Cert": nginx_value(pem_of(certs, name))}, "client-cert-invalid"
    )
    assert why in detail
    assert (
        metric(
            edge_gw,
            "ztgw_requests_total",
            route="-",
            verdict="deny",
            reason="client-cert-invalid",
        )
        == 1
    )


async def test_ca_certificate_is_not_a_client_certificate(edge_gw: Gateway, certs: Certs) -> None:
    detail = await refused(
        edge_gw, {"X-SSL-Client-Cert": nginx_value(certs.ca.read_bytes())}, "client-cert-invalid"
    )
    assert "cA" in detail or "CA" in detail


async def test_revoked_certificate_in_a_header_is_refused(
    edge_gw: Gateway, certs: Certs, tmp_path: Path
) -> None:
    await revoke(edge_gw, certs, tmp_path, "stolen-laptop")
    await refused(
        edge_gw,
        {"X-SSL-Client-Cert": nginx_value(pem_of(certs, "stolen-laptop"))},
        "client-cert-revoked",
    )


async def test_expired_crl_refuses_forwarded_certificates_as_the_listener_does(
    edge_gw: Gateway, certs: Certs, tmp_path: Path
) -> None:
    ca = CertificateAuthority.load(certs.ca, certs.ca_key)
    stale = ca.crl(
        [], last_update=dt.datetime.now(dt.UTC) - dt.timedelta(days=3), next_update_days=1
    )
    atomic_write(tmp_path / "ca.crl", stale.public_bytes(serialization.Encoding.PEM))

    async def reloaded() -> bool:
        nu = edge_gw.tls.current.revocations.next_update
        return nu is not None and nu < edge_gw.clock.time()

    await eventually(reloaded, "gateway loaded the stale CRL")
    detail = await refused(
        edge_gw,
        {"X-SSL-Client-Cert": nginx_value(pem_of(certs, "alice-laptop"))},
        "client-cert-invalid",
    )
    assert "CRL" in detail


@pytest.mark.parametrize(
    "header",
    [
        "X-Forwarded-Tls-Client-Cert",
        "X-Client-Cert",
        "Client-Cert",
        "X-ARR-ClientCert",
        "SSL_CLIENT_CERT",
    ],
)
async def test_certificate_in_any_other_header_is_refused_not_ignored(
    edge_gw: Gateway, certs: Certs, header: str
) -> None:
    detail = await refused(
        edge_gw, {header: traefik_value(pem_of(certs, "alice-laptop"))}, "header-spoofed"
    )
    assert header in detail


async def test_without_a_configured_header_no_certificate_header_is_believed(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory({"forward_auth": {**NGINX_EDGE, "cert_header": ""}})
    await refused(
        gw, {"X-SSL-Client-Cert": nginx_value(pem_of(certs, "alice-laptop"))}, "header-spoofed"
    )
    # Without any certificate the route that needs one says so.
    await refused(gw, {}, "client-cert-required")


async def test_certificate_header_twice_is_refused(edge_gw: Gateway, certs: Certs) -> None:
    alice = nginx_value(pem_of(certs, "alice-laptop"))
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"http://127.0.0.1:{edge_gw.ops_port}/forward-auth",
            headers=[
                ("X-Original-URI", "/echo"),
                ("X-SSL-Client-Cert", alice),
                ("X-SSL-Client-Cert", nginx_value(pem_of(certs, "carol-laptop"))),
            ],
        ) as r,
    ):
        assert r.status == 403
        assert (await r.json(content_type=None))["reason"] == "header-spoofed"


async def test_only_the_configured_edges_request_headers_are_read(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    """Behind Traefik a client's X-Original-URI is the client's: it must not choose the route."""
    gw = await gateway_factory({"forward_auth": TRAEFIK_EDGE})
    cert = {"X-Forwarded-Tls-Client-Cert": traefik_value(pem_of(certs, "alice-laptop"))}
    status, headers, _ = await ask(gw, cert, uri="/echo", edge="traefik")
    assert status == 200 and headers["X-Forwarded-User"] == "alice"
    detail = await refused(
        gw, {**cert, "X-Original-URI": "/echo"}, "header-spoofed", uri="/admin/echo", edge="traefik"
    )
    assert "X-Original-URI" in detail
    # Without the edge's own URI header there is no request to decide for.
    await refused(gw, cert, "request-invalid", edge="nginx")


async def edge_with_intermediate(
    gateway_factory: GatewayFactory, certs: Certs, edge: dict[str, Any], client_ca: Path
) -> tuple[Gateway, CertificateAuthority, bytes]:
    """A gateway trusting `client_ca` (no CRL), an intermediate of the session CA, a leaf of it."""
    inter = CertificateAuthority.load(certs.ca, certs.ca_key).issue_intermediate()
    leaf = inter.issue_client("dave-laptop", user="dave").cert_pem()
    if client_ca != certs.ca:
        client_ca.write_bytes(certs.ca.read_bytes() + inter.cert_pem())
    tls = {"cert": str(certs.server), "key": str(certs.server_key), "client_ca": str(client_ca)}
    gw = await gateway_factory({"forward_auth": edge}, replace={"tls": tls})
    return gw, inter, leaf


async def test_intermediate_in_the_client_ca_bundle_builds_the_path(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    gw, _, leaf_pem = await edge_with_intermediate(
        gateway_factory, certs, NGINX_EDGE, tmp_path / "bundle.pem"
    )
    status, headers, _ = await ask(gw, {"X-SSL-Client-Cert": nginx_value(leaf_pem)})
    assert status == 200
    assert headers["X-Forwarded-User"] == "dave"


async def test_intermediate_sent_by_the_edge_builds_the_path_but_never_anchors_it(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    gw, inter, leaf_pem = await edge_with_intermediate(
        gateway_factory, certs, TRAEFIK_EDGE, certs.ca
    )
    header = "X-Forwarded-Tls-Client-Cert"
    status, headers, _ = await ask(
        gw, {header: traefik_value(leaf_pem, inter.cert_pem())}, edge="traefik"
    )
    assert status == 200 and headers["X-Forwarded-User"] == "dave"
    await refused(gw, {header: traefik_value(leaf_pem)}, "client-cert-invalid", edge="traefik")
    # A self-made CA sent along with its leaf is an intermediate at most, never a trust anchor.
    mallory = CertificateAuthority.generate("Mallory CA")
    forged = mallory.issue_client("alice-laptop", user="alice")
    await refused(
        gw,
        {header: traefik_value(forged.cert_pem(), mallory.cert_pem())},
        "client-cert-invalid",
        edge="traefik",
    )


async def test_flood_of_invalid_certificates_from_one_address_is_throttled_before_verifying(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(
        {
            "forward_auth": NGINX_EDGE,
            "server": {"invalid_credentials_limit": 3, "invalid_credentials_window": 60},
        }
    )
    forged = {"X-SSL-Client-Cert": nginx_value(pem_of(certs, "mallory-laptop"))}
    for _ in range(3):
        await refused(gw, forged, "client-cert-invalid")
    await refused(gw, forged, "credentials-throttled")
    # Even a good certificate from that address waits; another address is served.
    good = {"X-SSL-Client-Cert": nginx_value(pem_of(certs, "alice-laptop"))}
    await refused(gw, good, "credentials-throttled")
    status, headers, _ = await ask(gw, {**good, "X-Forwarded-For": "10.9.9.9"})
    assert status == 200 and headers["X-Forwarded-User"] == "alice"
