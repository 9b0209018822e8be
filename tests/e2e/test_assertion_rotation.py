"""Rotating the assertion key without a verifier ever meeting an unknown kid: the next key is
published before it signs, the previous one after it stops (docs/deploy.md)."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import GatewayFactory
from tests.support import Certs, session
from ztgateway.configreader import ConfigError


def new_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


async def jwks_and_assertion(gw: object, certs: Certs) -> tuple[list[str], str]:
    port = gw.port  # type: ignore[attr-defined]
    async with session(certs) as s:
        async with s.get(f"https://127.0.0.1:{port}/.ztgw/jwks.json") as r:
            kids = [k["kid"] for k in (await r.json())["keys"]]
        async with s.get(f"https://127.0.0.1:{port}/echo") as r:
            seen = (await r.json())["headers_map"]
    return kids, jwt.get_unverified_header(seen["x-zt-assertion"])["kid"]


async def test_the_next_key_is_published_before_it_signs_and_the_old_one_after(
    gateway_factory: GatewayFactory, certs: Certs, tmp_path: Path
) -> None:
    old, nxt = new_key(tmp_path / "old.key"), new_key(tmp_path / "next.key")
    # Step 1: sign with the old key, publish the next one.
    gw = await gateway_factory({"assertion": {"key": str(old), "also_publish": [str(nxt)]}})
    kids, signing = await jwks_and_assertion(gw, certs)
    assert len(kids) == 2 and kids[0] == signing
    old_kid, next_kid = kids
    await gw.stop()
    # Step 2: sign with the next key, keep publishing the old one (public part is enough).
    old_pub = tmp_path / "old.pub"
    old_pub.write_bytes(
        serialization.load_pem_private_key(old.read_bytes(), None)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    gw = await gateway_factory({"assertion": {"key": str(nxt), "also_publish": [str(old_pub)]}})
    kids, signing = await jwks_and_assertion(gw, certs)
    assert kids == [next_kid, old_kid] and signing == next_kid


async def test_a_published_key_that_is_not_p256_is_a_config_error(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"assertion.also_publish\[0\]"):
        await gateway_factory({"assertion": {"also_publish": [str(bad)]}})
