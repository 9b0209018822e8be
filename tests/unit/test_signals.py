"""The signal receiver's parts on their own: `[signals.NAME]` validation (errors name the file
and the key), RFC 9493 subjects and their matching, SET verification against a key file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support import Certs
from tests.unit.test_config import error_for, write
from ztgateway.cli import main
from ztgateway.clock import ManualClock
from ztgateway.config import load_config
from ztgateway.credentials.jwks import JwksCache
from ztgateway.dev.tokens import key_id, public_jwks
from ztgateway.signals.backchannel import _check_claims
from ztgateway.signals.events import BACKCHANNEL_LOGOUT, CAEP, classify
from ztgateway.signals.receiver import parse_events
from ztgateway.signals.subjects import Matcher, SubjectError, parse_subject
from ztgateway.signals.tokens import (
    SET_TYPE,
    SignalTokenError,
    SignedTokenVerifier,
    TokenRules,
)
from ztgateway.store.base import Session

ISSUER = "https://idp.example.test"
GOOD = {
    "issuer": ISSUER,
    "jwks_url": "https://idp.example.test/ssf/jwks",
    "audience": "https://gw.example.test",
}

# --------------------------------------------------------------------------------- config


def test_a_transmitter_loads_with_its_defaults(certs: Certs, tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, certs, {"signals": {"okta": GOOD}}))
    (t,) = cfg.signals
    assert (t.name, t.delivery, t.algorithms) == ("okta", "push", ("RS256", "ES256"))
    assert t.subject_issuers == (ISSUER,)
    assert t.max_event_age == 86400.0


@pytest.mark.parametrize(
    ("over", "key", "message"),
    [
        ({"delivery": "poll"}, "signals.okta.poll_url", "is required"),
        ({"poll_url": "https://idp.example.test/poll"}, "signals.okta.poll_url", "only with"),
        ({"algorithms": ["HS256"]}, "signals.okta.algorithms[0]", "must be one of"),
        ({"algorithms": ["none"]}, "signals.okta.algorithms[0]", "must be one of"),
        ({"jwks_url": "http://idp.example.test/jwks"}, "signals.okta.jwks_url", "https"),
        ({"jwks_url": "ftp://idp/jwks"}, "signals.okta.jwks_url", "http(s) URL"),
        ({"jwks_file": "/nonexistent/keys.json"}, "signals.okta.jwks_file", "not found"),
        ({"audience": ""}, "signals.okta.audience", "must not be empty"),
        ({"delivery": "carrier-pigeon"}, "signals.okta.delivery", "must be one of"),
        ({"push_token_env": "ZTGW_UNSET_FOR_TEST"}, "signals.okta.push_token_env", "not set"),
        ({"max_event_age": "10s"}, "signals.okta.max_event_age", "at least"),
        ({"bogus": 1}, "signals.okta.bogus", "unknown key"),
    ],
)
def test_a_bad_transmitter_is_refused_naming_the_file_and_key(
    certs: Certs, tmp_path: Path, over: dict[str, Any], key: str, message: str
) -> None:
    err = error_for(tmp_path, certs, {"signals": {"okta": {**GOOD, **over}}})
    assert err.key == key, err
    assert message in err.message
    assert str(tmp_path / "gw.toml") in str(err)


def test_two_transmitters_with_one_issuer_are_refused(certs: Certs, tmp_path: Path) -> None:
    err = error_for(tmp_path, certs, {"signals": {"a": GOOD, "b": GOOD}})
    assert err.key == "signals.b.issuer" and "already" in err.message


def test_check_config_names_the_key_before_a_deploy(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, certs, {"signals": {"okta": {**GOOD, "delivery": "poll"}}})
    assert main(["check-config", "-c", str(path)]) != 0
    assert "signals.okta.poll_url" in capsys.readouterr().err


# --------------------------------------------------------------------------------- subjects


def session(**extra: Any) -> Session:
    return Session(
        session_id="ck:1",
        kind="cookie",
        user=extra.pop("user", "alice"),
        device_id="urn:dev:1",
        start_ip="127.0.0.1",
        last_ip="127.0.0.1",
        user_agent="",
        created=0.0,
        last_seen=0.0,
        expires_at=1e12,
        extra={
            "provider": "okta",
            "sub": "00u1",
            "sid": "s-1",
            "email": "Alice@Example.test",
            **extra,
        },
    )


MATCHER = Matcher((ISSUER,), {"okta": ISSUER})


@pytest.mark.parametrize(
    ("doc", "matches"),
    [
        ({"format": "iss_sub", "iss": ISSUER, "sub": "00u1"}, True),
        ({"format": "iss_sub", "iss": ISSUER, "sub": "00u2"}, False),
        ({"format": "iss_sub", "iss": "https://other.example", "sub": "00u1"}, False),
        ({"format": "email", "email": "alice@example.TEST"}, True),
        ({"format": "account", "uri": "acct:alice@example.test"}, True),
        ({"format": "opaque", "id": "alice"}, True),
        ({"format": "phone_number", "phone_number": "+12065550100"}, False),
        ({"format": "did", "url": "did:example:123"}, False),
        (
            {
                "format": "aliases",
                "identifiers": [
                    {"format": "did", "url": "did:example:123"},
                    {"format": "email", "email": "alice@example.test"},
                ],
            },
            True,
        ),
        (
            {
                "format": "complex",
                "user": {"format": "iss_sub", "iss": ISSUER, "sub": "00u1"},
                "session": {"format": "opaque", "id": "s-1"},
            },
            True,
        ),
        (
            {
                "user": {"format": "iss_sub", "iss": ISSUER, "sub": "00u1"},
                "session": {"format": "opaque", "id": "s-2"},
            },
            False,
        ),
        ({"device": {"format": "opaque", "id": "urn:dev:1"}}, True),
        ({"tenant": {"format": "opaque", "id": "t1"}}, False),  # nothing to match: ends nobody
    ],
)
def test_rfc_9493_subjects_match_what_the_sign_in_recorded(
    doc: dict[str, Any], matches: bool
) -> None:
    subject = parse_subject(doc)
    assert bool(MATCHER.sessions(subject, [session()], now=1.0)) is matches


def test_a_recorded_sub_of_another_provider_is_not_ours() -> None:
    other = session(provider="google")
    subject = parse_subject({"format": "iss_sub", "iss": ISSUER, "sub": "00u1"})
    assert not MATCHER.sessions(subject, [other], now=1.0)


@pytest.mark.parametrize(
    "doc",
    [
        {"format": "email"},
        {"format": "iss_sub", "iss": ISSUER},
        {"format": "account", "uri": "mailto:alice@example.test"},
        {"format": "unknown", "id": "x"},
        {"format": "aliases", "identifiers": []},
        {"format": "aliases", "identifiers": [{"format": "aliases", "identifiers": []}]},
        {"format": "complex"},
        {"user": "alice"},
        "alice",
    ],
)
def test_a_malformed_subject_is_refused(doc: Any) -> None:
    with pytest.raises(SubjectError):
        parse_subject(doc)


# --------------------------------------------------------------------------------- tokens


@pytest.fixture
def keys(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(public_jwks(key.public_key(), kid=key_id(key.public_key()))))
    return key, path


async def verifier(path: Path, clock: ManualClock) -> SignedTokenVerifier:
    cache = JwksCache(
        name="t", url=None, file=path, ca_file=None, refresh_interval=60, max_age=60,
        timeout=1, clock=clock.time, session=lambda: None,
    )  # fmt: skip
    await cache.start()
    rules = TokenRules(
        ISSUER,
        "https://gw",
        ("ES256",),
        (SET_TYPE,),
        ("iss", "aud", "iat", "jti", "events"),
        30.0,
        3600.0,
    )
    return SignedTokenVerifier(rules, cache, clock.time)


def make(key: Any, now: float, **claims: Any) -> str:
    body = {
        "iss": ISSUER,
        "aud": "https://gw",
        "iat": int(now),
        "jti": "j1",
        "events": {CAEP + "session-revoked": {}},
        **claims,
    }
    body = {k: v for k, v in body.items() if v is not None}
    kid = key_id(key.public_key())
    return pyjwt.encode(body, key, algorithm="ES256", headers={"kid": kid, "typ": SET_TYPE})


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({}, None),
        ({"aud": "https://elsewhere"}, "invalid_audience"),
        ({"aud": ["https://elsewhere", "https://gw"]}, None),
        ({"iss": "https://evil"}, "invalid_issuer"),
        ({"iat": None}, "invalid_request"),
        ({"iat": "yesterday"}, "invalid_request"),
        ({"events": None}, "invalid_request"),
        ({"jti": ""}, "invalid_request"),
        ({"iat_offset": 120}, "invalid_request"),  # issued in the future
        ({"iat_offset": -7200}, "invalid_request"),  # older than max_age
    ],
)
async def test_set_verification_against_the_injected_clock(
    keys: tuple[ec.EllipticCurvePrivateKey, Path], claims: dict[str, Any], code: str | None
) -> None:
    key, path = keys
    clock = ManualClock(1_900_000_000.0)
    v = await verifier(path, clock)
    offset = claims.pop("iat_offset", 0)
    token = make(key, clock.time() + offset, **claims)
    if code is None:
        assert (await v.verify(token))["jti"] == "j1"
        return
    with pytest.raises(SignalTokenError) as info:
        await v.verify(token)
    assert info.value.code == code


async def test_garbage_is_an_invalid_request_never_an_exception(
    keys: tuple[ec.EllipticCurvePrivateKey, Path],
) -> None:
    v = await verifier(keys[1], ManualClock(1_900_000_000.0))
    for token in ("", "a.b", "a.b.c", "é.é.é", "x" * 70000, "a.b.c.d.e"):
        with pytest.raises(SignalTokenError) as info:
            await v.verify(token)
        assert info.value.code == "invalid_request"


def test_events_need_a_subject_and_a_known_compliance_state() -> None:
    with pytest.raises(SignalTokenError, match="no subject"):
        parse_events({"events": {CAEP + "session-revoked": {}}}, 30, time.time())
    with pytest.raises(SignalTokenError, match="current_status"):
        parse_events(
            {
                "sub_id": {"format": "opaque", "id": "d1"},
                "events": {CAEP + "device-compliance-change": {"current_status": "fine"}},
            },
            30,
            time.time(),
        )
    (event,) = parse_events(
        {"sub_id": {"format": "opaque", "id": "d1"}, "events": {"urn:example:unknown": {}}},
        30,
        time.time(),
    )
    assert (event.label, event.action.value) == ("other", "none")
    assert classify(CAEP + "credential-change")[1].value == "step-up"


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"events": {BACKCHANNEL_LOGOUT: {}}, "sid": "s"}, None),
        ({"events": {BACKCHANNEL_LOGOUT: {}}, "sub": "u"}, None),
        ({"events": {BACKCHANNEL_LOGOUT: {}}}, "neither"),
        ({"events": {BACKCHANNEL_LOGOUT: {}}, "sid": "s", "nonce": "n"}, "nonce"),
        ({"events": {BACKCHANNEL_LOGOUT: []}, "sid": "s"}, "events"),
        ({"events": {BACKCHANNEL_LOGOUT: {}}, "sid": 7}, "sid"),
    ],
)
def test_logout_token_claims_per_section_2_6(claims: dict[str, Any], message: str | None) -> None:
    if message is None:
        _check_claims(claims)
        return
    with pytest.raises(SignalTokenError, match=message):
        _check_claims(claims)


# --------------------------------------------------------------------------------- providers

PARTNERS = "https://partners.example.net"


def test_a_transmitter_names_only_the_people_of_its_own_providers() -> None:
    """Issue 17 item 4: users of two providers never collide, and a provider's signals never
    reach the other's people (the directory's alice is not the partners' alice)."""
    corp = session(user="alice", provider="okta", sub="00u1")
    partner = session(user="partners:alice", provider="partners", sub="p-1", sid="s-9")
    token = session(user="alice")
    token.extra = {}
    issuers = {"okta": ISSUER, "partners": PARTNERS}
    corp_transmitter = Matcher((ISSUER,), issuers)
    partner_transmitter = Matcher((PARTNERS,), issuers, "partners")
    alice = parse_subject({"format": "opaque", "id": "alice"})
    everyone = [corp, partner, token]
    assert corp_transmitter.sessions(alice, everyone, 1.0) == [corp, token]
    assert partner_transmitter.sessions(alice, everyone, 1.0) == [partner]
    # The partners' own sub, through its own issuer only.
    by_sub = parse_subject({"format": "iss_sub", "iss": PARTNERS, "sub": "p-1"})
    assert partner_transmitter.sessions(by_sub, everyone, 1.0) == [partner]
    assert corp_transmitter.sessions(by_sub, everyone, 1.0) == []
    assert partner_transmitter.named_users(alice) == {"partners:alice"}


def test_a_logout_token_is_verified_by_the_provider_its_issuer_and_audience_name() -> None:
    from types import SimpleNamespace

    from ztgateway.signals.backchannel import BackchannelLogout

    def client(name: str, issuer: str, client_id: str) -> Any:
        return SimpleNamespace(cfg=SimpleNamespace(name=name, issuer=issuer, client_id=client_id))

    clients = [client("corp", ISSUER, "gw"), client("corp-admin", ISSUER, "gw-admin"),
               client("partners", PARTNERS, "gw")]  # fmt: skip
    logout = BackchannelLogout(None, lambda: clients, None)  # type: ignore[arg-type]

    def token(iss: str, aud: Any) -> str:
        return pyjwt.encode({"iss": iss, "aud": aud}, "k" * 32, algorithm="HS256")

    assert logout.provider_for(token(PARTNERS, "gw")).cfg.name == "partners"
    assert logout.provider_for(token(ISSUER, "gw-admin")).cfg.name == "corp-admin"
    assert logout.provider_for(token(ISSUER, ["x", "gw"])).cfg.name == "corp"
    for iss, aud in ((ISSUER, "nobody"), ("https://unknown.example", "gw")):
        with pytest.raises(SignalTokenError) as info:
            logout.provider_for(token(iss, aud))
        assert info.value.code == "invalid_issuer"
