"""The WebAuthn relying party (ztgateway/credentials/webauthn.py) against a software authenticator, on both
store backends (a real SQLite file, a real redis-server), with the gateway's ManualClock.

The authenticator below builds what a CTAP2 authenticator and the browser would (W3C WebAuthn
Level 2 §6.1 authenticator data, §6.5 attestation object with the "none" format, §5.8.1 client
data) with `cryptography` and `cbor2`, so each check of §7.1/§7.2 can be broken one at a time.
The browser flows themselves are clicked in Chromium (tests/e2e/test_webauthn_browser.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ztgateway.clock import ManualClock
from ztgateway.config import WebAuthnConfig
from ztgateway.credentials.webauthn import WebAuthn, WebAuthnRefused
from ztgateway.decision import Reason
from ztgateway.store.base import MAX_WEBAUTHN_CREDENTIALS
from ztgateway.store.redis import RedisStore
from ztgateway.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from tests.redis_server import RedisServerFactory

ORIGIN = "https://gw.example.test"
RP_ID = "gw.example.test"
UP, UV, AT = 0x01, 0x04, 0x40


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class SoftKey:
    """One credential of a software authenticator."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    credential_id: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    counter: int = 0

    def cose(self) -> bytes:
        n = self.key.public_key().public_numbers()
        return cbor2.dumps(
            {1: 2, 3: -7, -1: 1, -2: n.x.to_bytes(32, "big"), -3: n.y.to_bytes(32, "big")}
        )

    def create(
        self, options: str, *, origin: str = ORIGIN, rp_id: str = RP_ID, flags: int = UP | UV | AT
    ) -> dict[str, Any]:
        challenge = json.loads(options)["challenge"]
        client = json.dumps({"type": "webauthn.create", "challenge": challenge, "origin": origin, "crossOrigin": False}).encode()  # fmt: skip
        auth = (
            hashlib.sha256(rp_id.encode()).digest() + bytes([flags]) + struct.pack(">I", self.counter)
            + bytes(16) + struct.pack(">H", len(self.credential_id)) + self.credential_id + self.cose()
        )  # fmt: skip
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth})
        return self.answer(
            clientDataJSON=b64(client), attestationObject=b64(attestation), transports=["usb"]
        )

    def answer(self, **response: Any) -> dict[str, Any]:
        """A PublicKeyCredential as the browser's toJSON() gives it."""
        return {
            "id": b64(self.credential_id),
            "rawId": b64(self.credential_id),
            "type": "public-key",
            "clientExtensionResults": {},
            "response": response,
        }

    def get(
        self,
        options: str,
        *,
        origin: str = ORIGIN,
        rp_id: str = RP_ID,
        flags: int = UP | UV,
        counter: int | None = None,
    ) -> dict[str, Any]:
        self.counter = self.counter + 1 if counter is None else counter
        challenge = json.loads(options)["challenge"]
        client = json.dumps({"type": "webauthn.get", "challenge": challenge, "origin": origin, "crossOrigin": False}).encode()  # fmt: skip
        auth = (
            hashlib.sha256(rp_id.encode()).digest()
            + bytes([flags])
            + struct.pack(">I", self.counter)
        )
        signature = self.key.sign(auth + hashlib.sha256(client).digest(), ec.ECDSA(hashes.SHA256()))
        return self.answer(
            clientDataJSON=b64(client),
            authenticatorData=b64(auth),
            signature=b64(signature),
            userHandle=None,
        )


@dataclass
class RP:
    webauthn: WebAuthn
    other_replica: WebAuthn
    clock: ManualClock


@pytest.fixture(params=["sqlite", "redis"])
async def rp(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server_factory: RedisServerFactory
) -> AsyncIterator[RP]:
    """Two relying parties (two processes, or two replicas) on one store backend."""
    clock = ManualClock(time.time())
    if request.param == "redis":
        server = redis_server_factory()
        stores: list[Any] = [RedisStore(server.url, clock=clock) for _ in range(2)]
    else:
        stores = [SQLiteStore(tmp_path / "state.db", clock=clock) for _ in range(2)]
    for s in stores:
        await s.open()
    cfg = WebAuthnConfig(rp_id=RP_ID, origins=(ORIGIN,), challenge_ttl=300.0)
    key = secrets.token_bytes(32)
    yield RP(WebAuthn(lambda: cfg, stores[0], key), WebAuthn(lambda: cfg, stores[1], key), clock)
    for s in stores:
        await s.close()


async def enrolled(rp: RP, user: str = "alice", binding: str = "sess-1") -> SoftKey:
    key = SoftKey()
    options = await rp.webauthn.registration_options(user, binding, rp.clock.time())
    await rp.webauthn.register(user, binding, key.create(options), "key", rp.clock.time())
    return key


async def refused(call: Any) -> Reason:
    with pytest.raises(WebAuthnRefused) as info:
        await call
    return info.value.reason


async def test_a_key_registers_and_authenticates_on_another_replica(rp: RP) -> None:
    key = await enrolled(rp)
    now = rp.clock.time()
    options = await rp.webauthn.authentication_options("alice", "sess-1", now)
    assert options is not None
    assert json.loads(options)["allowCredentials"][0]["id"] == b64(key.credential_id)
    verified = await rp.other_replica.authenticate("alice", "sess-1", key.get(options), now)
    assert verified.user_verified and verified.credential.user == "alice"
    (stored,) = await rp.webauthn.credentials("alice")
    assert stored.sign_count == 1 and stored.last_used_at == now


async def test_a_challenge_is_single_use(rp: RP) -> None:
    key = await enrolled(rp)
    now = rp.clock.time()
    options = await rp.webauthn.authentication_options("alice", "sess-1", now)
    assert options is not None
    answer = key.get(options)
    await rp.webauthn.authenticate("alice", "sess-1", answer, now)
    reason = await refused(rp.other_replica.authenticate("alice", "sess-1", answer, now))
    assert reason is Reason.WEBAUTHN_CHALLENGE_INVALID


async def test_a_challenge_is_bound_to_the_session_that_asked_for_it(rp: RP) -> None:
    key = await enrolled(rp)
    now = rp.clock.time()
    options = await rp.webauthn.authentication_options("alice", "sess-1", now)
    assert options is not None
    answer = key.get(options)
    assert await refused(rp.webauthn.authenticate("alice", "sess-2", answer, now)) is (
        Reason.WEBAUTHN_CHALLENGE_INVALID
    )
    # Not burnt for its own session by the other one's attempt.
    await rp.webauthn.authenticate("alice", "sess-1", answer, now)


async def test_a_challenge_expires_by_the_gateway_clock(rp: RP) -> None:
    key = await enrolled(rp)
    options = await rp.webauthn.authentication_options("alice", "sess-1", rp.clock.time())
    assert options is not None
    rp.clock.advance(301)
    reason = await refused(
        rp.webauthn.authenticate("alice", "sess-1", key.get(options), rp.clock.time())
    )
    assert reason is Reason.WEBAUTHN_CHALLENGE_INVALID
    registration = await rp.webauthn.registration_options("bob", "sess-9", rp.clock.time())
    rp.clock.advance(301)
    reason = await refused(
        rp.webauthn.register("bob", "sess-9", SoftKey().create(registration), "", rp.clock.time())
    )
    assert reason is Reason.WEBAUTHN_CHALLENGE_INVALID


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ({"origin": "https://evil.example.test"}, Reason.WEBAUTHN_ORIGIN_MISMATCH),
        ({"origin": "https://gw.example.test:8443"}, Reason.WEBAUTHN_ORIGIN_MISMATCH),
        ({"rp_id": "example.test"}, Reason.WEBAUTHN_ORIGIN_MISMATCH),
        ({"flags": UP}, Reason.WEBAUTHN_UV_REQUIRED),
        ({"flags": UV}, Reason.WEBAUTHN_INVALID),  # no user presence
    ],
)
async def test_an_assertion_that_fails_a_check_is_refused_with_its_reason(
    rp: RP, tamper: dict[str, Any], reason: Reason
) -> None:
    key = await enrolled(rp)
    now = rp.clock.time()
    options = await rp.webauthn.authentication_options("alice", "sess-1", now, require_uv=True)
    assert options is not None and json.loads(options)["userVerification"] == "required"
    assert (
        await refused(rp.webauthn.authenticate("alice", "sess-1", key.get(options, **tamper), now))
        is reason
    )
    (stored,) = await rp.webauthn.credentials("alice")
    assert stored.sign_count == 0 and stored.last_used_at is None


async def test_a_counter_going_back_is_a_cloned_key(rp: RP) -> None:
    key = await enrolled(rp)
    now = rp.clock.time()

    async def answer(counter: int) -> dict[str, Any]:
        options = await rp.webauthn.authentication_options("alice", "sess-1", now)
        assert options is not None
        return key.get(options, counter=counter)

    await rp.webauthn.authenticate("alice", "sess-1", await answer(5), now)
    for counter in (5, 3, 0):
        reason = await refused(
            rp.other_replica.authenticate("alice", "sess-1", await answer(counter), now)
        )
        assert reason is Reason.WEBAUTHN_CLONED, counter
    assert (await rp.webauthn.credentials("alice"))[0].sign_count == 5
    await rp.other_replica.authenticate("alice", "sess-1", await answer(6), now)


async def test_a_signature_by_another_key_is_invalid_not_cloned(rp: RP) -> None:
    key = await enrolled(rp)
    forger = SoftKey(credential_id=key.credential_id)
    options = await rp.webauthn.authentication_options("alice", "sess-1", rp.clock.time())
    assert options is not None
    answer = forger.get(options, counter=0)
    assert await refused(rp.webauthn.authenticate("alice", "sess-1", answer, rp.clock.time())) is (
        Reason.WEBAUTHN_INVALID
    )


async def test_another_users_key_is_unknown_for_this_user(rp: RP) -> None:
    bobs = await enrolled(rp, "bob", "sess-b")
    await enrolled(rp, "alice", "sess-a")
    options = await rp.webauthn.authentication_options("alice", "sess-a", rp.clock.time())
    assert options is not None
    assert (
        await refused(
            rp.webauthn.authenticate("alice", "sess-a", bobs.get(options), rp.clock.time())
        )
        is Reason.WEBAUTHN_CREDENTIAL_UNKNOWN
    )


@pytest.mark.parametrize(
    "answer",
    [
        None,
        "text",
        [],
        {},
        {"id": "x", "rawId": "y", "type": "public-key", "response": {}},
        {
            "id": "!!",
            "rawId": "!!",
            "type": "public-key",
            "response": {
                "clientDataJSON": "e30",
                "authenticatorData": 5,
                "signature": "",
                "userHandle": None,
            },
        },
    ],
)
async def test_a_malformed_answer_is_refused_never_raised(rp: RP, answer: Any) -> None:
    await enrolled(rp)
    now = rp.clock.time()
    options = await rp.webauthn.authentication_options("alice", "sess-1", now)
    assert options is not None
    reason = await refused(rp.webauthn.authenticate("alice", "sess-1", answer, now))
    assert reason in (Reason.WEBAUTHN_INVALID, Reason.WEBAUTHN_CREDENTIAL_UNKNOWN)
    registration = await rp.webauthn.registration_options("alice", "sess-1", now)
    assert json.loads(registration)["excludeCredentials"], "the registered key is excluded"
    assert await refused(rp.webauthn.register("alice", "sess-1", answer, "", now)) is (
        Reason.WEBAUTHN_INVALID
    )


async def test_registration_is_refused_for_another_origin_or_without_user_verification(
    rp: RP,
) -> None:
    now = rp.clock.time()
    options = await rp.webauthn.registration_options("alice", "s", now)
    answer = SoftKey().create(options, origin="https://evil.example.test")
    assert await refused(rp.webauthn.register("alice", "s", answer, "", now)) is (
        Reason.WEBAUTHN_ORIGIN_MISMATCH
    )
    options = await rp.webauthn.registration_options("alice", "s", now, require_uv=True)
    answer = SoftKey().create(options, flags=UP | AT)
    assert await refused(rp.webauthn.register("alice", "s", answer, "", now)) is (
        Reason.WEBAUTHN_UV_REQUIRED
    )
    assert await rp.webauthn.credentials("alice") == []


async def test_the_same_key_cannot_be_registered_twice_and_names_are_cleaned(rp: RP) -> None:
    key = SoftKey()
    now = rp.clock.time()
    options = await rp.webauthn.registration_options("alice", "s", now)
    added = await rp.webauthn.register(
        "alice", "s", key.create(options), " My\x00 key\n" + "x" * 99, now
    )
    assert added.name == ("My key" + "x" * 99)[:64]
    options = await rp.webauthn.registration_options("bob", "t", now)
    assert await refused(rp.webauthn.register("bob", "t", key.create(options), "", now)) is (
        Reason.WEBAUTHN_CREDENTIAL_REFUSED
    )
    assert MAX_WEBAUTHN_CREDENTIALS >= 2


def test_user_handles_are_opaque_and_stable() -> None:
    cfg = WebAuthnConfig(rp_id=RP_ID, origins=(ORIGIN,))
    a = WebAuthn(lambda: cfg, None, b"k" * 32)  # type: ignore[arg-type]
    assert a.user_handle("alice") == a.user_handle("alice") != a.user_handle("bob")
    assert b"alice" not in a.user_handle("alice") and len(a.user_handle("alice")) == 32
