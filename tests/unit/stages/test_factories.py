"""The factories' defaults are a request the whole pipeline allows, and each part they build
is one the pipeline checks: change it, and the request is refused for that part."""

from __future__ import annotations

import dataclasses

import pytest

from tests import factories
from ztgateway.decision import Reason, Verdict
from ztgateway.store.sqlite import SQLiteStore


async def test_the_default_request_is_allowed(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    decision = await factories.pipeline(rt).evaluate(factories.context())
    assert (decision.verdict, decision.reason) == (Verdict.ALLOW, Reason.POLICY_ALLOWED)
    assert [f.stage for f in decision.findings] == ["policy"]


async def test_the_default_browser_session_is_allowed(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    ctx = factories.context(headers={"Cookie": f"__Host-ztgw-session={factories.COOKIE}"})
    decision = await factories.pipeline(rt).evaluate(ctx)
    assert decision.verdict is Verdict.ALLOW, decision.findings
    assert ctx.session is not None and ctx.session.session == alice.session(
        factories.session().session_id
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"cert": None}, Reason.CLIENT_CERT_REQUIRED),
        ({"cert": factories.cert(not_after=factories.NOW - 1)}, Reason.CLIENT_CERT_INVALID),
        ({"path": "/a/../../etc"}, Reason.PATH_INVALID),
        ({"host": "elsewhere.example", "path": "/x"}, None),
    ],
)
async def test_changing_one_part_is_refused_for_that_part(
    alice: SQLiteStore, change: dict[str, object], reason: Reason | None
) -> None:
    rt = factories.runtime(store=alice)
    decision = await factories.pipeline(rt).evaluate(factories.context(**change))
    if reason is None:  # the one route has no host: any host is served
        assert decision.allowed
    else:
        assert (decision.verdict, decision.reason) == (Verdict.DENY, reason)


async def test_an_unregistered_device_is_not_allowed_by_default(store: SQLiteStore) -> None:
    rt = factories.runtime(store=store)
    decision = await factories.pipeline(rt).evaluate(factories.context())
    assert (decision.verdict, decision.reason) == (Verdict.DENY, Reason.DEVICE_PENDING)


def test_factories_build_independent_values() -> None:
    a, b = factories.config_data(), factories.config_data(policy={"users": ["bob"]})
    assert "policy" not in a["routes"][0] and b["routes"][0]["policy"] == {"users": ["bob"]}
    assert dataclasses.replace(factories.cert(), user="bob").user == "bob"
    assert factories.cert().user == "alice"
