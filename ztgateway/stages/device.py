"""The device stage: who the device is, whether it is approved, and whether its posture holds.

Trust levels are ordered — unknown < registered < approved < compliant — and a route states the
minimum it needs. A device seen for the first time is registered (pending, or approved at once
where configured); a revoked device is refused everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..config import TRUST_LEVELS
from ..context import DeviceView, RequestContext
from ..decision import Finding, Reason, Verdict
from ..risk.posture import PostureEvaluation, evaluate
from ..signals.compliance import apply_verdict, record_key
from ..store.base import REBIND_NEXT, Device, PostureRecord

if TYPE_CHECKING:
    from ..edge.tls import CertInfo
    from ..runtime import Runtime

NAME = "device"


def new_device(cert: CertInfo, now: float, ip: str, *, approved: bool) -> Device:
    """The registry entry of a device's first contact, pinned to its certificate's key."""
    return Device(
        device_id=cert.device_id,
        fingerprint=cert.fingerprint_sha256,
        subject=cert.subject,
        owner=cert.user,
        state="approved" if approved else "pending",
        first_seen=now,
        last_seen=now,
        last_ip=ip,
        spki=cert.spki_sha256,
    )


def trust_rank(level: str) -> int:
    return TRUST_LEVELS.index(level)


def posture_for(
    runtime: Runtime, device_id: str, *, now: float, require_signed: bool
) -> PostureEvaluation:
    store = runtime.store
    record = store.posture(device_id) if store is not None else None
    verdict = store.posture(record_key(device_id)) if store is not None else None
    return apply_verdict(_judge(runtime, record, now=now, require_signed=require_signed), verdict)


def _judge(
    runtime: Runtime, record: PostureRecord | None, *, now: float, require_signed: bool
) -> PostureEvaluation:
    return evaluate(
        record.report if record else None,
        record.received_at if record else None,
        runtime.config.posture,
        now=now,
        signed=record.signed if record else False,
        require_signed=require_signed,
    )


class DeviceStage:
    name = NAME

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.auto_approve = runtime.config.devices.auto_approve
        self.owner_mismatch_denies = runtime.config.devices.owner_mismatch == "deny"
        self.default_min_trust = runtime.config.devices.default_min_trust
        # device id, require_signed -> (the report and the transmitter's verdict it judged,
        # valid until, evaluation)
        self._evaluations: dict[
            tuple[str, bool],
            tuple[PostureRecord | None, PostureRecord | None, float, PostureEvaluation],
        ] = {}

    async def check(self, ctx: RequestContext) -> Sequence[Finding]:
        route = ctx.route
        assert route is not None
        policy = route.policy
        cert = ctx.cert
        out: list[Finding] = []
        if cert is None or self.store is None:
            ctx.device = DeviceView(None, "unknown", None)
            return self._trust_findings(ctx, policy.min_trust or "unknown", out)
        device = self.store.device(cert.device_id)
        new = False
        if device is None:
            fresh = new_device(cert, ctx.now, ctx.client_ip, approved=self.auto_approve)
            device = fresh if self.runtime.dry_run else await self.store.register_device(fresh)
            new = True
        elif not self.runtime.dry_run:
            self.store.touch_device(device.device_id, ctx.now, ctx.client_ip)
        if device.state == "revoked":
            ctx.device = DeviceView(device, "unknown", None, new)
            return [Finding(NAME, Reason.DEVICE_REVOKED, Verdict.DENY, detail=device.device_id)]
        if device.spki != cert.spki_sha256:
            pinned = await self._pin(device, cert)
            if pinned is None:
                # SECURITY: another key under this device's id (a certificate issued with the
                # same device URI) inherits nothing: not its approval, posture or sessions
                # (security review L9). An operator re-binds a re-keyed device.
                ctx.device = DeviceView(device, "unknown", None, new)
                return [
                    Finding(
                        NAME,
                        Reason.DEVICE_KEY_MISMATCH,
                        Verdict.DENY,
                        detail=f"{device.device_id}: key {cert.spki_sha256[:16]}, pinned "
                        f"{(device.spki or device.fingerprint)[:16]}",
                    )
                ]
            device = pinned
        if device.fingerprint != cert.fingerprint_sha256:
            # Same device and key, another certificate (renewed): fine, since the CA issued
            # it, but worth seeing in the audit trail.
            out.append(
                Finding(NAME, Reason.DEVICE_UNKNOWN, None, risk=0.1, detail="certificate changed")
            )
        user = ctx.identity.user if ctx.identity else None
        if user and device.owner and user != device.owner:
            out.append(
                Finding(
                    NAME,
                    Reason.DEVICE_OWNER_MISMATCH,
                    Verdict.DENY if self.owner_mismatch_denies else None,
                    risk=0.5,
                    detail=f"device of {device.owner} used by {user}",
                )
            )
        evaluation = self._evaluate(device.device_id, ctx.now, policy.require_signed_posture)
        trust = "registered"
        if device.state == "approved":
            trust = "compliant" if evaluation.compliant else "approved"
        ctx.device = DeviceView(device, trust, evaluation, new)
        return self._trust_findings(ctx, policy.min_trust or self.default_min_trust, out)

    async def _pin(self, device: Device, cert: CertInfo) -> Device | None:
        """The device pinned to `cert`'s key where that is still open, else None (refuse)."""
        if device.spki == REBIND_NEXT or (
            device.spki is None and device.fingerprint == cert.fingerprint_sha256
        ):
            # An operator's re-bind, or a row from before pinning meeting the certificate it
            # registered with: this key is the device's from now on.
            if self.runtime.dry_run or self.store is None:
                return device
            bound = await self.store.bind_device_key(
                device.device_id, cert.spki_sha256, cert.fingerprint_sha256, cert.subject
            )
            return bound or device
        return None

    def _evaluate(self, device_id: str, now: float, require_signed: bool) -> PostureEvaluation:
        """The device's posture judged against the policy, reused while nothing can change it.

        A verdict only changes with a new report (another record object), with time (the report
        ages past `max_report_age`, or the patch age crosses midnight) or with a reload (a new
        stage). So one evaluation serves a device for up to a second, and never past the moment
        its report goes stale: issue 9's profile had it re-judged on every request.
        """
        assert self.store is not None
        record = self.store.posture(device_id)
        # A transmitter's verdict (CAEP device-compliance-change) counts beside the report.
        verdict = self.store.posture(record_key(device_id))
        key = (device_id, require_signed)
        hit = self._evaluations.get(key)
        if hit is not None and hit[0] is record and hit[1] is verdict and now < hit[2]:
            return hit[3]
        evaluation = apply_verdict(
            _judge(self.runtime, record, now=now, require_signed=require_signed), verdict
        )
        valid_until = now + 1.0
        if evaluation.reported_at is not None:
            valid_until = min(
                valid_until, evaluation.reported_at + self.runtime.config.posture.max_report_age
            )
        if len(self._evaluations) >= 100_000:
            self._evaluations.clear()
        self._evaluations[key] = (record, verdict, valid_until, evaluation)
        return evaluation

    def _trust_findings(
        self, ctx: RequestContext, minimum: str, out: list[Finding]
    ) -> list[Finding]:
        view = ctx.device
        assert view is not None
        if trust_rank(view.trust) >= trust_rank(minimum):
            return out
        if view.device is None:
            reason, detail = Reason.DEVICE_UNKNOWN, "no registered device"
        elif view.device.state == "pending":
            reason, detail = Reason.DEVICE_PENDING, "awaiting approval"
        elif view.posture is not None and view.posture.stale and len(view.posture.failed) == 1:
            reason, detail = Reason.POSTURE_STALE, "posture report too old"
        else:
            failed = view.posture.failed if view.posture else []
            reason, detail = Reason.DEVICE_NONCOMPLIANT, "failed: " + ", ".join(failed)
        out.append(
            Finding(
                NAME, reason, Verdict.DENY, detail=f"{detail} (needs {minimum}, is {view.trust})"
            )
        )
        return out
