"""The JWKS cache: which keys are usable, static files, and fetching from a real issuer on loopback.

The issuer is a real aiohttp server on 127.0.0.1 whose answers the tests change (rotate keys, go
down, redirect, answer too much or too slowly), and the verifier's clock is injected, so refresh
rate limits and fail-closed ageing are checked exactly, by counting the requests the server saw.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.support import CallableClock
from ztgateway.credentials.jwks import (
    MAX_JWKS_BYTES,
    JwksError,
    jwk_thumbprint,
    load_key_file,
    parse_jwks,
)
from ztgateway.credentials.jwt import IssuerConfig, TokenError, TokenVerifier, VerifiedToken
from ztgateway.decision import Reason

ISSUER = "https://idp.example.test"
AUDIENCE = "gateway"
NOW = 1_700_000_000.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def sign(key: ec.EllipticCurvePrivateKey, kid: str | None, **claims: Any) -> str:
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
        **claims,
    }
    headers = {} if kid is None else {"kid": kid}
    return pyjwt.encode(payload, key, algorithm="ES256", headers=headers)


@pytest.fixture(scope="module")
def ec_keys() -> list[ec.EllipticCurvePrivateKey]:
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]


# --- parsing ---------------------------------------------------------------------------------


def unusable_jwks(good: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    ec_public = ec_jwk(good, "bad")
    y = bytearray(base64.urlsafe_b64decode(ec_public["y"] + "=="))
    y[-1] ^= 0x01
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    strong_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "encryption key": {**ec_public, "use": "enc"},
        "symmetric key": {"kty": "oct", "k": b64url(b"secret" * 8), "kid": "bad"},
        "RSA of 1024 bits": {
            **RSAAlgorithm.to_jwk(small_rsa.public_key(), as_dict=True),
            "kid": "bad",
        },
        "private EC key": {**ECAlgorithm.to_jwk(good, as_dict=True), "kid": "bad"},
        "private RSA key": {**RSAAlgorithm.to_jwk(strong_rsa, as_dict=True), "kid": "bad"},
        "Ed448 key": {
            **OKPAlgorithm.to_jwk(ed448.Ed448PrivateKey.generate().public_key(), as_dict=True),
            "kid": "bad",
        },
        "point off the curve": {**ec_public, "y": b64url(bytes(y))},
        "short coordinate": {**ec_public, "x": ec_public["x"][:-2]},
        "P-521 key": ec_jwk(ec.generate_private_key(ec.SECP521R1()), "bad"),
        "HMAC alg": {**ec_public, "alg": "HS256"},
        "RSA alg on an EC key": {**ec_public, "alg": "RS256"},
        "ES384 alg on a P-256 key": {**ec_public, "alg": "ES384"},
        "verify not in key_ops": {**ec_public, "key_ops": ["encrypt"]},
        "numeric kid": {**ec_public, "kid": 7},
        "unknown kty": {**ec_public, "kty": "XYZ"},
        "RSA modulus not base64url": {"kty": "RSA", "kid": "bad", "n": "***", "e": "AQAB"},
        "padded base64": {**ec_public, "x": ec_public["x"] + "="},
        "not an object": "bad",
    }


@pytest.mark.parametrize(
    "label",
    [
        "encryption key",
        "symmetric key",
        "RSA of 1024 bits",
        "private EC key",
        "private RSA key",
        "Ed448 key",
        "point off the curve",
        "short coordinate",
        "P-521 key",
        "HMAC alg",
        "RSA alg on an EC key",
        "ES384 alg on a P-256 key",
        "verify not in key_ops",
        "numeric kid",
        "unknown kty",
        "RSA modulus not base64url",
        "padded base64",
        "not an object",
    ],
)
def test_unusable_key_is_skipped_and_the_rest_kept(
    ec_keys: list[ec.EllipticCurvePrivateKey], label: str
) -> None:
    bad = unusable_jwks(ec_keys[0])[label]

    key_set = parse_jwks({"keys": [bad, ec_jwk(ec_keys[1], "good", use="sig")]})

    assert list(key_set.keys) == ["good"]


def test_rsa_ec_and_ed25519_signature_keys_are_kept(
    ec_keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    p384 = ec.generate_private_key(ec.SECP384R1())

    key_set = parse_jwks(
        {
            "keys": [
                {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "r"},
                ec_jwk(ec_keys[0], "e", alg="ES256", key_ops=["verify"]),
                ec_jwk(p384, "p"),
                {**OKPAlgorithm.to_jwk(ed_key.public_key(), as_dict=True), "kid": "o"},
            ]
        }
    )

    shapes = {kid: (e.kty, e.crv, e.alg) for kid, e in key_set.keys.items()}
    assert shapes == {
        "r": ("RSA", None, None),
        "e": ("EC", "P-256", "ES256"),
        "p": ("EC", "P-384", None),
        "o": ("OKP", "Ed25519", None),
    }
    assert key_set.keys["r"].fits("PS256") and key_set.keys["r"].fits("RS512")
    assert not key_set.keys["r"].fits("ES256")
    assert key_set.keys["e"].fits("ES256") and not key_set.keys["e"].fits("ES384")
    assert key_set.keys["p"].fits("ES384") and not key_set.keys["p"].fits("ES256")
    assert key_set.keys["o"].fits("EdDSA") and not key_set.keys["o"].fits("ES256")


def test_duplicate_kid_keeps_the_first_key(ec_keys: list[ec.EllipticCurvePrivateKey]) -> None:
    key_set = parse_jwks({"keys": [ec_jwk(ec_keys[0], "k"), ec_jwk(ec_keys[1], "k")]})

    entry = key_set.keys["k"]
    assert entry.key.public_numbers() == ec_keys[0].public_key().public_numbers()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "document",
    [[], "keys", {"keys": "none"}, {"nokeys": []}, {"keys": []}, {"keys": [{"kty": "oct"}]}],
)
def test_document_without_usable_keys_is_an_error(document: Any) -> None:
    with pytest.raises(JwksError):
        parse_jwks(document)


def test_lookup_uses_kid_as_a_dictionary_key_only(
    ec_keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    two = parse_jwks({"keys": [ec_jwk(ec_keys[0], "a"), ec_jwk(ec_keys[1], "b")]})
    one_with_kid = parse_jwks({"keys": [ec_jwk(ec_keys[0], "a")]})
    one_without_kid = parse_jwks({"keys": [ec_jwk(ec_keys[0], None)]})

    assert two.lookup("b") is two.keys["b"]
    assert two.lookup(None) is None  # ambiguous: the token must say which
    assert two.lookup("../a") is None
    assert one_with_kid.lookup(None) is one_with_kid.keys["a"]
    assert one_with_kid.lookup("other") is None
    assert one_without_kid.lookup("anything") is one_without_kid.keys[None]


# --- static key files ------------------------------------------------------------------------


def pem_public(key: Any) -> bytes:
    data: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


@pytest.mark.parametrize(
    ("make_key", "kty", "crv"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), "EC", "P-256"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "EC", "P-384"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA", None),
        (ed25519.Ed25519PrivateKey.generate, "OKP", "Ed25519"),
    ],
)
def test_pem_public_key_file_is_one_kidless_key(
    tmp_path: Path, make_key: Callable[[], Any], kty: str, crv: str | None
) -> None:
    path = tmp_path / "issuer.pem"
    path.write_bytes(pem_public(make_key()))

    key_set = load_key_file(path)

    assert list(key_set.keys) == [None]
    assert (key_set.keys[None].kty, key_set.keys[None].crv) == (kty, crv)


def test_jwks_file_is_parsed(tmp_path: Path, ec_keys: list[ec.EllipticCurvePrivateKey]) -> None:
    path = tmp_path / "issuer.jwks.json"
    path.write_text(json.dumps({"keys": [ec_jwk(ec_keys[0], "k1")]}))

    assert list(load_key_file(path).keys) == ["k1"]


@pytest.mark.parametrize("content", ["private", "short-rsa", "garbage", "missing", "huge"])
def test_bad_key_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "issuer.key"
    if content == "private":
        key = ec.generate_private_key(ec.SECP256R1())
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    elif content == "short-rsa":
        path.write_bytes(pem_public(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    elif content == "garbage":
        path.write_bytes(b"\x00not a key")
    elif content == "huge":
        path.write_bytes(b" " * (MAX_JWKS_BYTES + 1))

    with pytest.raises(JwksError, match=str(path)):
        load_key_file(path)


async def test_verifier_with_a_static_jwks_file_verifies_and_never_fetches(
    tmp_path: Path, ec_keys: list[ec.EllipticCurvePrivateKey]
) -> None:
    path = tmp_path / "issuer.jwks.json"
    path.write_text(json.dumps({"keys": [ec_jwk(ec_keys[0], "k1")]}))
    config = IssuerConfig(
        name="static",
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        algorithms=("ES256",),
        jwks_file=path,
    )
    verifier = TokenVerifier([config], clock=CallableClock(NOW))
    await verifier.start()
    try:
        verified = await verifier.verify(sign(ec_keys[0], "k1"))
        with pytest.raises(TokenError) as unknown:
            await verifier.verify(sign(ec_keys[1], "k2"))
        status = verifier.jwks_status()["static"]
    finally:
        await verifier.close()

    assert verified.key_id == "k1"
    assert unknown.value.reason is Reason.TOKEN_KEY_UNKNOWN
    assert status == {
        "source": "file",
        "keys": 1,
        "last_fetch": NOW,
        "age": 0.0,
        "last_error": None,
        "stale": False,
        "fetches": 0,
        "fetch_failures": 0,
    }
    assert verifier.jwks_fetches("static") == 0


async def test_broken_static_key_file_fails_start(tmp_path: Path) -> None:
    path = tmp_path / "issuer.jwks.json"
    path.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    config = IssuerConfig(
        name="static",
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        algorithms=("ES256",),
        jwks_file=path,
    )
    verifier = TokenVerifier([config])
    try:
        with pytest.raises(JwksError, match="no usable signature key"):
            await verifier.start()
    finally:
        await verifier.close()


# --- fetching from a live issuer -------------------------------------------------------------


@dataclass
class FakeIssuer:
    document: Any
    status: int = 200
    delay: float = 0.0
    redirect: bool = False
    raw: bytes | None = None
    stream: bool = False
    paths: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.paths)


ISSUER_STATE = web.AppKey("issuer_state", FakeIssuer)


async def serve(request: web.Request) -> web.StreamResponse:
    state = request.app[ISSUER_STATE]
    state.paths.append(request.path)
    if state.delay:
        await asyncio.sleep(state.delay)
    if state.redirect and request.path == "/jwks.json":
        raise web.HTTPFound("/real.json")
    if state.stream:
        response = web.StreamResponse(status=state.status)
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b" " * 65536
        for _ in range(MAX_JWKS_BYTES // len(chunk) + 2):
            await response.write(chunk)
        await response.write_eof()
        return response
    if state.raw is not None:
        return web.Response(body=state.raw, status=state.status, content_type="application/json")
    return web.json_response(state.document, status=state.status)


@asynccontextmanager
async def run_issuer(
    state: FakeIssuer, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    app = web.Application()
    app[ISSUER_STATE] = state
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if ssl_context else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}/jwks.json"
    finally:
        await runner.cleanup()


@dataclass
class Live:
    verifier: TokenVerifier
    issuer: FakeIssuer
    clock: CallableClock

    async def reason(self, token: str) -> Reason:
        with pytest.raises(TokenError) as caught:
            await self.verifier.verify(token)
        return caught.value.reason

    def status(self) -> dict[str, Any]:
        return self.verifier.jwks_status()["live"]


@asynccontextmanager
async def live_verifier(
    state: FakeIssuer,
    *,
    ssl_context: ssl.SSLContext | None = None,
    session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    **overrides: Any,
) -> AsyncIterator[Live]:
    async with run_issuer(state, ssl_context) as url:
        settings: dict[str, Any] = {
            "name": "live",
            "issuer": ISSUER,
            "audiences": (AUDIENCE,),
            "algorithms": ("ES256",),
            "jwks_url": url,
            "refresh_interval": 10.0,
            "jwks_max_age": 100.0,
        }
        settings.update(overrides)
        clock = CallableClock(NOW)
        verifier = TokenVerifier(
            [IssuerConfig(**settings)], clock=clock, session_factory=session_factory
        )
        await verifier.start()
        try:
            yield Live(verifier, state, clock)
        finally:
            await verifier.close()


async def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 5 s")


async def test_rotated_key_is_picked_up_after_the_refresh_interval(
    ec_keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    old, new = ec_keys[0], ec_keys[1]
    state = FakeIssuer({"keys": [ec_jwk(old, "k-old")]})
    async with live_verifier(state) as live:
        before = await live.verifier.verify(sign(old, "k-old"))
        state.document = {"keys": [ec_jwk(new, "k-new")]}

        too_soon = await live.reason(sign(new, "k-new"))
        requests_too_soon = state.requests
        live.clock.advance(10)
        after = await live.verifier.verify(sign(new, "k-new", jti="2"))
        retired = await live.reason(sign(old, "k-old", jti="3"))

    assert before.key_id == "k-old"
    assert too_soon is Reason.TOKEN_KEY_UNKNOWN
    assert requests_too_soon == 1
    assert after.key_id == "k-new"
    assert retired is Reason.TOKEN_KEY_UNKNOWN
    assert state.requests == 2


async def test_unknown_kid_refreshes_at_most_once_per_interval_even_concurrently(
    ec_keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    state = FakeIssuer({"keys": [ec_jwk(ec_keys[0], "k1")]})
    async with live_verifier(state, refresh_interval=30.0) as live:
        live.clock.advance(30)
        burst = await asyncio.gather(
            *(live.reason(sign(ec_keys[1], f"unknown-{i}")) for i in range(20))
        )
        after_burst = state.requests
        for i in range(5):
            await live.reason(sign(ec_keys[1], f"again-{i}"))
        live.clock.advance(29)
        await live.reason(sign(ec_keys[1], "still-too-soon"))
        within_interval = state.requests
        live.clock.advance(1)
        await live.reason(sign(ec_keys[1], "next-interval"))

    assert set(burst) == {Reason.TOKEN_KEY_UNKNOWN}
    assert after_burst == 2  # the prefetch and one shared refresh
    assert within_interval == 2
    assert state.requests == 3


async def test_cached_keys_serve_while_issuer_is_down_until_max_age_then_fail_closed(
    ec_keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    key = ec_keys[0]
    state = FakeIssuer({"keys": [ec_jwk(key, "k1")]})
    async with live_verifier(state) as live:
        state.status = 503
        live.clock.set(NOW + 60)  # past the revalidation point, within max_age
        during = await live.verifier.verify(sign(key, "k1", jti="during"))
        await wait_until(lambda: live.status()["last_error"] is not None)
        status_during = live.status()

        live.clock.set(NOW + 100.5)
        after_max_age = await live.reason(sign(key, "k1", jti="after"))
        status_after = live.status()

        state.status = 200
        live.clock.set(NOW + 106)
        recovered = await live.verifier.verify(sign(key, "k1", jti="recovered"))
        status_recovered = live.status()

    assert during.key_id == "k1"
    assert "503" in status_during["last_error"]
    assert status_during["stale"] is False
    assert status_during["last_fetch"] == NOW
    assert after_max_age is Reason.TOKEN_ISSUER_UNAVAILABLE
    assert status_after["stale"] is True
    assert recovered.key_id == "k1"
    assert status_recovered["stale"] is False
    assert status_recovered["last_error"] is None
    assert status_recovered["last_fetch"] == NOW + 106


async def test_keys_are_revalidated_in_the_background_and_removed_keys_stop_working(
    ec_keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    state = FakeIssuer({"keys": [ec_jwk(ec_keys[0], "k1"), ec_jwk(ec_keys[1], "k2")]})
    async with live_verifier(state) as live:
        live.clock.set(NOW + 49)
        await live.verifier.verify(sign(ec_keys[0], "k1", jti="a"))
        requests_before_revalidation = state.requests
        state.document = {"keys": [ec_jwk(ec_keys[1], "k2")]}  # k1 withdrawn by the issuer
        live.clock.set(NOW + 50)
        await live.verifier.verify(sign(ec_keys[0], "k1", jti="b"))  # served, then revalidated
        await wait_until(lambda: live.status()["last_fetch"] == NOW + 50)
        withdrawn = await live.reason(sign(ec_keys[0], "k1", jti="c"))
        kept = await live.verifier.verify(sign(ec_keys[1], "k2", jti="d"))

    assert requests_before_revalidation == 1
    assert withdrawn is Reason.TOKEN_KEY_UNKNOWN
    assert kept.key_id == "k2"
    assert state.requests == 2


async def test_issuer_never_reached_is_unavailable(
    ec_keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    config = IssuerConfig(
        name="down",
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        algorithms=("ES256",),
        jwks_url=f"http://127.0.0.1:{closed_port}/jwks.json",
    )
    clock = CallableClock(NOW)
    verifier = TokenVerifier([config], clock=clock)
    await verifier.start()
    try:
        with pytest.raises(TokenError) as first:
            await verifier.verify(sign(ec_keys[0], "k1"))
        clock.advance(5)
        with pytest.raises(TokenError) as retried:
            await verifier.verify(sign(ec_keys[0], "k1", jti="2"))
        status = verifier.jwks_status()["down"]
    finally:
        await verifier.close()

    assert first.value.reason is Reason.TOKEN_ISSUER_UNAVAILABLE
    assert "never fetched" in first.value.detail
    assert retried.value.reason is Reason.TOKEN_ISSUER_UNAVAILABLE
    assert verifier.jwks_fetches("down") == 2  # prefetch, then one retry 5 s later
    assert status["keys"] == 0
    assert status["last_fetch"] is None
    assert status["stale"] is True
    assert "Connect" in status["last_error"]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"redirect": True}, "HTTP 302"),
        ({"status": 500}, "HTTP 500"),
        ({"raw": b"{not json"}, "not JSON"),
        ({"raw": b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'}, "no usable signature key"),
        ({"raw": b'{"keys": [], "pad": "' + b"x" * MAX_JWKS_BYTES + b'"}'}, "larger than"),
        ({"stream": True}, "larger than"),
        ({"delay": 1.0}, "Timeout"),
    ],
)
async def test_bad_jwks_response_is_never_installed(
    ec_keys: list[ec.EllipticCurvePrivateKey], change: dict[str, Any], error: str
) -> None:
    state = FakeIssuer({"keys": [ec_jwk(ec_keys[0], "k1")]})
    for name, value in change.items():
        setattr(state, name, value)
    # Only the slow issuer needs a short timeout; a 1 MiB answer on a loaded machine (CI, the
    # suite under libfaketime) once took longer than 0.2 s and failed as a timeout instead.
    timeout = 0.2 if "delay" in change else 5.0
    async with live_verifier(state, jwks_timeout=timeout) as live:
        reason = await live.reason(sign(ec_keys[0], "k1"))
        status = live.status()

    assert reason is Reason.TOKEN_ISSUER_UNAVAILABLE
    assert error in status["last_error"]
    assert "/real.json" not in state.paths  # redirects are not followed


async def test_bad_refresh_keeps_the_keys_already_held(
    ec_keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    state = FakeIssuer({"keys": [ec_jwk(ec_keys[0], "k1")]})
    async with live_verifier(state) as live:
        state.raw = b'{"keys": []}'
        live.clock.advance(10)
        unknown = await live.reason(sign(ec_keys[1], "k2"))
        still = await live.verifier.verify(sign(ec_keys[0], "k1"))

    assert unknown is Reason.TOKEN_KEY_UNKNOWN
    assert still.key_id == "k1"
    assert state.requests == 2


async def test_shared_session_is_used_and_left_open(
    ec_keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    state = FakeIssuer({"keys": [ec_jwk(ec_keys[0], "k1")]})
    async with aiohttp.ClientSession() as shared:
        async with live_verifier(state, session_factory=lambda: shared) as live:
            verified = await live.verifier.verify(sign(ec_keys[0], "k1"))
        assert not shared.closed

    assert verified.key_id == "k1"
    assert state.requests == 1


# --- https with a private CA -----------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    end = start + dt.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("test issuer CA"))
        .issuer_name(_name("test issuer CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path = tmp_path / "server.pem"
    cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_path = tmp_path / "server.key"
    key_path.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_path, key_path)
    return ca_path, server_context


async def test_https_jwks_is_trusted_through_the_configured_ca(
    tmp_path: Path, ec_keys: list[ec.EllipticCurvePrivateKey]
) -> None:
    ca_path, server_context = make_tls(tmp_path)
    state = FakeIssuer({"keys": [ec_jwk(ec_keys[0], "k1")]})
    async with live_verifier(state, ssl_context=server_context, jwks_ca_file=ca_path) as live:
        verified: VerifiedToken = await live.verifier.verify(sign(ec_keys[0], "k1"))

    assert verified.key_id == "k1"


async def test_https_jwks_from_an_untrusted_ca_is_refused(
    tmp_path: Path, ec_keys: list[ec.EllipticCurvePrivateKey]
) -> None:
    _, server_context = make_tls(tmp_path)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_ca, _ = make_tls(other_dir)
    state = FakeIssuer({"keys": [ec_jwk(ec_keys[0], "k1")]})
    async with live_verifier(state, ssl_context=server_context, jwks_ca_file=other_ca) as live:
        reason = await live.reason(sign(ec_keys[0], "k1"))
        status = live.status()

    assert reason is Reason.TOKEN_ISSUER_UNAVAILABLE
    assert "Certificate" in status["last_error"] or "certificate" in status["last_error"]


def test_jwk_thumbprint_matches_the_rfc7638_example() -> None:
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6t"
        "Soc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YG"
        "jQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-b"
        "FTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    with pytest.raises(JwksError, match="lacks"):
        jwk_thumbprint({"kty": "RSA", "n": "x"})
    with pytest.raises(JwksError, match="key type"):
        jwk_thumbprint({"kty": "weird"})
