"""Bearer JWT verification: every refusal has its reason, every check a failing and a passing case.

Keys are generated per module; the JWKS is served by a real aiohttp server on 127.0.0.1, and the
verifier's clock is injected so expiry, caching and JWKS ageing are exact.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.support import CallableClock
from ztgateway.credentials.jwt import (
    IssuerConfig,
    TokenError,
    TokenVerifier,
    VerifiedToken,
    cert_thumbprint_s256,
    check_binding,
)
from ztgateway.decision import Reason
from ztgateway.dev.tokens import DEV_AUDIENCE, DEV_ISSUER, issue_token, key_id, public_jwks

ISSUER = "https://idp.example.test"
AUDIENCE = "gateway"
NOW = 1_700_000_000.0
LEEWAY = 30.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


@dataclass(frozen=True)
class Keys:
    ec_key: ec.EllipticCurvePrivateKey
    rsa_key: rsa.RSAPrivateKey
    ed_key: ed25519.Ed25519PrivateKey
    other_ec_key: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        ec_key=ec.generate_private_key(ec.SECP256R1()),
        rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed_key=ed25519.Ed25519PrivateKey.generate(),
        other_ec_key=ec.generate_private_key(ec.SECP256R1()),
    )


def jwks_document(keys: Keys) -> dict[str, Any]:
    ec_jwk = ECAlgorithm.to_jwk(keys.ec_key.public_key(), as_dict=True)
    rsa_jwk = RSAAlgorithm.to_jwk(keys.rsa_key.public_key(), as_dict=True)
    ed_jwk = OKPAlgorithm.to_jwk(keys.ed_key.public_key(), as_dict=True)
    return {
        "keys": [
            {**ec_jwk, "kid": "ec-1", "use": "sig", "alg": "ES256"},
            # No "alg": one RSA key may serve RS256 or PS256 tokens, one per token.
            {**rsa_jwk, "kid": "rsa-1", "use": "sig"},
            {**rsa_jwk, "kid": "rsa-rs256-only", "use": "sig", "alg": "RS256"},
            {**ed_jwk, "kid": "ed-1", "use": "sig"},
        ]
    }


@dataclass
class JwksServer:
    document: Any
    status: int = 200
    paths: list[str] = field(default_factory=list)

    @property
    def jwks_requests(self) -> int:
        return self.paths.count("/jwks.json")


SERVER = web.AppKey("jwks_server", JwksServer)


async def serve_jwks(request: web.Request) -> web.Response:
    state = request.app[SERVER]
    state.paths.append(request.path)
    if request.path != "/jwks.json":
        return web.json_response({"keys": []}, status=404)
    return web.json_response(state.document, status=state.status)


@dataclass
class Harness:
    verifier: TokenVerifier
    server: JwksServer
    clock: CallableClock
    url: str
    results: list[tuple[str, str]]

    async def refused(self, token: str) -> TokenError:
        with pytest.raises(TokenError) as caught:
            await self.verifier.verify(token)
        return caught.value


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def jwks_server(keys: Keys) -> AsyncIterator[tuple[JwksServer, str]]:
    state = JwksServer(document=jwks_document(keys))
    app = web.Application()
    app[SERVER] = state
    app.router.add_get("/{name}", serve_jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield state, f"http://127.0.0.1:{port}/jwks.json"
    finally:
        await runner.cleanup()


@pytest.fixture
async def make_harness(jwks_server: tuple[JwksServer, str]) -> AsyncIterator[MakeHarness]:
    server, url = jwks_server
    made: list[TokenVerifier] = []

    async def make(*, cache_size: int = 100, **overrides: Any) -> Harness:
        clock = CallableClock(NOW)
        results: list[tuple[str, str]] = []
        settings: dict[str, Any] = {
            "name": "test",
            "issuer": ISSUER,
            "audiences": (AUDIENCE, "other-api"),
            "algorithms": ("ES256", "RS256", "PS256", "EdDSA"),
            "jwks_url": url,
            "leeway": LEEWAY,
        }
        settings.update(overrides)
        verifier = TokenVerifier(
            [IssuerConfig(**settings)],
            clock=clock,
            cache_size=cache_size,
            on_result=lambda issuer, result: results.append((issuer, result)),
        )
        made.append(verifier)
        await verifier.start()
        return Harness(verifier, server, clock, url, results)

    try:
        yield make
    finally:
        for verifier in made:
            await verifier.close()


@pytest.fixture
async def harness(make_harness: MakeHarness) -> Harness:
    return await make_harness()


DROP: Any = object()  # marks a claim to leave out


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": int(NOW),
        "exp": int(NOW) + 300,
    }
    for name, value in changes.items():
        if value is DROP:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def sign(
    key: Any,
    alg: str = "ES256",
    kid: str | None = "ec-1",
    headers: dict[str, Any] | None = None,
    **changes: Any,
) -> str:
    header: dict[str, Any] = dict(headers or {})
    if kid is not None:
        header["kid"] = kid
    return pyjwt.encode(claims(**changes), key, algorithm=alg, headers=header)


def with_signature(token: str, signature: bytes) -> str:
    head, payload, _ = token.split(".")
    return f"{head}.{payload}.{b64url(signature)}"


# --- accepted tokens -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "kid", "key_name"),
    [
        ("ES256", "ec-1", "ec"),
        ("RS256", "rsa-1", "rsa"),
        ("PS256", "rsa-1", "rsa"),
        ("RS256", "rsa-rs256-only", "rsa"),
        ("EdDSA", "ed-1", "ed"),
    ],
)
async def test_valid_token_of_each_algorithm_is_accepted(
    harness: Harness, keys: Keys, alg: str, kid: str, key_name: str
) -> None:
    token = sign(getattr(keys, f"{key_name}_key"), alg, kid)

    verified = await harness.verifier.verify(token)

    assert verified.issuer == "test"
    assert verified.subject == "alice"
    assert verified.algorithm == alg
    assert verified.key_id == kid
    assert verified.expires_at == NOW + 300
    assert verified.issued_at == NOW
    assert verified.cnf_x5t_s256 is None
    assert verified.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert verified.claims["aud"] == AUDIENCE
    assert harness.results == [("test", "valid")]


async def test_audience_list_with_one_accepted_value_is_accepted(
    harness: Harness, keys: Keys
) -> None:
    token = sign(keys.ec_key, aud=["someone-else", "other-api"])

    verified = await harness.verifier.verify(token)

    assert verified.claims["aud"] == ["someone-else", "other-api"]


async def test_expired_token_within_leeway_is_accepted(harness: Harness, keys: Keys) -> None:
    token = sign(keys.ec_key, iat=int(NOW) - 600, exp=int(NOW) - int(LEEWAY) + 5)

    verified = await harness.verifier.verify(token)

    assert verified.expires_at < NOW


# --- algorithms ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_unsigned_token_with_alg_none_in_any_case_is_refused(
    harness: Harness, alg: str
) -> None:
    token = f"{b64json({'alg': alg, 'kid': 'ec-1'})}.{b64json(claims())}."

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_ALGORITHM_REFUSED
    assert harness.results == [("test", "token-algorithm-refused")]


@pytest.mark.parametrize("public_format", ["pem", "der-b64"])
async def test_hs256_forged_with_issuer_public_key_as_secret_is_refused(
    harness: Harness, keys: Keys, public_format: str
) -> None:
    # The classic key-confusion forgery: anyone can HMAC with the published RSA public key.
    pem = keys.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    secret = pem if public_format == "pem" else base64.b64encode(pem)
    signing_input = f"{b64json({'alg': 'HS256', 'kid': 'rsa-1', 'typ': 'JWT'})}.{b64json(claims())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()

    error = await harness.refused(f"{signing_input}.{b64url(mac)}")

    assert error.reason is Reason.TOKEN_ALGORITHM_REFUSED


async def test_rs256_header_naming_an_ec_key_is_refused(harness: Harness, keys: Keys) -> None:
    token = sign(keys.rsa_key, "RS256", kid="ec-1")

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_ALGORITHM_REFUSED
    assert "ec-1" in error.detail


async def test_es256_header_naming_an_rsa_key_is_refused(harness: Harness, keys: Keys) -> None:
    token = sign(keys.ec_key, "ES256", kid="rsa-1")

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_ALGORITHM_REFUSED


async def test_token_alg_other_than_the_jwk_alg_is_refused(harness: Harness, keys: Keys) -> None:
    token = sign(keys.rsa_key, "PS256", kid="rsa-rs256-only")

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_ALGORITHM_REFUSED


async def test_algorithm_not_configured_for_the_issuer_is_refused(
    make_harness: MakeHarness, keys: Keys
) -> None:
    harness = await make_harness(algorithms=("ES256",))

    error = await harness.refused(sign(keys.rsa_key, "RS256", kid="rsa-1"))

    assert error.reason is Reason.TOKEN_ALGORITHM_REFUSED


async def test_missing_alg_header_is_refused(harness: Harness) -> None:
    token = f"{b64json({'kid': 'ec-1'})}.{b64json(claims())}.{b64url(b'x' * 64)}"

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_ALGORITHM_REFUSED


@pytest.mark.parametrize("alg", ["none", "None", "HS256", "hs384", "HS512", "ES512", "ES256K", ""])
def test_issuer_config_refuses_none_hmac_and_unsupported_algorithms(alg: str) -> None:
    with pytest.raises(ValueError, match="algorithm"):
        IssuerConfig(
            name="bad",
            issuer=ISSUER,
            audiences=(AUDIENCE,),
            algorithms=("ES256", alg),
            jwks_url="https://idp.example.test/jwks",
        )


@pytest.mark.parametrize(
    "changes",
    [
        {"audiences": "gateway"},
        {"audiences": ()},
        {"algorithms": "ES256"},
        {"jwks_url": None},
        {"jwks_file": Path("keys.json")},
        {"jwks_url": "ftp://idp.example.test/jwks"},
        {"jwks_url": "file:///etc/passwd"},
        {"jwks_ca_file": Path("ca.pem"), "jwks_url": "http://idp.example.test/jwks"},
        {"required_claims": ("iss", "aud", "sub", "iat")},
        {"leeway": -1.0},
        {"jwks_max_age": 0.0},
        {"max_token_bytes": 0},
        {"max_token_age": 0.0},
    ],
)
def test_issuer_config_refuses_contradictory_settings(changes: dict[str, Any]) -> None:
    settings: dict[str, Any] = {
        "name": "bad",
        "issuer": ISSUER,
        "audiences": (AUDIENCE,),
        "algorithms": ("ES256",),
        "jwks_url": "https://idp.example.test/jwks",
    }
    settings.update(changes)
    with pytest.raises(ValueError, match="issuer 'bad'"):
        IssuerConfig(**settings)


def test_verifier_refuses_two_issuers_with_the_same_iss(tmp_path: Path) -> None:
    first = IssuerConfig(
        name="a",
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        algorithms=("ES256",),
        jwks_url="https://a.example.test/jwks",
    )
    second = IssuerConfig(
        name="b",
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        algorithms=("ES256",),
        jwks_url="https://b.example.test/jwks",
    )
    with pytest.raises(ValueError, match="duplicate issuer"):
        TokenVerifier([first, second])


# --- headers and key ids ---------------------------------------------------------------------


@pytest.mark.parametrize("hostile_kid", ["../../etc/passwd", "' OR 1=1 --", "ec-1\x00", "EC-1"])
async def test_hostile_kid_is_only_an_unknown_key_after_at_most_one_refresh(
    harness: Harness, keys: Keys, hostile_kid: str
) -> None:
    harness.clock.advance(61)  # past refresh_interval: one refresh is allowed
    token = sign(keys.ec_key, kid=hostile_kid)

    first = await harness.refused(token)
    second = await harness.refused(sign(keys.ec_key, kid=hostile_kid, jti="again"))

    assert first.reason is Reason.TOKEN_KEY_UNKNOWN
    assert second.reason is Reason.TOKEN_KEY_UNKNOWN
    assert harness.server.paths == ["/jwks.json", "/jwks.json"]


async def test_non_string_kid_is_refused(harness: Harness, keys: Keys) -> None:
    # PyJWT will not encode a non-string kid, so sign by hand.
    signing_input = f"{b64json({'alg': 'ES256', 'kid': {'$ne': None}})}.{b64json(claims())}"
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), keys.ec_key)
    token = f"{signing_input}.{b64url(signature)}"

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_INVALID


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk", "x5c"])
async def test_key_locating_header_is_refused_and_never_followed(
    harness: Harness, keys: Keys, header: str
) -> None:
    evil_url = harness.url.replace("/jwks.json", "/evil.json")
    values: dict[str, Any] = {
        "jku": evil_url,
        "x5u": evil_url,
        "jwk": ECAlgorithm.to_jwk(keys.other_ec_key.public_key(), as_dict=True),
        "x5c": ["MIIBszCCAVmgAwIBAgIUY2VydA=="],
    }
    # Signed with the attacker's key: honouring the header would verify it.
    token = sign(keys.other_ec_key, kid="ec-1", headers={header: values[header]})

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_HEADER_REFUSED
    assert "/evil.json" not in harness.server.paths


@pytest.mark.parametrize("crit", [["exp"], ["b64"], [], "exp"])
async def test_crit_header_is_refused(harness: Harness, keys: Keys, crit: Any) -> None:
    token = sign(keys.ec_key, headers={"crit": crit, "exp": 1})

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_HEADER_REFUSED


# --- structure and size ----------------------------------------------------------------------


async def test_token_of_100_kb_is_refused_before_parsing(harness: Harness, keys: Keys) -> None:
    token = sign(keys.ec_key, padding="x" * 100_000)

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_INVALID
    assert "longer" in error.detail
    assert harness.results == [("unknown", "token-invalid")]


async def test_token_over_the_issuer_limit_is_refused(
    make_harness: MakeHarness, keys: Keys
) -> None:
    harness = await make_harness(max_token_bytes=600)

    error = await harness.refused(sign(keys.ec_key, padding="x" * 600))

    assert error.reason is Reason.TOKEN_INVALID


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e",
        "..",
        "!!!.###.$$$",
        f"{b64json({'alg': 'ES256'})}.{b64json(claims())}=.sig",
        f"{b64json(['ES256'])}.{b64json(claims())}.c2ln",
        f"{b64json({'alg': 'ES256'})}.{b64json([1, 2])}.c2ln",
        f"{b64url(b'not json')}.{b64json(claims())}.c2ln",
        "éé.éé.éé",
    ],
)
async def test_malformed_token_is_invalid(harness: Harness, token: str) -> None:
    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_INVALID


async def test_unexpected_failure_becomes_token_invalid_naming_the_exception(
    harness: Harness,
) -> None:
    # 5000 nested arrays: json raises RecursionError, which no parser branch expects.
    token = f"{b64json({'alg': 'ES256'})}.{b64url(b'[' * 5000 + b']' * 5000)}.c2ln"

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_INVALID
    assert "RecursionError" in error.detail


# --- signatures ------------------------------------------------------------------------------


async def test_signature_with_one_flipped_byte_is_refused(harness: Harness, keys: Keys) -> None:
    token = sign(keys.ec_key)
    signature = bytearray(base64.urlsafe_b64decode(token.split(".")[2] + "=="))
    signature[10] ^= 0x01

    error = await harness.refused(with_signature(token, bytes(signature)))

    assert error.reason is Reason.TOKEN_SIGNATURE_INVALID


@pytest.mark.parametrize("key_name", ["ec", "rsa"])
async def test_truncated_signature_is_refused(harness: Harness, keys: Keys, key_name: str) -> None:
    alg, kid = ("ES256", "ec-1") if key_name == "ec" else ("RS256", "rsa-1")
    token = sign(getattr(keys, f"{key_name}_key"), alg, kid)
    signature = base64.urlsafe_b64decode(token.split(".")[2] + "==")

    error = await harness.refused(with_signature(token, signature[:-8]))

    assert error.reason is Reason.TOKEN_SIGNATURE_INVALID


async def test_signature_segment_that_is_not_base64url_is_refused(
    harness: Harness, keys: Keys
) -> None:
    token = sign(keys.ec_key)

    error = await harness.refused(token[:-1] + "*")

    assert error.reason is Reason.TOKEN_SIGNATURE_INVALID


async def test_es256_signature_of_zeros_is_refused(harness: Harness) -> None:
    # CVE-2022-21449 ("psychic signatures"): r = s = 0 verified in some ECDSA implementations.
    token = f"{b64json({'alg': 'ES256', 'kid': 'ec-1'})}.{b64json(claims())}.{b64url(bytes(64))}"

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_SIGNATURE_INVALID


async def test_token_signed_by_another_key_with_the_right_kid_is_refused(
    harness: Harness, keys: Keys
) -> None:
    error = await harness.refused(sign(keys.other_ec_key, kid="ec-1"))

    assert error.reason is Reason.TOKEN_SIGNATURE_INVALID


async def test_payload_changed_after_signing_is_refused(harness: Harness, keys: Keys) -> None:
    head, _, signature = sign(keys.ec_key).split(".")

    error = await harness.refused(f"{head}.{b64json(claims(sub='root'))}.{signature}")

    assert error.reason is Reason.TOKEN_SIGNATURE_INVALID


# --- claims ----------------------------------------------------------------------------------


async def test_expired_token_is_refused(harness: Harness, keys: Keys) -> None:
    token = sign(keys.ec_key, iat=int(NOW) - 600, exp=int(NOW) - int(LEEWAY) - 1)

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_EXPIRED


async def test_token_with_nbf_in_the_future_is_refused(harness: Harness, keys: Keys) -> None:
    token = sign(keys.ec_key, nbf=int(NOW) + int(LEEWAY) + 60)

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_NOT_YET_VALID


async def test_token_issued_in_the_future_is_refused(harness: Harness, keys: Keys) -> None:
    token = sign(keys.ec_key, iat=int(NOW) + int(LEEWAY) + 60, exp=int(NOW) + 900)

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_NOT_YET_VALID
    assert "iat" in error.detail


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud"])
async def test_token_missing_a_required_claim_is_refused(
    harness: Harness, keys: Keys, claim: str
) -> None:
    token = sign(keys.ec_key, **{claim: DROP})

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_CLAIMS_INVALID


async def test_configured_extra_required_claim_is_enforced(
    make_harness: MakeHarness, keys: Keys
) -> None:
    harness = await make_harness(required_claims=("exp", "iat", "sub", "aud", "iss", "jti"))

    error = await harness.refused(sign(keys.ec_key))
    verified = await harness.verifier.verify(sign(keys.ec_key, jti="j-1"))

    assert error.reason is Reason.TOKEN_CLAIMS_INVALID
    assert verified.claims["jti"] == "j-1"


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("exp", str(int(NOW) + 300)),
        ("exp", True),
        ("exp", float("inf")),
        ("exp", float("nan")),
        ("exp", [int(NOW) + 300]),
        ("iat", "now"),
        ("iat", False),
        ("nbf", "0"),
        ("nbf", None),
    ],
)
async def test_time_claim_that_is_not_a_finite_number_is_refused(
    harness: Harness, keys: Keys, claim: str, value: Any
) -> None:
    token = sign(keys.ec_key, **{claim: value})

    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_CLAIMS_INVALID


@pytest.mark.parametrize("subject", ["", 42, ["alice"]])
async def test_subject_that_is_not_a_non_empty_string_is_refused(
    harness: Harness, keys: Keys, subject: Any
) -> None:
    error = await harness.refused(sign(keys.ec_key, sub=subject))

    assert error.reason is Reason.TOKEN_CLAIMS_INVALID


@pytest.mark.parametrize("aud", ["someone-else", ["a", "b"], [], ""])
async def test_token_for_another_audience_is_refused(
    harness: Harness, keys: Keys, aud: Any
) -> None:
    error = await harness.refused(sign(keys.ec_key, aud=aud))

    assert error.reason in {Reason.TOKEN_AUDIENCE_INVALID, Reason.TOKEN_CLAIMS_INVALID}
    if aud not in ([], ""):
        assert error.reason is Reason.TOKEN_AUDIENCE_INVALID


async def test_token_from_an_unknown_issuer_is_refused(harness: Harness, keys: Keys) -> None:
    error = await harness.refused(sign(keys.ec_key, iss="https://evil.example.test"))

    assert error.reason is Reason.TOKEN_ISSUER_UNKNOWN
    assert harness.results == [("unknown", "token-issuer-unknown")]


async def test_token_without_issuer_is_refused(harness: Harness, keys: Keys) -> None:
    error = await harness.refused(sign(keys.ec_key, iss=DROP))

    assert error.reason is Reason.TOKEN_CLAIMS_INVALID


async def test_token_older_than_max_token_age_is_refused(
    make_harness: MakeHarness, keys: Keys
) -> None:
    harness = await make_harness(max_token_age=300.0)

    error = await harness.refused(sign(keys.ec_key, iat=int(NOW) - 301, exp=int(NOW) + 600))
    verified = await harness.verifier.verify(sign(keys.ec_key, iat=int(NOW) - 299))

    assert error.reason is Reason.TOKEN_TOO_OLD
    assert verified.issued_at == NOW - 299


@pytest.mark.parametrize(
    "cnf",
    [
        "x5t",
        ["x5t#S256"],
        {"x5t#S256": 12},
        {"x5t#S256": "short"},
        {"x5t#S256": "A" * 42 + "B"},  # 43 characters but not a canonical 32-byte value
    ],
)
async def test_malformed_confirmation_claim_is_refused(
    harness: Harness, keys: Keys, cnf: Any
) -> None:
    error = await harness.refused(sign(keys.ec_key, cnf=cnf))

    assert error.reason is Reason.TOKEN_CLAIMS_INVALID


async def test_confirmation_thumbprint_is_kept(harness: Harness, keys: Keys) -> None:
    thumbprint = cert_thumbprint_s256(b"certificate bytes")

    verified = await harness.verifier.verify(sign(keys.ec_key, cnf={"x5t#S256": thumbprint}))

    assert verified.cnf_x5t_s256 == thumbprint


async def test_confirmation_without_thumbprint_is_unbound(harness: Harness, keys: Keys) -> None:
    verified = await harness.verifier.verify(sign(keys.ec_key, cnf={"jkt": "abc"}))

    assert verified.cnf_x5t_s256 is None


# --- the verified-token cache ----------------------------------------------------------------


async def test_cache_hit_does_not_refetch_and_still_expires_at_exp(
    harness: Harness, keys: Keys
) -> None:
    token = sign(keys.ec_key, exp=int(NOW) + 120)
    first = await harness.verifier.verify(token)
    requests = harness.server.jwks_requests

    harness.clock.set(NOW + 100)
    second = await harness.verifier.verify(token)
    harness.clock.set(NOW + 120 + LEEWAY)
    error = await harness.refused(token)

    assert second is first
    assert harness.server.jwks_requests == requests
    assert error.reason is Reason.TOKEN_EXPIRED
    assert harness.results == [("test", "valid"), ("test", "cached"), ("test", "token-expired")]


async def test_remembered_answers_only_what_verified_and_judges_its_times_again(
    harness: Harness, keys: Keys
) -> None:
    """The data plane's synchronous look-up: never a verification of its own, so an unknown or
    forged token is None (the caller verifies it behind the throttle), and a remembered token
    that has expired since is refused and forgotten."""
    token = sign(keys.ec_key, exp=int(NOW) + 120)
    assert harness.verifier.remembered(token, NOW) is None
    assert harness.verifier.remembered("x" * 100_000, NOW) is None
    first = await harness.verifier.verify(token)
    assert harness.verifier.remembered(token, NOW + 100) is first
    forged = with_signature(token, b"\0" * 64)
    assert harness.verifier.remembered(forged, NOW) is None
    with pytest.raises(TokenError) as caught:
        harness.verifier.remembered(token, NOW + 120 + LEEWAY)
    assert caught.value.reason is Reason.TOKEN_EXPIRED
    assert harness.verifier.remembered(token, NOW) is None  # forgotten
    assert harness.results == [("test", "valid"), ("test", "cached"), ("test", "token-expired")]


async def test_cache_hit_still_checks_not_before(harness: Harness, keys: Keys) -> None:
    token = sign(keys.ec_key, nbf=int(NOW) + 10)
    await harness.verifier.verify(token)

    harness.clock.set(NOW - 120)
    error = await harness.refused(token)

    assert error.reason is Reason.TOKEN_NOT_YET_VALID


async def test_cache_is_bounded_least_recently_used_first(
    make_harness: MakeHarness, keys: Keys
) -> None:
    harness = await make_harness(cache_size=2)
    a, b, c = (sign(keys.ec_key, jti=name) for name in "abc")

    for token in (a, b, a, c, a, b):
        await harness.verifier.verify(token)

    labels = [result for _, result in harness.results]
    assert labels == ["valid", "valid", "cached", "valid", "cached", "valid"]


async def test_cache_of_size_zero_verifies_every_time(
    make_harness: MakeHarness, keys: Keys
) -> None:
    harness = await make_harness(cache_size=0)
    token = sign(keys.ec_key)

    await harness.verifier.verify(token)
    await harness.verifier.verify(token)

    assert harness.results == [("test", "valid"), ("test", "valid")]


async def test_broken_result_hook_does_not_change_the_verdict(
    jwks_server: tuple[JwksServer, str], keys: Keys
) -> None:
    def broken(issuer: str, result: str) -> None:
        raise RuntimeError("metrics down")

    config = IssuerConfig(
        name="test",
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        algorithms=("ES256",),
        jwks_url=jwks_server[1],
    )
    verifier = TokenVerifier([config], clock=CallableClock(NOW), on_result=broken)
    await verifier.start()
    try:
        verified = await verifier.verify(sign(keys.ec_key))
        with pytest.raises(TokenError):
            await verifier.verify("nonsense")
    finally:
        await verifier.close()

    assert verified.subject == "alice"


# --- certificate binding (RFC 8705) ----------------------------------------------------------


def make_cert(common_name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def token_bound_to(thumbprint: str | None) -> VerifiedToken:
    return VerifiedToken(
        issuer="test",
        claims={},
        subject="alice",
        token_hash="0" * 64,
        expires_at=NOW + 300,
        issued_at=NOW,
        cnf_x5t_s256=thumbprint,
        algorithm="ES256",
        key_id="ec-1",
    )


def test_cert_thumbprint_is_unpadded_base64url_sha256_of_der() -> None:
    der = make_cert("client")
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")

    assert cert_thumbprint_s256(der) == expected
    assert len(expected) == 43


def test_bound_token_with_its_certificate_passes() -> None:
    der = make_cert("client")
    token = token_bound_to(cert_thumbprint_s256(der))

    assert check_binding(token, der, required=True) is None
    assert check_binding(token, der, required=False) is None


def test_bound_token_with_another_certificate_is_a_mismatch() -> None:
    token = token_bound_to(cert_thumbprint_s256(make_cert("client")))

    assert check_binding(token, make_cert("thief"), required=False) is (
        Reason.TOKEN_BINDING_MISMATCH
    )


def test_bound_token_without_a_certificate_is_a_mismatch() -> None:
    token = token_bound_to(cert_thumbprint_s256(make_cert("client")))

    assert check_binding(token, None, required=False) is Reason.TOKEN_BINDING_MISMATCH


def test_unbound_token_where_binding_is_required_is_refused() -> None:
    assert check_binding(token_bound_to(None), make_cert("client"), required=True) is (
        Reason.TOKEN_BINDING_REQUIRED
    )


def test_unbound_token_where_binding_is_optional_passes() -> None:
    assert check_binding(token_bound_to(None), None, required=False) is None


# --- the dev issuer --------------------------------------------------------------------------


def write_dev_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key


def test_dev_kid_is_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    key = write_dev_key(tmp_path / "issuer.key")
    numbers = key.public_key().public_numbers()
    x = b64url(numbers.x.to_bytes(32, "big"))
    y = b64url(numbers.y.to_bytes(32, "big"))
    canonical = '{"crv":"P-256","kty":"EC","x":"%s","y":"%s"}' % (x, y)  # noqa: UP031

    expected = b64url(hashlib.sha256(canonical.encode()).digest())

    assert key_id(key.public_key()) == expected
    token = issue_token(tmp_path / "issuer.key", sub="alice")
    assert pyjwt.get_unverified_header(token)["kid"] == expected


def test_dev_issuer_refuses_a_key_that_is_not_p256(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "p384.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    with pytest.raises(ValueError, match="P-256"):
        issue_token(path, sub="alice")


async def test_dev_issuer_token_verifies_against_a_jwks_built_from_its_key(
    jwks_server: tuple[JwksServer, str], tmp_path: Path
) -> None:
    server, url = jwks_server
    key = write_dev_key(tmp_path / "issuer.key")
    server.document = public_jwks(key.public_key())
    der = make_cert("alice-laptop")
    cert_path = tmp_path / "client.pem"
    cert_path.write_bytes(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    )
    config = IssuerConfig(
        name="dev",
        issuer=DEV_ISSUER,
        audiences=(DEV_AUDIENCE,),
        algorithms=("ES256",),
        jwks_url=url,
    )
    verifier = TokenVerifier([config], clock=CallableClock(NOW))
    await verifier.start()
    try:
        token = issue_token(
            tmp_path / "issuer.key",
            sub="alice",
            groups=("eng", "ops"),
            scope="read write",
            roles=("admin",),
            email="alice@example.test",
            bind_cert=cert_path,
            now=NOW,
        )
        verified = await verifier.verify(token)
    finally:
        await verifier.close()

    assert verified.issuer == "dev"
    assert verified.subject == "alice"
    assert verified.key_id == key_id(key.public_key())
    assert verified.claims["groups"] == ["eng", "ops"]
    assert verified.claims["scope"] == "read write"
    assert verified.claims["roles"] == ["admin"]
    assert verified.claims["email"] == "alice@example.test"
    assert verified.claims["nbf"] == verified.claims["iat"] == NOW
    assert verified.expires_at == NOW + 300
    assert isinstance(verified.claims["jti"], str)
    assert check_binding(verified, der, required=True) is None
    assert check_binding(verified, make_cert("other"), required=True) is (
        Reason.TOKEN_BINDING_MISMATCH
    )


async def test_dev_issuer_token_verifies_against_its_pem_public_key(tmp_path: Path) -> None:
    key = write_dev_key(tmp_path / "issuer.key")
    pem_path = tmp_path / "issuer.pub.pem"
    pem_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = IssuerConfig(
        name="dev",
        issuer=DEV_ISSUER,
        audiences=(DEV_AUDIENCE,),
        algorithms=("ES256",),
        jwks_file=pem_path,
    )
    verifier = TokenVerifier([config], clock=CallableClock(NOW))
    await verifier.start()
    try:
        verified = await verifier.verify(
            issue_token(tmp_path / "issuer.key", sub="svc", extra_claims={"tenant": "t1"}, now=NOW)
        )
        expired = issue_token(tmp_path / "issuer.key", sub="svc", ttl=10, now=NOW - 600)
        with pytest.raises(TokenError) as caught:
            await verifier.verify(expired)
    finally:
        await verifier.close()

    assert verified.claims["tenant"] == "t1"
    assert caught.value.reason is Reason.TOKEN_EXPIRED
    assert verifier.jwks_status()["dev"]["source"] == "file"
