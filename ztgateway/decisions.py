"""Decide and record: the one path from a request context to a decision that counts.

Every entry point that judges a request goes through `DecisionPath.decide()`: the data plane,
the WebSocket re-check, forward-auth, `/decide` and `policy explain` (the last two as a dry run
that records nothing). One path means no entry point can skip a step (security review M4:
forward-auth once skipped the session write-back, so a TERMINATE did not revoke the session).
Recording a decision is, in this order:

1. metrics (requests by route/verdict/reason, refusals by stage, would-deny, risk, anomaly);
2. the audit event (OPA decision-log shape); if the audit log is failing, the decision becomes
   a 503 `service-unavailable` (a decision nobody can account for is not acted on);
3. the session and risk write-back (`SessionKeeper.after_decision`: touch, anomaly, failed
   attempts, revocation on TERMINATE; `SessionKeeper.remember()` after an ALLOW); a store fault is a 503.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .audit import AuditLog, AuditUnavailable, MaskKey, mask_headers, mask_query
from .context import RequestContext
from .decision import Decision, Finding, Reason, Verdict
from .metrics import Metrics
from .sessions import SessionKeeper
from .store.base import StoreUnavailable

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .runtime import Runtime

log = logging.getLogger("ztgateway.decisions")
RETRY_AFTER = 5.0


@dataclass(slots=True)
class Outcome:
    """A decision as recorded (sessions start at sign-in, never as a side effect here)."""

    decision: Decision


def refusal(ctx: RequestContext, reason: Reason, detail: str, stage: str = "request") -> Decision:
    """A refusal decided outside the pipeline (the protocol, an endpoint), with its finding."""
    finding = Finding(stage, reason, Verdict.DENY, detail=detail)
    ctx.findings.append(finding)
    return Decision(ctx.decision_id, Verdict.DENY, reason, (finding,))


def unavailable(ctx: RequestContext, detail: str) -> Decision:
    ctx.retry_after = max(ctx.retry_after or 0.0, RETRY_AFTER)
    return refusal(ctx, Reason.SERVICE_UNAVAILABLE, detail)


def audit_event(
    ctx: RequestContext,
    decision: Decision,
    revision: str,
    *,
    recheck: bool = False,
    mask_key: MaskKey | None = None,
) -> dict[str, Any]:
    """The one decision-log event shape (OPA's): input (secrets masked with the keyed MAC of
    audit/keys.py), result, revision."""
    headers, masked = _masked_headers(tuple(ctx.headers.items()), mask_key)
    query, masked_q = mask_query(ctx.query, key=mask_key)
    ident = ctx.identity
    cert = ctx.cert
    event: dict[str, Any] = {
        "decision_id": ctx.decision_id,
        "type": "ztgw.decision",
        "route": ctx.route.name if ctx.route else None,
        "input": {
            "method": ctx.method,
            "host": ctx.host,
            "path": ctx.path,
            "raw_path": ctx.raw_path if ctx.path != ctx.raw_path else None,
            "query": query,
            "client_ip": ctx.client_ip,
            "peer_ip": ctx.peer_ip,
            "user": ident.user if ident else None,
            "device": cert.device_id if cert else None,
            # The stored session's id (a hash, never the cookie or token): what `sessions
            # show` lists and `audit search --session` finds.
            "session": ctx.session.session_id if ctx.session else None,
            "cert": cert.to_json() if cert else None,
            "headers": headers,
            "websocket": ctx.websocket,
        },
        "identity": ident.to_json() if ident else None,
        "result": {
            "verdict": decision.verdict.label,
            "reason": decision.reason.value,
            "findings": [f.to_json() for f in decision.findings],
            "monitor": decision.monitor,
            "would_verdict": decision.would_verdict.label if decision.would_verdict else None,
        },
        "masked": sorted(masked + masked_q),
        "policy_revision": revision,
    }
    if recheck:
        event["input"]["websocket_recheck"] = True
    if ctx.protocol_error:
        event["input"]["protocol_error"] = ctx.protocol_error
    return event


@functools.lru_cache(maxsize=1024)
def _masked_headers(
    items: tuple[tuple[str, str], ...], key: MaskKey | None
) -> tuple[dict[str, str], list[str]]:
    """Masked once per distinct set of header fields and mask key: a client sends the same
    ones again and again (the profile in place put masking at ~3% of a request). The event
    encoder only reads the dict, so sharing it between events is safe."""
    return mask_headers(items, key=key)


def explain_json(ctx: RequestContext, decision: Decision) -> dict[str, Any]:
    """A decision with the request facts it was made on, as `/decide` and `policy explain` show it."""
    out = decision.to_json()
    out["route"] = ctx.route.name if ctx.route else None
    out["mode"] = ctx.route.mode if ctx.route else None
    out["path"] = ctx.path
    out["identity"] = ctx.identity.to_json() if ctx.identity else None
    out["device"] = ctx.cert.device_id if ctx.cert else None
    out["status"] = decision.status
    return out


class Recorder:
    """Where decisions are recorded: metrics, the audit log, the session keeper."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        audit: AuditLog,
        keeper: SessionKeeper,
        revision: Callable[[], str],
        mask_key: Callable[[], MaskKey | None] = lambda: None,
    ) -> None:
        self.metrics = metrics
        self.audit = audit
        self.keeper = keeper
        self.revision = revision
        self.mask_key = mask_key

    def count(self, ctx: RequestContext, decision: Decision) -> None:
        m = self.metrics
        route = ctx.route
        route_label = route.name if route else "-"
        m.requests.labels(route_label, decision.verdict.label, decision.reason.value).inc()
        if decision.monitor:
            m.would_deny.labels(route_label, decision.reason.value).inc()
        elif not decision.allowed:
            stage = next(
                (f.stage for f in decision.findings if f.reason is decision.reason and f.verdict),
                "request",
            )
            m.refusals.labels(route_label, stage, decision.reason.value).inc()
            if decision.verdict is Verdict.TERMINATE:
                m.terminations.labels(route_label, decision.reason.value).inc()
            elif decision.verdict is Verdict.STEP_UP:
                m.step_ups.labels("issued").inc()
        if route is not None:
            m.risk_score.labels(route_label).observe(ctx.risk_score)
            if decision.reason in (Reason.RISK_STEP_UP, Reason.RISK_DENIED):
                top = next(
                    (
                        f.reason.value
                        for f in decision.findings
                        if f.stage == "risk" and f.verdict is None
                    ),
                    "none",
                )
                m.risk_refusals.labels(route_label, decision.verdict.label, top).inc()
        if ctx.session is not None and ctx.session.session is not None:
            m.anomaly_score.observe(ctx.session.anomaly)

    def audit_record(self, ctx: RequestContext, decision: Decision, *, recheck: bool) -> None:
        """Raises AuditUnavailable (counted): the caller must not act on the decision."""
        if not self.audit.healthy:
            # SECURITY: the audit writer is failing (disk full, read-only database): refuse
            # rather than act on decisions nobody will be able to account for.
            self.metrics.audit_unavailable.inc()
            raise AuditUnavailable("audit log is failing")
        try:
            self.audit.record(
                audit_event(
                    ctx, decision, self.revision(), recheck=recheck, mask_key=self.mask_key()
                )
            )
        except AuditUnavailable:
            self.metrics.audit_unavailable.inc()
            raise

    def record(self, ctx: RequestContext, decision: Decision) -> None:
        """Count and audit a decision taken outside the pipeline (no session write-back)."""
        self.count(ctx, decision)
        self.audit_record(ctx, decision, recheck=False)


class DecisionPath:
    """context → pipeline → recorded decision; `recorder=None` judges only (explain)."""

    def __init__(self, recorder: Recorder | None) -> None:
        self.recorder = recorder

    async def decide(
        self,
        ctx: RequestContext,
        rt: Runtime,
        pipeline: Pipeline,
        *,
        dry: bool = False,
        recheck: bool = False,
    ) -> Outcome:
        rec = self.recorder
        if dry or rec is None:
            return Outcome(await pipeline.evaluate(ctx))
        store = rt.store
        if store is not None and not store.healthy:
            # SECURITY: a revocation made elsewhere may not have reached us: refuse until the
            # store is back (and, for Redis, resynchronised) rather than trust a stale cache.
            rec.metrics.store_errors.inc()
            return self._recorded(ctx, unavailable(ctx, "state store unavailable"))
        started = rt.clock.monotonic()
        decision = await pipeline.evaluate(ctx)
        rec.metrics.decision_seconds.observe(rt.clock.monotonic() - started)
        rec.count(ctx, decision)
        try:
            if not (recheck and decision.allowed):
                # An open WebSocket re-verified every few seconds is audited when it turns.
                rec.audit_record(ctx, decision, recheck=recheck)
            await rec.keeper.after_decision(ctx, decision)
            if decision.allowed:
                rec.keeper.remember(ctx)
        except AuditUnavailable:
            return Outcome(unavailable(ctx, "audit log is failing"))
        except StoreUnavailable:
            rec.metrics.store_errors.inc()
            return Outcome(unavailable(ctx, "state store unavailable"))
        return Outcome(decision)

    def _recorded(self, ctx: RequestContext, decision: Decision) -> Outcome:
        """Record a refusal decided before the pipeline; a failing audit is still a 503."""
        assert self.recorder is not None
        try:
            self.recorder.record(ctx, decision)
        except AuditUnavailable:
            return Outcome(unavailable(ctx, "audit log is failing"))
        return Outcome(decision)

    def refuse(self, ctx: RequestContext, reason: Reason, detail: str, stage: str) -> Outcome:
        """A refusal decided before the pipeline (protocol, endpoints): recorded the same way."""
        return self._recorded(ctx, refusal(ctx, reason, detail, stage))
