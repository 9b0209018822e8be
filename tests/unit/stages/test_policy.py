"""The policy stage, rule by rule: methods, paths, network zones, time windows, certificate
subjects and SANs, who is asking (nobody, users, groups, roles, scopes, claims). Each rule:
missing (not configured: no effect), refused, allowed; and only when nothing refuses, the one
ALLOW of the pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from tests import factories
from ztgateway.context import Identity, RequestContext
from ztgateway.decision import Finding, Reason, Verdict
from ztgateway.runtime import Runtime
from ztgateway.stages.policy import PolicyStage

ALLOWED = [(Reason.POLICY_ALLOWED, Verdict.ALLOW)]


async def check(ctx: RequestContext, rt: Runtime) -> Sequence[Finding]:
    return await PolicyStage(rt).check(ctx)


def token_identity(**claims: Any) -> Identity:
    return Identity(
        user="alice",
        source="token",
        groups=frozenset(claims.pop("groups", ())),
        roles=frozenset(claims.pop("roles", ())),
        scopes=frozenset(claims.pop("scopes", ())),
        claims=claims,
    )


async def test_a_route_with_no_rules_allows_an_identified_request() -> None:
    rt = factories.runtime()
    assert factories.verdicts(await check(factories.identified(rt), rt)) == ALLOWED


# --- methods and paths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "allowed"), [("GET", True), ("HEAD", True), ("POST", False), ("DELETE", False)]
)
async def test_methods(method: str, allowed: bool) -> None:
    rt = factories.runtime(policy={"methods": ["GET"]})
    expected = ALLOWED if allowed else [(Reason.METHOD_NOT_ALLOWED, Verdict.DENY)]
    assert factories.verdicts(await check(factories.identified(rt, method=method), rt)) == expected


@pytest.mark.parametrize(
    ("path", "case_insensitive", "allowed"),
    [
        ("/reports/q1.pdf", False, True),
        ("/Reports/q1.pdf", False, False),
        ("/Reports/q1.pdf", True, True),
        ("/admin/", False, False),
        ("/reports;x=1/q1.pdf", False, True),  # matched as the upstream reads it
    ],
)
async def test_paths(path: str, case_insensitive: bool, allowed: bool) -> None:
    upstream = {
        "upstreams": {"demo": {"url": "http://127.0.0.1:9", "case_insensitive": case_insensitive}}
    }
    cfg = factories.config(upstream, policy={"paths": ["/reports/*"]}, allow_path_params=True)
    rt = factories.runtime(cfg)
    expected = ALLOWED if allowed else [(Reason.PATH_DENIED, Verdict.DENY)]
    assert factories.verdicts(await check(factories.identified(rt, path=path), rt)) == expected


# --- where and when --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "allowed"), [("10.1.2.3", True), ("127.0.0.1", False), ("not-an-address", False)]
)
async def test_network_zones(ip: str, allowed: bool) -> None:
    rt = factories.runtime(policy={"zones": ["corp"]})
    expected = ALLOWED if allowed else [(Reason.NETWORK_ZONE_DENIED, Verdict.DENY)]
    assert factories.verdicts(await check(factories.identified(rt, client_ip=ip), rt)) == expected


@pytest.mark.parametrize(
    ("when", "allowed"),
    [
        (datetime(2027, 3, 10, 10, 0, tzinfo=UTC), True),  # Wednesday, 11:00 in Paris
        (datetime(2027, 3, 10, 19, 0, tzinfo=UTC), False),  # Wednesday, 20:00 in Paris
        (datetime(2027, 3, 13, 10, 0, tzinfo=UTC), False),  # Saturday
    ],
)
async def test_time_windows_in_the_routes_time_zone(when: datetime, allowed: bool) -> None:
    rt = factories.runtime(
        policy={"time_windows": ["mon-fri 08:00-18:00"], "timezone": "Europe/Paris"}
    )
    expected = ALLOWED if allowed else [(Reason.TIME_WINDOW_DENIED, Verdict.DENY)]
    assert (
        factories.verdicts(await check(factories.identified(rt, now=when.timestamp()), rt))
        == expected
    )


async def test_a_window_across_midnight_belongs_to_the_day_it_starts() -> None:
    rt = factories.runtime(policy={"time_windows": ["fri 22:00-06:00"]})
    saturday_3am = datetime(2027, 3, 13, 3, 0, tzinfo=UTC).timestamp()
    sunday_3am = datetime(2027, 3, 14, 3, 0, tzinfo=UTC).timestamp()
    assert (
        factories.verdicts(await check(factories.identified(rt, now=saturday_3am), rt)) == ALLOWED
    )
    assert (
        factories.verdicts(await check(factories.identified(rt, now=sunday_3am), rt))[0][0]
        is Reason.TIME_WINDOW_DENIED
    )


# --- the certificate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "allowed"),
    [
        ({"cert_subjects": ["alice"]}, True),  # the common name
        ({"cert_subjects": ["alice-laptop"]}, True),  # the device id
        ({"cert_subjects": ["bob"]}, False),
        ({"cert_san_patterns": ["email:*@example.com"]}, True),
        ({"cert_san_patterns": ["email:*@other.example"]}, False),
    ],
)
async def test_certificate_subjects_and_sans(policy: dict[str, Any], allowed: bool) -> None:
    rt = factories.runtime(policy=policy)
    expected = ALLOWED if allowed else [(Reason.CLIENT_CERT_NOT_ALLOWED, Verdict.DENY)]
    assert factories.verdicts(await check(factories.identified(rt), rt)) == expected


async def test_certificate_rules_refuse_a_request_without_a_certificate() -> None:
    rt = factories.runtime(policy={"require_client_cert": False, "cert_subjects": ["alice"]})
    ctx = factories.identified(rt, identity=token_identity(), cert=None)
    assert factories.verdicts(await check(ctx, rt)) == [
        (Reason.CLIENT_CERT_NOT_ALLOWED, Verdict.DENY)
    ]


# --- who is asking ---------------------------------------------------------------------------


async def test_nobody_without_a_certificate_is_unauthenticated() -> None:
    rt = factories.runtime(policy={"require_client_cert": False})
    ctx = factories.identified(rt, identity=Identity(user=None, source="none"), cert=None)
    assert factories.verdicts(await check(ctx, rt)) == [
        (Reason.IDENTITY_UNAUTHENTICATED, Verdict.DENY)
    ]


async def test_a_device_without_a_user_passes_a_route_that_names_nobody() -> None:
    rt = factories.runtime()
    ctx = factories.identified(
        rt, identity=Identity(user=None, source="none", device_id="alice-laptop")
    )
    assert factories.verdicts(await check(ctx, rt)) == ALLOWED
    named = factories.runtime(policy={"users": ["alice"]})
    ctx = factories.identified(
        named, identity=Identity(user=None, source="none", device_id="alice-laptop")
    )
    assert factories.verdicts(await check(ctx, named)) == [
        (Reason.IDENTITY_UNAUTHENTICATED, Verdict.DENY)
    ]


@pytest.mark.parametrize(
    ("policy", "identity", "reason"),
    [
        ({"users": ["alice"]}, token_identity(), None),
        ({"users": ["bob"]}, token_identity(), Reason.USER_NOT_ALLOWED),
        ({"groups": ["admins"]}, token_identity(groups=["admins", "staff"]), None),
        ({"groups": ["admins"]}, token_identity(groups=["staff"]), Reason.GROUP_REQUIRED),
        ({"groups": ["admins"]}, token_identity(), Reason.GROUP_REQUIRED),
        ({"roles": ["auditor"]}, token_identity(roles=["auditor"]), None),
        ({"roles": ["auditor"]}, token_identity(roles=["viewer"]), Reason.ROLE_REQUIRED),
        ({"scopes": ["read", "write"]}, token_identity(scopes=["read", "write", "x"]), None),
        ({"scopes": ["read", "write"]}, token_identity(scopes=["read"]), Reason.SCOPE_INSUFFICIENT),
        ({"claims": {"dept": ["eng"]}}, token_identity(dept="eng"), None),
        ({"claims": {"dept": ["eng"]}}, token_identity(dept=["ops", "eng"]), None),
        ({"claims": {"mfa": ["true"]}}, token_identity(mfa=True), None),
        ({"claims": {"dept": ["eng"]}}, token_identity(dept="ops"), Reason.CLAIM_MISMATCH),
        ({"claims": {"dept": ["eng"]}}, token_identity(), Reason.CLAIM_MISMATCH),
        ({"claims": {"dept": ["eng"]}}, token_identity(dept={"eng": 1}), Reason.CLAIM_MISMATCH),
    ],
)
async def test_who_may_use_the_route(
    policy: dict[str, Any], identity: Identity, reason: Reason | None
) -> None:
    rt = factories.runtime(policy=policy)
    expected = ALLOWED if reason is None else [(reason, Verdict.DENY)]
    assert (
        factories.verdicts(await check(factories.identified(rt, identity=identity), rt)) == expected
    )


async def test_every_rule_that_refuses_is_reported() -> None:
    rt = factories.runtime(policy={"methods": ["GET"], "users": ["bob"], "zones": ["corp"]})
    findings = await check(factories.identified(rt, method="POST"), rt)
    assert [f.reason for f in findings] == [
        Reason.METHOD_NOT_ALLOWED,
        Reason.NETWORK_ZONE_DENIED,
        Reason.USER_NOT_ALLOWED,
    ]
