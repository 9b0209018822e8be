"""The device stage, check by check: a certificate or none, the registry (first contact,
pending, approved, revoked), the key the device is pinned to, a renewed certificate, the owner,
and the trust level the route needs (registered, approved, compliant: posture). Each check:
missing, invalid, valid."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from tests import factories
from ztgateway.context import RequestContext
from ztgateway.decision import Finding, Reason, Verdict
from ztgateway.runtime import Runtime
from ztgateway.stages.device import DeviceStage
from ztgateway.store.base import REBIND_NEXT
from ztgateway.store.sqlite import SQLiteStore


async def check(ctx: RequestContext, rt: Runtime) -> Sequence[Finding]:
    return await DeviceStage(rt).check(ctx)


async def test_an_approved_device_is_trusted_as_approved(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    ctx = factories.identified(rt)
    assert await check(ctx, rt) == []
    assert ctx.device is not None and (ctx.device.trust, ctx.device.new) == ("approved", False)


async def test_its_contact_is_recorded(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    await check(factories.identified(rt, client_ip="127.0.0.9", now=factories.NOW + 5), rt)
    seen = alice.device(factories.DEVICE_ID)
    assert seen is not None and (seen.last_seen, seen.last_ip) == (factories.NOW + 5, "127.0.0.9")


# --- no certificate, no device ---------------------------------------------------------------


async def test_no_certificate_is_an_unknown_device_held_to_the_routes_minimum(
    store: SQLiteStore,
) -> None:
    open_route = factories.runtime(store=store, policy={"require_client_cert": False})
    ctx = factories.routed(open_route, cert=None)
    assert await check(ctx, open_route) == []  # no certificate: the minimum is "unknown"
    assert ctx.device is not None and ctx.device.trust == "unknown"
    strict = factories.runtime(
        store=store, policy={"require_client_cert": False, "min_trust": "registered"}
    )
    findings = await check(factories.routed(strict, cert=None), strict)
    assert factories.verdicts(findings) == [(Reason.DEVICE_UNKNOWN, Verdict.DENY)]


async def test_first_contact_registers_the_device_pending(store: SQLiteStore) -> None:
    rt = factories.runtime(store=store)
    ctx = factories.identified(rt)
    assert factories.verdicts(await check(ctx, rt)) == [(Reason.DEVICE_PENDING, Verdict.DENY)]
    registered = store.device(factories.DEVICE_ID)
    assert registered is not None and registered.state == "pending"
    assert registered.spki == factories.cert().spki_sha256
    assert ctx.device is not None and ctx.device.new


async def test_first_contact_is_approved_where_devices_are_approved_automatically(
    store: SQLiteStore,
) -> None:
    rt = factories.runtime(store=store, overrides={"devices": {"auto_approve": True}})
    assert await check(factories.identified(rt), rt) == []


async def test_a_dry_run_registers_nothing(store: SQLiteStore) -> None:
    rt = factories.runtime(store=store, dry_run=True)
    assert factories.verdicts(await check(factories.identified(rt), rt)) == [
        (Reason.DEVICE_PENDING, Verdict.DENY)
    ]
    assert store.device(factories.DEVICE_ID) is None


async def test_a_pending_device_meets_a_registered_minimum(store: SQLiteStore) -> None:
    await store.register_device(factories.device(state="pending"))
    rt = factories.runtime(store=store, policy={"min_trust": "registered"})
    assert await check(factories.identified(rt), rt) == []


async def test_a_revoked_device_is_refused(store: SQLiteStore) -> None:
    await store.register_device(factories.device(state="revoked"))
    rt = factories.runtime(store=store, policy={"min_trust": "unknown"})
    assert factories.verdicts(await check(factories.identified(rt), rt)) == [
        (Reason.DEVICE_REVOKED, Verdict.DENY)
    ]


# --- the key the device is pinned to ---------------------------------------------------------


async def test_another_key_under_the_devices_id_is_refused(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    other = factories.cert(spki_sha256="0e" * 32, fingerprint_sha256="0f" * 32)
    findings = await check(factories.identified(rt, cert=other), rt)
    assert factories.verdicts(findings) == [(Reason.DEVICE_KEY_MISMATCH, Verdict.DENY)]


async def test_a_device_an_operator_rebound_takes_the_next_key(store: SQLiteStore) -> None:
    await store.register_device(factories.device(spki=REBIND_NEXT))
    rt = factories.runtime(store=store)
    renewed = factories.cert(spki_sha256="0e" * 32)
    assert await check(factories.identified(rt, cert=renewed), rt) == []
    bound = store.device(factories.DEVICE_ID)
    assert bound is not None and bound.spki == "0e" * 32


async def test_a_row_from_before_pinning_is_pinned_to_the_certificate_it_registered_with(
    store: SQLiteStore,
) -> None:
    await store.register_device(factories.device(spki=None))
    rt = factories.runtime(store=store)
    assert await check(factories.identified(rt), rt) == []
    pinned = store.device(factories.DEVICE_ID)
    assert pinned is not None and pinned.spki == factories.cert().spki_sha256


async def test_a_renewed_certificate_with_the_same_key_is_noted(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice)
    renewed = factories.cert(fingerprint_sha256="ee" * 32)
    findings = await check(factories.identified(rt, cert=renewed), rt)
    assert factories.verdicts(findings) == [(Reason.DEVICE_UNKNOWN, None)]
    assert findings[0].detail == "certificate changed"


# --- the owner -------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "verdict"), [("deny", Verdict.DENY), ("risk", None)])
async def test_a_device_used_by_another_user(
    alice: SQLiteStore, mode: str, verdict: Verdict | None
) -> None:
    rt = factories.runtime(store=alice, overrides={"devices": {"owner_mismatch": mode}})
    ctx = factories.identified(rt)
    ctx.identity = factories.cert_identity(factories.cert(user="bob"))
    findings = await check(ctx, rt)
    assert factories.verdicts(findings) == [(Reason.DEVICE_OWNER_MISMATCH, verdict)]


# --- posture: the compliant trust level ------------------------------------------------------


async def test_no_posture_report_is_not_compliant(alice: SQLiteStore) -> None:
    rt = factories.runtime(store=alice, policy={"min_trust": "compliant"})
    findings = await check(factories.identified(rt), rt)
    assert factories.verdicts(findings) == [(Reason.DEVICE_NONCOMPLIANT, Verdict.DENY)]
    assert "report_missing" in findings[0].detail


async def test_a_compliant_report_makes_the_device_compliant(alice: SQLiteStore) -> None:
    await alice.put_posture(factories.posture())
    rt = factories.runtime(store=alice, policy={"min_trust": "compliant"})
    ctx = factories.identified(rt)
    assert await check(ctx, rt) == []
    assert ctx.device is not None and ctx.device.trust == "compliant"


async def test_a_report_failing_a_check_is_not_compliant(alice: SQLiteStore) -> None:
    await alice.put_posture(factories.posture(firewall=False))
    rt = factories.runtime(store=alice, policy={"min_trust": "compliant"})
    findings = await check(factories.identified(rt), rt)
    assert factories.verdicts(findings) == [(Reason.DEVICE_NONCOMPLIANT, Verdict.DENY)]
    assert "firewall" in findings[0].detail


async def test_an_old_report_is_stale(alice: SQLiteStore) -> None:
    await alice.put_posture(factories.posture(collected_at=factories.NOW - 3 * 86400))
    rt = factories.runtime(store=alice, policy={"min_trust": "compliant"})
    findings = await check(factories.identified(rt), rt)
    assert factories.verdicts(findings) == [(Reason.POSTURE_STALE, Verdict.DENY)]


async def test_an_unsigned_report_where_the_route_requires_a_signed_one(
    alice: SQLiteStore,
) -> None:
    await alice.put_posture(dataclasses.replace(factories.posture(), signed=False))
    takes_any = factories.runtime(store=alice, policy={"min_trust": "compliant"})
    assert await check(factories.identified(takes_any), takes_any) == []
    signed = factories.runtime(
        store=alice, policy={"min_trust": "compliant", "require_signed_posture": True}
    )
    findings = await check(factories.identified(signed), signed)
    assert factories.verdicts(findings) == [(Reason.DEVICE_NONCOMPLIANT, Verdict.DENY)]
    assert "report_unsigned" in findings[0].detail
