"""The gateway's own endpoints under `/.ztgw/`, served on the mTLS port.

Each answers only to the presented client certificate (the device) and, where a person is
involved, to the verified identity; every refusal is problem+json with a decision id and an
audit event, like any other.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from aiohttp import web

from ..audit import AuditUnavailable
from ..context import RequestContext
from ..decision import Reason, Verdict
from ..edge.http1 import Request
from ..request.fetchmeta import wants_html
from ..responses import problem
from ..risk.posture import (
    MAX_CLOCK_SKEW,
    MAX_REPORT_BYTES,
    PostureError,
    digest,
    validate_report,
    verify_signed_report,
)
from ..stages.device import posture_for
from ..store.base import PostureRecord
from .forms import JSON_TYPE, media_type, read_checked_body
from .posture_text import check_text
from .redirect import local_redirect
from .render import json_answer, template_page
from .when import moment, zone

if TYPE_CHECKING:
    from ..services import Services

JOSE_TYPE = "application/jose"


def _audit(
    gw: Services, ctx: RequestContext, verdict: Verdict, reason: Reason, detail: str = ""
) -> None:
    gw.record_outcome(ctx, "endpoint", verdict, reason, detail)


def _refuse(
    gw: Services, ctx: RequestContext, reason: Reason, detail: str, *, accept: str = ""
) -> web.Response:
    try:
        _audit(gw, ctx, Verdict.DENY, reason, detail)
    except AuditUnavailable:
        return problem(Reason.SERVICE_UNAVAILABLE, ctx.decision_id, accept=accept, look=ctx.look)
    # The field name is ours (from validation), never the request's bytes.
    return problem(reason, ctx.decision_id, accept=accept, detail=detail, look=ctx.look)


async def posture_report(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """POST /.ztgw/posture: the presented certificate's device reports its posture.

    Only from the device's agent: another site's page could otherwise post for the visitor's
    device (the certificate is ambient), marking it compliant, or non-compliant, or stamping a
    future `collected_at` that refused the real agent's next reports as replays (issue 18, L2).
    So: `application/json` or `application/jose` only (never a CORS-safelisted type), refused
    when a browser says another site sent it, and a future `collected_at` bounded and never
    kept beyond the time the gateway received it.
    """
    store = gw.store
    raw = await read_checked_body(
        gw, request, ctx, JSON_TYPE, JOSE_TYPE, limit=MAX_REPORT_BYTES, stage="endpoint"
    )
    if isinstance(raw, web.Response):
        return raw
    cert = ctx.cert
    if cert is None:
        return _refuse(
            gw, ctx, Reason.CLIENT_CERT_REQUIRED, "posture reports need the device certificate"
        )
    if gw.tls.current.revocations.is_revoked(cert.serial):
        return _refuse(gw, ctx, Reason.CLIENT_CERT_REVOKED, "")
    device = store.device(cert.device_id)
    if device is not None and device.state == "revoked":
        return _refuse(gw, ctx, Reason.DEVICE_REVOKED, device.device_id)
    now = ctx.now
    try:
        signed = media_type(ctx.headers) == JOSE_TYPE
        if signed:
            doc: Any = verify_signed_report(raw.decode("ascii", "strict").strip(), cert.der)
        else:
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise PostureError("(body)", "not valid JSON") from exc
        report = validate_report(doc)
        if report.get("device_id") not in (None, cert.device_id):
            raise PostureError("device_id", "names another device than the presented certificate")
        collected = report.get("collected_at")
        if collected is not None and collected > now + MAX_CLOCK_SKEW:
            raise PostureError(
                "collected_at",
                f"is {collected - now:.0f} s ahead of the gateway's clock "
                f"(at most {MAX_CLOCK_SKEW:.0f} s of clock skew are accepted)",
            )
        previous = store.posture(cert.device_id)
        body_digest = digest(raw)
        if previous is not None:
            if previous.digest == body_digest and (signed or collected is not None):
                raise PostureError("(body)", "this exact report was already received", replay=True)
            if (
                collected is not None
                and previous.collected_at is not None
                and collected <= previous.collected_at
            ):
                raise PostureError("collected_at", "is not newer than the last report", replay=True)
    except PostureError as exc:
        reason = Reason.POSTURE_REPLAYED if exc.replay else Reason.POSTURE_INVALID
        gw.metrics.posture_reports.labels("refused").inc()
        return _refuse(gw, ctx, reason, f"{exc.field}: {exc.message}")
    except UnicodeDecodeError:
        gw.metrics.posture_reports.labels("refused").inc()
        return _refuse(gw, ctx, Reason.POSTURE_INVALID, "(body): not a compact JWS")
    if collected is not None and collected > now:
        # Within the skew, but kept as no later than its arrival: as the replay baseline it
        # must not hold back the agent's next report, nor make this one look fresh for longer.
        collected = now
        report["collected_at"] = now
    if device is None:
        # A device's first contact may be its agent: register it like a first request would.
        await gw.ensure_device(ctx)
    await store.put_posture(
        PostureRecord(
            device_id=cert.device_id,
            report=dict(report),
            received_at=now,
            collected_at=collected,
            signed=signed,
            digest=body_digest,
        )
    )
    evaluation = posture_for(gw.runtime, cert.device_id, now=now, require_signed=False)
    gw.metrics.posture_accepted(evaluation.compliant, evaluation.failed)
    try:
        _audit(gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, "posture report accepted")
    except AuditUnavailable:
        return problem(Reason.SERVICE_UNAVAILABLE, ctx.decision_id, look=ctx.look)
    return json_answer(
        {"device_id": cert.device_id, "accepted": True, "signed": signed, **evaluation.to_json()},
        ctx,
    )


async def device_status(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET /.ztgw/device: the device's state, last posture and what to fix (page or JSON)."""
    cert = ctx.cert
    accept = request.headers.get("Accept", "")
    if cert is None:
        return _refuse(gw, ctx, Reason.CLIENT_CERT_REQUIRED, "", accept=accept)
    device = gw.store.device(cert.device_id)
    evaluation = posture_for(gw.runtime, cert.device_id, now=ctx.now, require_signed=False)
    record = gw.store.posture(cert.device_id)
    data = {
        "device_id": cert.device_id,
        "state": device.state if device else "unknown",
        "owner": device.owner if device else cert.user,
        "certificate": {"subject": cert.subject, "not_after": cert.not_after},
        "posture": evaluation.to_json(),
        "last_report": record.report if record else None,
        "remediation": [c.remediation for c in evaluation.checks if not c.passed],
    }
    if not wants_html(accept):
        return json_answer(data, ctx)
    rd = parse_qs(ctx.query).get("rd", [""])[0]
    back = local_redirect(rd) if rd else ""
    views = [check_text(c) for c in evaluation.checks]
    gw.metrics.portal_views.labels("device", "shown").inc()
    owner = device.owner if device else cert.user
    account = gw.store.user(owner) if owner else None
    tz = zone(account.timezone if account else None, gw.config.risk.default_timezone)
    return template_page(
        "device.html",
        ctx,
        title="This device meets the security requirements"
        if evaluation.compliant
        else "This device does not meet the security requirements",
        device_id=cert.device_id,
        state=data["state"],
        owner=owner,
        failed=[v for v in views if not v.passed],
        checks=views,
        reported=moment(evaluation.reported_at, ctx.now, tz),
        rd=back,
        rd_query=quote(back, safe="/") if back else "",
    )
