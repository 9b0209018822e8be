"""The policy matrix, monitor mode and the fail-closed pipeline, on the real stages."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_config
from tests.support import Certs, deep_merge, make_pki, to_toml
from ztgateway.clock import SYSTEM_CLOCK, Clock, ManualClock
from ztgateway.commands.policy import OfflineEvaluator, Request, load_cert
from ztgateway.config import load_config
from ztgateway.context import RequestContext
from ztgateway.decision import Finding, Reason, Verdict
from ztgateway.dev.tokens import issue_token
from ztgateway.pipeline import Pipeline


def evaluator(
    certs: Certs,
    tmp_path: Path,
    routes: list[dict[str, Any]],
    clock: Clock = SYSTEM_CLOCK,
    **over: Any,
) -> OfflineEvaluator:
    cfg = deep_merge(base_config(certs, 9, tmp_path), over)
    cfg["routes"] = routes
    path = tmp_path / "gw.toml"
    path.write_text(to_toml(cfg))
    return OfflineEvaluator(load_config(path), clock=clock)


def token(certs: Certs, **kw: Any) -> str:
    kw.setdefault("sub", "alice")
    return issue_token(certs.issuer_key, **kw)


async def decide(ev: OfflineEvaluator, **kw: Any) -> tuple[Verdict, Reason, list[Reason]]:
    async with ev:
        _, d = await ev.evaluate(Request(**kw))
    return d.verdict, d.reason, [f.reason for f in d.findings if f.verdict is not None]


@pytest.fixture
def alice(certs: Certs) -> Any:
    return load_cert(str(certs.client("alice-laptop")[0]))


def r(policy: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return {"name": "t", "prefix": "/", "upstream": "demo", "policy": policy or {}, **kw}


async def test_certificate_identity_is_allowed_on_a_cert_only_route(
    certs: Certs, tmp_path: Path, alice: Any
) -> None:
    v, reason, _ = await decide(evaluator(certs, tmp_path, [r()]), cert=alice)
    assert (v, reason) == (Verdict.ALLOW, Reason.POLICY_ALLOWED)


async def test_no_certificate_on_a_route_that_requires_one_is_denied(
    certs: Certs, tmp_path: Path
) -> None:
    v, reason, _ = await decide(evaluator(certs, tmp_path, [r()]))
    assert (v, reason) == (Verdict.DENY, Reason.CLIENT_CERT_REQUIRED)


async def test_nobody_at_all_is_unauthenticated_not_forbidden(certs: Certs, tmp_path: Path) -> None:
    v, reason, _ = await decide(evaluator(certs, tmp_path, [r({"require_client_cert": False})]))
    assert (v, reason) == (Verdict.DENY, Reason.IDENTITY_UNAUTHENTICATED)
    assert reason.status == 401


@pytest.mark.parametrize(
    ("policy", "claims", "expected"),
    [
        ({"users": ["alice"]}, {}, Reason.POLICY_ALLOWED),
        ({"users": ["bob"]}, {}, Reason.USER_NOT_ALLOWED),
        ({"groups": ["admins"]}, {"groups": ["eng", "admins"]}, Reason.POLICY_ALLOWED),
        ({"groups": ["admins"]}, {"groups": ["eng"]}, Reason.GROUP_REQUIRED),
        ({"roles": ["payroll"]}, {"roles": ["payroll"]}, Reason.POLICY_ALLOWED),
        ({"roles": ["payroll"]}, {}, Reason.ROLE_REQUIRED),
        ({"scopes": ["read", "write"]}, {"scope": "read write admin"}, Reason.POLICY_ALLOWED),
        ({"scopes": ["read", "write"]}, {"scope": "read"}, Reason.SCOPE_INSUFFICIENT),
        (
            {"claims": {"department": "payroll"}},
            {"extra_claims": {"department": "payroll"}},
            Reason.POLICY_ALLOWED,
        ),
        (
            {"claims": {"department": ["hr", "payroll"]}},
            {"extra_claims": {"department": "it"}},
            Reason.CLAIM_MISMATCH,
        ),
    ],
)
async def test_token_policy_matrix(
    certs: Certs,
    tmp_path: Path,
    alice: Any,
    policy: dict[str, Any],
    claims: dict[str, Any],
    expected: Reason,
) -> None:
    ev = evaluator(certs, tmp_path, [r({"require_token": True, **policy})])
    v, reason, _ = await decide(ev, cert=alice, token=token(certs, **claims))
    assert reason == expected
    assert (v is Verdict.ALLOW) == (expected is Reason.POLICY_ALLOWED)


async def test_every_failed_rule_is_listed(certs: Certs, tmp_path: Path, alice: Any) -> None:
    ev = evaluator(
        certs, tmp_path, [r({"require_token": True, "groups": ["admins"], "scopes": ["write"]})]
    )
    _, _, reasons = await decide(ev, cert=alice, token=token(certs))
    assert Reason.GROUP_REQUIRED in reasons and Reason.SCOPE_INSUFFICIENT in reasons


async def test_methods_and_path_patterns(certs: Certs, tmp_path: Path, alice: Any) -> None:
    ev = evaluator(certs, tmp_path, [r({"methods": ["GET"], "paths": ["/reports/*"]})])
    assert (await decide(ev, cert=alice, path="/reports/q3"))[0] is Verdict.ALLOW
    assert (await decide(ev, cert=alice, method="HEAD", path="/reports/q3"))[0] is Verdict.ALLOW
    assert (await decide(ev, cert=alice, method="POST", path="/reports/q3"))[
        1
    ] is Reason.METHOD_NOT_ALLOWED
    assert (await decide(ev, cert=alice, path="/payroll"))[1] is Reason.PATH_DENIED


async def test_network_zones(certs: Certs, tmp_path: Path, alice: Any) -> None:
    ev = evaluator(certs, tmp_path, [r({"zones": ["corp"]})])
    assert (await decide(ev, cert=alice, ip="10.2.3.4"))[0] is Verdict.ALLOW
    assert (await decide(ev, cert=alice, ip="127.0.0.1"))[1] is Reason.NETWORK_ZONE_DENIED


async def test_time_windows_in_the_routes_time_zone(tmp_path: Path) -> None:
    # A fixed week, and a PKI and CRL made for it: nothing here was made "now".
    paris = dt.timezone(dt.timedelta(hours=1))  # January: CET
    monday_10 = dt.datetime(2030, 1, 7, 10, 0, tzinfo=paris)
    clock = ManualClock(monday_10 - dt.timedelta(days=1))
    pki = make_pki(tmp_path / "pki", clock)
    alice = load_cert(str(pki.client("alice-laptop")[0]))
    ev = evaluator(
        pki,
        tmp_path,
        [r({"time_windows": ["mon-fri 08:00-18:00"], "timezone": "Europe/Paris"})],
        clock=clock,
    )
    monday_20 = monday_10 + dt.timedelta(hours=10)
    saturday_10 = monday_10 + dt.timedelta(days=5)
    for moment, expected in (
        (monday_10, Reason.POLICY_ALLOWED),
        (monday_20, Reason.TIME_WINDOW_DENIED),
        (saturday_10, Reason.TIME_WINDOW_DENIED),
    ):
        clock.set(moment)
        assert (await decide(ev, cert=alice))[1] is expected, moment


async def test_certificate_subject_allow_list(certs: Certs, tmp_path: Path, alice: Any) -> None:
    bob = load_cert(str(certs.client("bob-phone")[0]))
    ev = evaluator(certs, tmp_path, [r({"cert_san_patterns": ["URI:urn:ztgw:device:alice-*"]})])
    assert (await decide(ev, cert=alice))[0] is Verdict.ALLOW
    assert (await decide(ev, cert=bob))[1] is Reason.CLIENT_CERT_NOT_ALLOWED


async def test_monitor_mode_forwards_but_records_would_deny(
    certs: Certs, tmp_path: Path, alice: Any
) -> None:
    ev = evaluator(certs, tmp_path, [r({"users": ["bob"]}, mode="monitor")])
    async with ev:
        _, d = await ev.evaluate(Request(cert=alice))
    assert d.verdict is Verdict.ALLOW and d.monitor
    assert d.would_verdict is Verdict.DENY and d.reason is Reason.USER_NOT_ALLOWED


async def test_monitor_mode_never_forwards_a_bad_path(
    certs: Certs, tmp_path: Path, alice: Any
) -> None:
    ev = evaluator(certs, tmp_path, [r(mode="monitor")])
    v, reason, _ = await decide(ev, cert=alice, path="/%2e%2e/etc/passwd")
    assert (v, reason) == (Verdict.DENY, Reason.PATH_INVALID)


async def test_unknown_path_is_route_not_found(certs: Certs, tmp_path: Path, alice: Any) -> None:
    ev = evaluator(certs, tmp_path, [{"name": "api", "prefix": "/api/", "upstream": "demo"}])
    assert (await decide(ev, cert=alice, path="/other"))[1] is Reason.ROUTE_NOT_FOUND


class Exploding:
    name = "exploding"

    async def check(self, ctx: RequestContext) -> Sequence[Finding]:
        raise RuntimeError("boom")


class Allowing:
    name = "sneaky"

    async def check(self, ctx: RequestContext) -> Sequence[Finding]:
        return [Finding(self.name, Reason.POLICY_ALLOWED, Verdict.ALLOW)]


class Silent:
    name = "silent"

    async def check(self, ctx: RequestContext) -> Sequence[Finding]:
        return []


async def test_a_stage_that_raises_denies_with_stage_error() -> None:
    errors: list[str] = []
    d = await Pipeline([Exploding()], on_stage_error=errors.append).evaluate(
        RequestContext.synthetic()
    )
    assert (d.verdict, d.reason) == (Verdict.DENY, Reason.STAGE_ERROR)
    assert errors == ["exploding"]


async def test_only_the_policy_stage_may_allow() -> None:
    d = await Pipeline([Allowing()]).evaluate(RequestContext.synthetic())
    assert (d.verdict, d.reason) == (Verdict.DENY, Reason.STAGE_ERROR)


async def test_no_verdict_at_all_is_a_deny() -> None:
    d = await Pipeline([Silent()]).evaluate(RequestContext.synthetic())
    assert d.verdict is Verdict.DENY


def test_verdicts_are_ordered_most_severe_last() -> None:
    assert Verdict.ALLOW < Verdict.STEP_UP < Verdict.DENY < Verdict.TERMINATE


def test_every_reason_has_a_status_and_a_summary() -> None:
    for reason in Reason:
        assert 200 <= reason.status < 600
        assert reason.summary
