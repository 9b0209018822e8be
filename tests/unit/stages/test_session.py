"""The session stage, check by check: rate limits, a locked account, the cookie (unknown,
revoked, expired, idle), the device and the user it is bound to, IP drift in each mode, the user
agent, the anomaly score (step-up, termination), the identity provider's step-up signal, and the
second factor a route asks for (age, factor, user verification). Each: missing, invalid, valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import factories
from ztgateway.context import Identity, RequestContext
from ztgateway.decision import Finding, Reason, Verdict
from ztgateway.runtime import Runtime
from ztgateway.sessions import MFA_METHOD, MFA_UV, token_session_id
from ztgateway.stages.session import SessionStage
from ztgateway.store.sqlite import SQLiteStore

COOKIE = {
    "Cookie": f"__Host-ztgw-session={factories.COOKIE}",
    "User-Agent": "Mozilla/5.0 (factories)",
}


async def check(ctx: RequestContext, rt: Runtime) -> Sequence[Finding]:
    return await SessionStage(rt).check(ctx)


def alices(rt: Runtime, headers: dict[str, str] | None = None, **kw: Any) -> RequestContext:
    """alice's request, with her browser's session cookie unless `headers` says otherwise."""
    return factories.identified(rt, headers=COOKIE if headers is None else headers, **kw)


async def test_alices_live_session_passes_and_is_left_for_the_keeper(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    ctx = alices(rt)
    assert await check(ctx, rt) == []
    view = ctx.session
    assert view is not None and view.session is not None
    assert (view.kind, view.session_id, view.cookie_invalid) == (
        "cookie",
        factories.session().session_id,
        False,
    )


async def test_without_a_store_there_is_nothing_to_check() -> None:
    rt = factories.runtime(store=None)
    assert await check(alices(rt), rt) == ()


async def test_no_cookie_and_no_token_is_no_session(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    ctx = alices(rt, headers={})
    assert await check(ctx, rt) == []
    assert ctx.session is not None and (ctx.session.kind, ctx.session.session) == ("none", None)


# --- rate limits -----------------------------------------------------------------------------


async def test_a_burst_over_the_routes_rate_limit_is_refused(alice: SQLiteStore) -> None:
    rt = factories.runtime(
        store=alice, session={"rate_limit": {"rate": 1, "burst": 2, "scopes": ["user"]}}
    )
    stage = SessionStage(rt)
    assert await stage.check(alices(rt)) == []
    assert await stage.check(alices(rt)) == []
    third = alices(rt)
    findings = await stage.check(third)
    assert factories.verdicts(findings) == [(Reason.RATE_LIMITED, Verdict.DENY)]
    assert findings[0].detail == "per user" and third.retry_after == pytest.approx(1.0)
    # A second later the bucket holds a token again.
    assert await stage.check(alices(rt, now=factories.NOW + 1)) == []


async def test_a_dry_run_takes_no_token_from_the_bucket(alice: SQLiteStore) -> None:
    cfg = factories.config(session={"rate_limit": {"rate": 1, "burst": 1}})
    rt = factories.runtime(cfg, store=alice, dry_run=True)
    for _ in range(3):
        assert await check(alices(rt), rt) == []


# --- the account -----------------------------------------------------------------------------


async def test_a_locked_account_is_refused_and_told_until_when(alice: SQLiteStore) -> None:
    await alice.save_user(
        factories.user(
            locked_until=factories.NOW + 600, lock_reason="too many", timezone="Europe/Paris"
        )
    )
    rt = factories.runtime(store=alice)
    ctx = alices(rt)
    findings = await check(ctx, rt)
    assert factories.verdicts(findings) == [(Reason.ACCOUNT_LOCKED, Verdict.DENY)]
    assert ctx.locked is not None and (ctx.locked.until, ctx.locked.timezone) == (
        factories.NOW + 600,
        "Europe/Paris",
    )
    await alice.save_user(factories.user(locked_until=factories.NOW - 1))
    assert await check(alices(rt), rt) == []  # the lock has run out


# --- the cookie ------------------------------------------------------------------------------


async def test_a_cookie_the_gateway_did_not_issue_is_invalid(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    ctx = alices(rt, headers={"Cookie": "__Host-ztgw-session=made-up"})
    assert factories.verdicts(await check(ctx, rt)) == [(Reason.SESSION_INVALID, Verdict.DENY)]
    assert ctx.session is not None and ctx.session.cookie_invalid


async def test_a_revoked_session_is_terminated(store: SQLiteStore) -> None:
    await store.save_session(
        factories.session(revoked_at=factories.NOW - 5, revoked_reason="signed out")
    )
    rt = factories.runtime(store=store)
    ctx = alices(rt)
    findings = await check(ctx, rt)
    assert factories.verdicts(findings) == [(Reason.SESSION_TERMINATED, Verdict.DENY)]
    assert (
        findings[0].detail == "signed out"
        and ctx.session is not None
        and ctx.session.cookie_invalid
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"expires_at": factories.NOW},  # absolute expiry
        {"last_seen": factories.NOW - 1801},  # idle longer than the 30 minutes allowed
    ],
)
async def test_an_expired_session_is_refused(store: SQLiteStore, changes: dict[str, float]) -> None:
    await store.save_session(factories.session(**changes))
    rt = factories.runtime(store=store)
    assert factories.verdicts(await check(alices(rt), rt)) == [
        (Reason.SESSION_EXPIRED, Verdict.DENY)
    ]


async def test_the_routes_own_idle_timeout_applies(store: SQLiteStore) -> None:
    await store.save_session(factories.session(last_seen=factories.NOW - 120))
    rt = factories.runtime(store=store, session={"idle_timeout": 60})
    assert factories.verdicts(await check(alices(rt), rt)) == [
        (Reason.SESSION_EXPIRED, Verdict.DENY)
    ]


async def test_an_expired_token_session_simply_starts_again(
    store: SQLiteStore, tmp_path: Path
) -> None:
    issuer = factories.Issuer(tmp_path)
    cfg = factories.config(issuer.config())
    tokens = await issuer.verifier(cfg)
    verified = await tokens.verify(issuer.token(), now=factories.NOW)
    await store.save_session(
        factories.session(
            session_id=token_session_id(verified.token_hash),
            kind="token",
            expires_at=factories.NOW - 1,
        )
    )
    rt = factories.runtime(cfg, store=store, tokens=tokens)
    ctx = alices(rt, headers={})
    ctx.identity = Identity(user="alice", source="token", token=verified, device_id="alice-laptop")
    assert await check(ctx, rt) == []
    assert ctx.session is not None and ctx.session.kind == "token" and ctx.session.session is None


# --- what the session is bound to ------------------------------------------------------------


async def test_a_session_presented_by_another_device_is_invalid(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    findings = await check(alices(rt, cert=factories.cert(device_id="bob-phone")), rt)
    assert factories.verdicts(findings) == [(Reason.SESSION_INVALID, Verdict.DENY)]
    assert findings[0].detail == "presented by another device"


async def test_a_session_presented_without_its_device_is_invalid(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice, policy={"require_client_cert": False})
    findings = await check(alices(rt, cert=None), rt)
    assert factories.verdicts(findings) == [(Reason.SESSION_INVALID, Verdict.DENY)]
    assert findings[0].detail == "presented without its device"


async def test_a_session_presented_by_another_user_is_invalid(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    ctx = alices(rt)
    ctx.identity = Identity(user="bob", source="cert", device_id="alice-laptop")
    findings = await check(ctx, rt)
    assert factories.verdicts(findings) == [(Reason.SESSION_INVALID, Verdict.DENY)]
    assert findings[0].detail == "presented by another user"


# --- IP drift --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "ip", "expected"),
    [
        ("ignore", "10.9.9.9", []),
        ("allow_same_network", "127.0.0.77", []),
        ("allow_same_network", "10.9.9.9", [(Reason.IP_DRIFT, Verdict.STEP_UP)]),
        ("step_up", "127.0.0.77", [(Reason.IP_DRIFT, Verdict.STEP_UP)]),
        ("terminate", "127.0.0.77", [(Reason.IP_DRIFT, Verdict.TERMINATE)]),
        ("terminate", factories.CLIENT_IP, []),
    ],
)
async def test_a_session_used_from_another_address_follows_the_routes_drift_mode(
    alice: SQLiteStore, mode: str, ip: str, expected: list[tuple[Reason, Verdict]]
) -> None:
    rt = factories.runtime(store=alice, session={"ip_drift": mode})
    ctx = alices(rt, client_ip=ip)
    assert factories.verdicts(await check(ctx, rt)) == expected
    assert ctx.session is not None and ctx.session.drifted is (ip != factories.CLIENT_IP)


# --- behaviour: user agent and anomaly -------------------------------------------------------


async def test_a_changed_user_agent_adds_to_the_anomaly(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    ctx = alices(rt, headers={**COOKIE, "User-Agent": "curl/8"})
    assert factories.verdicts(await check(ctx, rt)) == [(Reason.SESSION_INVALID, None)]
    assert ctx.session is not None and ctx.session.anomaly == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (0.1, []),
        (0.75, [(Reason.SESSION_ANOMALY, Verdict.STEP_UP)]),
        (0.95, [(Reason.SESSION_TERMINATED, Verdict.TERMINATE)]),
    ],
)
async def test_the_anomaly_score_steps_up_then_terminates(
    store: SQLiteStore, stored: float, expected: list[tuple[Reason, Verdict]]
) -> None:
    await store.save_session(factories.session(anomaly=stored, anomaly_at=factories.NOW))
    rt = factories.runtime(store=store)
    assert factories.verdicts(await check(alices(rt), rt)) == expected


async def test_the_anomaly_score_decays_with_time(store: SQLiteStore) -> None:
    # 0.95 two half-lives (2 x 600 s) ago is under 0.25 now.
    await store.save_session(factories.session(anomaly=0.95, anomaly_at=factories.NOW - 1200))
    rt = factories.runtime(store=store)
    ctx = alices(rt)
    assert await check(ctx, rt) == []
    assert ctx.session is not None and ctx.session.anomaly == pytest.approx(0.95 / 4)


async def test_a_signal_from_the_identity_provider_asks_older_sessions_to_step_up(
    alice: SQLiteStore,
) -> None:
    await alice.save_user(
        factories.user(step_up_after=factories.NOW - 10, step_up_reason="password changed")
    )
    rt = factories.runtime(store=alice)
    findings = await check(alices(rt), rt)
    assert factories.verdicts(findings) == [(Reason.SIGNAL_STEP_UP, Verdict.STEP_UP)]
    await alice.save_session(factories.session(mfa_at=factories.NOW - 5))
    assert await check(alices(rt), rt) == []  # answered since


# --- the second factor -----------------------------------------------------------------------


def signed_in(rt: Runtime) -> RequestContext:
    """alice, identified by the session she signed in with (a person, not a machine)."""
    ctx = alices(rt)
    ctx.identity = Identity(user="alice", source="session", device_id="alice-laptop")
    return ctx


@pytest.mark.parametrize(
    ("mfa_at", "asked"),
    [(None, True), (factories.NOW - 7200, True), (factories.NOW - 60, False)],
)
async def test_a_route_asking_for_a_recent_second_factor(
    store: SQLiteStore, mfa_at: float | None, asked: bool
) -> None:
    await store.save_session(factories.session(mfa_at=mfa_at))
    rt = factories.runtime(store=store, session={"mfa_max_age": 3600})
    ctx = signed_in(rt)
    findings = await check(ctx, rt)
    assert factories.verdicts(findings) == (
        [(Reason.MFA_REQUIRED, Verdict.STEP_UP)] if asked else []
    )
    assert ctx.mfa_max_age == (3600 if asked else None)


@pytest.mark.parametrize(
    ("extra", "asked"),
    [
        ({MFA_METHOD: "totp"}, True),
        ({MFA_METHOD: "webauthn"}, True),  # present, but the person was not verified
        ({MFA_METHOD: "webauthn", MFA_UV: True}, False),
    ],
)
async def test_a_route_asking_for_a_verified_security_key(
    store: SQLiteStore, extra: dict[str, Any], asked: bool
) -> None:
    await store.save_session(factories.session(mfa_at=factories.NOW - 60, extra=extra))
    rt = factories.runtime(
        store=store,
        overrides={"server": {"public_url": "https://gateway.example"}},
        session={
            "mfa_max_age": 3600,
            "step_up_factors": ["webauthn"],
            "require_user_verification": True,
        },
    )
    findings = await check(signed_in(rt), rt)
    assert factories.verdicts(findings) == (
        [(Reason.MFA_REQUIRED, Verdict.STEP_UP)] if asked else []
    )


async def test_a_machine_known_by_its_certificate_alone_is_not_asked_for_a_second_factor(
    alice: SQLiteStore,
) -> None:
    rt = factories.runtime(store=alice, session={"mfa_max_age": 3600})
    assert await check(alices(rt), rt) == []  # a certificate identity, on a login = "never" route
    assert factories.verdicts(await check(signed_in(rt), rt)) == [
        (Reason.MFA_REQUIRED, Verdict.STEP_UP)
    ]
