"""A device is its key, not only its name (security review L9).

A second certificate the CA issues with an existing device's URI (a mistake, or an attacker who
can get certificates issued) used to inherit that device's approval, posture and session
binding. The registry pins the key at registration; another key is refused until an operator
re-binds the device (CLI or admin API). Real gateway, session PKI, real TLS.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.conftest import GatewayFactory
from tests.support import ADMIN_TOKEN, Certs, audit_event, metric, session
from ztgateway.app import Gateway
from ztgateway.cli import main
from ztgateway.dev.pki import CertificateAuthority, load_private_key

JSON = {"Accept": "application/json"}


async def call(gw: Gateway, certs: Certs, cert: str) -> tuple[int, dict[str, Any]]:
    async with (
        session(certs, cert) as s,
        s.get(f"https://127.0.0.1:{gw.port}/echo", headers=JSON) as r,
    ):
        return r.status, await r.json(content_type=None)


def twin(certs: Certs, name: str) -> str:
    """A certificate from our own CA naming alice-laptop, with a key of its own."""
    clients = certs.dir / "clients"
    if not (clients / f"{name}.pem").exists():
        ca = CertificateAuthority.load(certs.ca, certs.ca_key)
        issued = ca.issue_client("alice-laptop", user="alice")
        issued.write(clients / f"{name}.pem", clients / f"{name}.key")
    return name


def renewed(certs: Certs) -> str:
    """alice-laptop's certificate issued again for the same key (a renewal)."""
    clients = certs.dir / "clients"
    if not (clients / "alice-renewed.pem").exists():
        ca = CertificateAuthority.load(certs.ca, certs.ca_key)
        old = x509.load_pem_x509_certificate(certs.client("alice-laptop")[0].read_bytes())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(old.subject)
            .issuer_name(ca.cert.subject)
            .public_key(old.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=90))
        )
        for ext in old.extensions:
            if not isinstance(ext.value, x509.AuthorityKeyIdentifier):
                builder = builder.add_extension(ext.value, ext.critical)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()),  # type: ignore[arg-type]
            False,
        )
        cert = builder.sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
        (clients / "alice-renewed.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key = load_private_key(certs.client("alice-laptop")[1])
        (clients / "alice-renewed.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return "alice-renewed"


@pytest.fixture
async def gw(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory()


async def test_another_key_under_a_registered_device_id_is_refused_and_audited(
    gw: Gateway, certs: Certs
) -> None:
    assert (await call(gw, certs, "alice-laptop"))[0] == 200
    status, body = await call(gw, certs, twin(certs, "alice-twin"))
    assert status == 403
    assert body["reason"] == "device-key-mismatch"
    event = await audit_event(gw, body["decision_id"])
    assert event["result"]["reason"] == "device-key-mismatch"
    assert (
        metric(gw, "ztgw_requests_total", route="app", verdict="deny", reason="device-key-mismatch")
        == 1
    )
    # The registered device keeps its approval and its key.
    device = gw.store.device("alice-laptop")
    assert device is not None and device.state == "approved"
    assert (await call(gw, certs, "alice-laptop"))[0] == 200


async def test_a_renewed_certificate_with_the_same_key_is_the_same_device(
    gw: Gateway, certs: Certs
) -> None:
    assert (await call(gw, certs, "alice-laptop"))[0] == 200
    status, body = await call(gw, certs, renewed(certs))
    assert status == 200
    event = await audit_event(gw, body["headers_map"]["x-zt-decision-id"])
    assert "certificate changed" in [f.get("detail") for f in event["result"]["findings"]]


async def test_operator_rebinds_a_device_to_its_new_key_through_the_admin_api(
    gw: Gateway, certs: Certs
) -> None:
    await call(gw, certs, "alice-laptop")
    new = twin(certs, "alice-rekeyed")
    url = f"http://127.0.0.1:{gw.ops_port}/admin/devices/alice-laptop/rebind"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={}) as r:
            assert r.status == 401
        # A certificate of another device, or of another CA, is not a rebind.
        for wrong in ("carol-laptop", "mallory-laptop"):
            pem = certs.client(wrong)[0].read_text()
            async with s.post(url, json={"cert_pem": pem}, headers=admin) as r:
                assert r.status == 400, wrong
        pem = certs.client(new)[0].read_text()
        async with s.post(url, json={"cert_pem": pem}, headers=admin) as r:
            assert r.status == 200
            assert (await r.json())["key_sha256"] == gw.store.device("alice-laptop").spki  # type: ignore[union-attr]
    assert (await call(gw, certs, new))[0] == 200
    assert (await call(gw, certs, "alice-laptop"))[0] == 403


async def test_operator_rebinds_a_device_to_the_next_certificate_with_the_cli(
    gw: Gateway, certs: Certs
) -> None:
    await call(gw, certs, "alice-laptop")
    new = twin(certs, "alice-reissued")
    cli = gw.config.file
    assert await asyncio.to_thread(main, ["devices", "rebind", "alice-laptop", "-c", str(cli)]) == 0
    await gw.store.sync()
    assert (await call(gw, certs, new))[0] == 200  # pins this one
    assert (await call(gw, certs, "alice-laptop"))[0] == 403
    pem = str(certs.client("alice-laptop")[0])
    args = ["devices", "rebind", "alice-laptop", "--cert", pem, "-c", str(cli)]
    assert await asyncio.to_thread(main, args) == 0
    await gw.store.sync()
    assert (await call(gw, certs, "alice-laptop"))[0] == 200
    assert await asyncio.to_thread(main, ["devices", "rebind", "nope", "-c", str(cli)]) == 1
