"""The ordered list of stages and the one loop that turns their findings into a Decision.

The order is written in one place, `default_stages()` (mitmproxy's default_addons(), Envoy's
filter chain). The loop fails closed: a stage that raises becomes a `stage-error` DENY, no
verdict at all is a DENY, and only the policy stage may emit ALLOW.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from .context import RequestContext
from .decision import Decision, Finding, Reason, Verdict
from .stages.device import DeviceStage
from .stages.identity import IdentityStage
from .stages.policy import PolicyStage
from .stages.request import RequestStage
from .stages.risk import RiskStage, build_zones
from .stages.session import SessionStage
from .store.base import StoreUnavailable

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("ztgateway.pipeline")

# Refusals a route in monitor mode may turn into would-deny: never request-shape problems
# (there is nothing sane to forward), never faults (fail closed), and never an identity that
# failed its own checks: monitor mode observes the route's *policy*, it does not vouch for a
# revoked device, a locked account, a signed-out session or a forged token (security review
# L4: they were forwarded with identity headers and a fresh assertion). What is monitored is an
# authenticated identity (or none at all) that the route's rules would refuse.
_NEVER_MONITORED = frozenset(
    {
        Reason.PATH_INVALID,
        Reason.ROUTE_NOT_FOUND,
        Reason.REQUEST_INVALID,
        Reason.BODY_TOO_LARGE,
        Reason.HEADER_TOO_LARGE,
        Reason.TARGET_TOO_LONG,
        Reason.HOST_INVALID,
        Reason.HOST_MISDIRECTED,
        Reason.EXPECTATION_UNSUPPORTED,
        Reason.VERSION_UNSUPPORTED,
        Reason.REQUEST_TIMEOUT,
        Reason.WEBSOCKET_INVALID,
        Reason.STAGE_ERROR,
        Reason.SERVICE_UNAVAILABLE,
        Reason.CREDENTIALS_THROTTLED,
        Reason.ORIGIN_DENIED,
        Reason.CLIENT_CERT_REVOKED,
        Reason.CLIENT_CERT_STATUS_UNAVAILABLE,
        Reason.CLIENT_CERT_INVALID,
        Reason.DEVICE_REVOKED,
        Reason.DEVICE_KEY_MISMATCH,
        Reason.DEVICE_OWNER_MISMATCH,
        Reason.ACCOUNT_LOCKED,
        Reason.SESSION_TERMINATED,
        Reason.SESSION_EXPIRED,
        Reason.SESSION_INVALID,
        # A session of a provider the route refuses establishes no identity to forward.
        Reason.PROVIDER_NOT_ALLOWED,
        *(
            r
            for r in Reason
            # A token that was presented and failed; an absent one (token-required) is policy.
            if r.value.startswith("token-") and r is not Reason.TOKEN_REQUIRED
        ),
    }
)
ALLOW_ONLY_STAGE = "policy"


class Stage(Protocol):
    name: str

    async def check(self, ctx: RequestContext) -> Sequence[Finding]: ...


class Pipeline:
    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        on_stage_error: Callable[[str], None] | None = None,
    ) -> None:
        self.stages = tuple(stages)
        self._on_stage_error = on_stage_error

    async def evaluate(self, ctx: RequestContext) -> Decision:
        findings = ctx.findings
        worst = -1
        for stage in self.stages:
            try:
                produced = await stage.check(ctx)
            except StoreUnavailable as exc:
                # Shared state is out of reach: fail closed, and say it is temporary.
                log.warning("stage %s: state store unavailable: %s", stage.name, exc)
                ctx.retry_after = max(ctx.retry_after or 0.0, 5.0)
                produced = (
                    Finding(
                        stage.name,
                        Reason.SERVICE_UNAVAILABLE,
                        Verdict.DENY,
                        detail="state store unavailable",
                    ),
                )
            except Exception as exc:
                log.exception("stage %s failed for decision %s", stage.name, ctx.decision_id)
                if self._on_stage_error:
                    self._on_stage_error(stage.name)
                produced = (
                    Finding(
                        stage.name, Reason.STAGE_ERROR, Verdict.DENY, detail=type(exc).__name__
                    ),
                )
            for finding in produced:
                f = finding
                if f.verdict is Verdict.ALLOW and f.stage != ALLOW_ONLY_STAGE:
                    # SECURITY: only policy decides ALLOW; anything else is a bug, so deny.
                    f = Finding(
                        stage.name, Reason.STAGE_ERROR, Verdict.DENY, detail="allow outside policy"
                    )
                findings.append(f)
                if f.verdict is not None and f.verdict > worst:
                    worst = f.verdict
            if worst >= Verdict.DENY:
                break
        return decide(ctx, findings)


def decide(ctx: RequestContext, findings: list[Finding]) -> Decision:
    """The most severe finding wins; no verdict at all is a DENY."""
    blocking: Finding | None = None
    allow: Finding | None = None
    for f in findings:
        if f.verdict is None:
            continue
        if f.verdict is Verdict.STEP_UP and f.reason is Reason.RISK_STEP_UP and ctx.mfa_fresh:
            continue  # answered: the session passed a second factor within step_up_validity
        if f.verdict is Verdict.ALLOW:
            allow = allow or f
        elif blocking is None or f.verdict > blocking.verdict:  # type: ignore[operator]
            blocking = f
    if blocking is None:
        if allow is None:
            return Decision(
                ctx.decision_id,
                Verdict.DENY,
                Reason.STAGE_ERROR,
                (
                    *findings,
                    Finding("pipeline", Reason.STAGE_ERROR, Verdict.DENY, detail="no verdict"),
                ),
            )
        return Decision(ctx.decision_id, Verdict.ALLOW, allow.reason, tuple(findings))
    assert blocking.verdict is not None
    route = ctx.route
    if (
        route is not None
        and route.mode == "monitor"
        and blocking.verdict in (Verdict.STEP_UP, Verdict.DENY)
        and not any(
            f.reason in _NEVER_MONITORED or f.stage == "request"
            for f in findings
            if f.verdict is not None and f.verdict >= Verdict.STEP_UP
        )
    ):
        return Decision(
            ctx.decision_id,
            Verdict.ALLOW,
            blocking.reason,
            tuple(findings),
            monitor=True,
            would_verdict=blocking.verdict,
        )
    return Decision(ctx.decision_id, blocking.verdict, blocking.reason, tuple(findings))


def default_stages(runtime: Runtime) -> list[Stage]:
    """THE order of checks. Later capabilities add stages here, nowhere else."""
    return [
        RequestStage(runtime),
        IdentityStage(runtime),
        DeviceStage(runtime),
        RiskStage(runtime, zones=build_zones(runtime), geo=runtime.geo),
        SessionStage(runtime),
        PolicyStage(runtime),
    ]
