"""The one WWW-Authenticate builder (RFC 6750 §3, RFC 9470 §3): every refusal's challenge."""

from __future__ import annotations

from ztgateway.decision import Reason, Verdict
from ztgateway.responses import problem_parts, www_authenticate


def challenges(parts: tuple[int, list[tuple[str, str]], bytes]) -> list[str]:
    return [v for n, v in parts[1] if n.lower() == "www-authenticate"]


def test_a_step_up_says_how_and_how_recent_when_the_route_is_known() -> None:
    assert www_authenticate(
        Reason.RISK_STEP_UP,
        Verdict.STEP_UP,
        step_up_how="TOTP at /.ztgw/mfa/verify",
        mfa_max_age=600.5,
    ) == (
        'Bearer realm="ztgateway", error="insufficient_user_authentication", '
        'error_description="risk-step-up: complete TOTP at /.ztgw/mfa/verify", max_age=600'
    )


def test_a_step_up_without_a_route_names_only_the_reason() -> None:
    assert www_authenticate(Reason.MFA_REQUIRED, Verdict.DENY) == (
        'Bearer realm="ztgateway", error="insufficient_user_authentication", '
        'error_description="mfa-required"'
    )


def test_a_refusal_carries_exactly_one_challenge() -> None:
    parts = problem_parts(
        Reason.RISK_STEP_UP,
        "d1",
        verdict=Verdict.STEP_UP,
        step_up_how="a security key at /.ztgw/mfa",
        mfa_max_age=60,
    )
    assert challenges(parts) == [
        'Bearer realm="ztgateway", error="insufficient_user_authentication", '
        'error_description="risk-step-up: complete a security key at /.ztgw/mfa", max_age=60'
    ]


def test_token_and_scope_challenges() -> None:
    assert www_authenticate(Reason.TOKEN_REQUIRED, Verdict.DENY) == 'Bearer realm="ztgateway"'
    assert www_authenticate(Reason.TOKEN_EXPIRED, Verdict.DENY) == (
        'Bearer realm="ztgateway", error="invalid_token", error_description="token-expired"'
    )
    assert www_authenticate(Reason.SCOPE_INSUFFICIENT, Verdict.DENY) == (
        'Bearer realm="ztgateway", error="insufficient_scope", '
        'error_description="scope-insufficient"'
    )
    assert www_authenticate(Reason.DEVICE_REVOKED, Verdict.DENY) is None
