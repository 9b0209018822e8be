"""The session stage: continuous verification of a session on every request.

Logging in once is not zero trust. A session (a browser cookie the gateway issued, or an API
client's token bound to its certificate) is checked on every request: not revoked, not
expired, presented by the same device and user, from the same network (IP drift modes), within
its rate limits, with an anomaly score that rises with odd behaviour, decays with time, asks
for TOTP step-up and finally terminates the session.

The stage only reads and decides; what a decided request means for its session (touch,
anomaly, failed attempts, revocation) is written back by `sessions.SessionKeeper` once the
decision is final (docs/decisions/0006-session-keeper.md).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..context import LockView, RequestContext, SessionView
from ..decision import Finding, Reason, Verdict
from ..sessions import MFA_METHOD, MFA_UV, cookie_session_id, read_cookie, token_session_id

if TYPE_CHECKING:
    from ..config import RouteSession, SessionsConfig
    from ..runtime import Runtime
    from ..store.base import Session

NAME = "session"
UA_CHANGE = 0.3
IP_CHANGE = 0.2
BURST = 0.25
REFUSAL = 0.08
RISK_SHARE = 0.4


_FACTOR_OF_METHOD = {"totp": "totp", "backup": "totp", "webauthn": "webauthn"}


def step_up_answers(session: Session | None, rs: RouteSession) -> bool:
    """Whether the session's last step-up was made with a factor this route takes (its
    `step_up_factors`, and user verification where it asks for it). A backup code stands in
    for TOTP; a step-up recorded before methods were (no method) counts as TOTP."""
    if session is None or session.mfa_at is None:
        return False
    method = session.extra.get(MFA_METHOD, "totp")
    if _FACTOR_OF_METHOD.get(method) not in rs.step_up_factors:
        return False
    return not rs.require_user_verification or session.extra.get(MFA_UV) is True


def same_network(a: str, b: str) -> bool:
    """Same /24 (IPv4) or /64 (IPv6): a NAT pool or a DHCP renewal, not a new place."""
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    if x.version != y.version:
        return False
    prefix = 24 if x.version == 4 else 64
    return ipaddress.ip_network(f"{x}/{prefix}", strict=False) == ipaddress.ip_network(
        f"{y}/{prefix}", strict=False
    )


def decayed(score: float, elapsed: float, half_life: float) -> float:
    if score <= 0.0 or elapsed <= 0.0:
        return max(0.0, score)
    return score * math.pow(0.5, elapsed / half_life)


def combine(score: float, increment: float) -> float:
    """Noisy-OR: independent signals add up without ever exceeding 1."""
    return 1.0 - (1.0 - score) * (1.0 - min(max(increment, 0.0), 1.0))


class SessionStage:
    name = NAME

    def __init__(self, runtime: Runtime) -> None:
        self.store = runtime.store
        self.cfg: SessionsConfig = runtime.config.sessions
        self.dry_run = runtime.dry_run
        self.default_timezone = runtime.config.risk.default_timezone

    async def check(self, ctx: RequestContext) -> Sequence[Finding]:
        route = ctx.route
        assert route is not None
        store = self.store
        if store is None:
            return ()
        rs = route.session
        cfg = self.cfg
        now = ctx.now
        ident = ctx.identity
        user = ident.user if ident else None
        token = ident.token if ident else None
        device_id = ctx.cert.device_id if ctx.cert else None

        session_id: str | None = None
        kind = "none"
        cookie = read_cookie(ctx.headers.get("Cookie", ""), cfg.cookie_name)
        if token is not None:
            session_id, kind = token_session_id(token.token_hash), "token"
        elif cookie is not None:
            session_id, kind = cookie_session_id(cookie), "cookie"

        # Rate limits come first: a storm is refused before it costs anything else.
        rl = rs.rate_limit
        if rl is not None and not self.dry_run:
            keys = {"session": session_id, "user": user, "device": device_id, "ip": ctx.client_ip}
            for scope in rl.scopes:
                who = keys.get(scope)
                if who is None:
                    continue
                wait = await store.take_token_async(
                    f"rl:{route.name}:{scope}:{who}", rl.rate, rl.burst, now
                )
                if wait > 0:
                    ctx.retry_after = max(ctx.retry_after or 0.0, wait)
                    return [Finding(NAME, Reason.RATE_LIMITED, Verdict.DENY, detail=f"per {scope}")]

        account = store.user(user) if user else None
        if account is not None and account.locked(now):
            assert account.locked_until is not None
            ctx.locked = LockView(account.locked_until, account.timezone or self.default_timezone)
            return [
                Finding(NAME, Reason.ACCOUNT_LOCKED, Verdict.DENY, detail=account.lock_reason or "")
            ]

        session = None
        if session_id is not None:
            # Not in memory yet: perhaps just made by another worker or replica (a sign-in).
            session = store.session(session_id) or await store.find_session(session_id)
        view = SessionView(session, session_id, kind, 0.0, cookie_value=cookie)
        ctx.session = view
        if session is None:
            if kind == "cookie":
                # SECURITY: never adopt a session id the gateway did not issue (fixation).
                view.cookie_invalid = True
                return [
                    Finding(
                        NAME, Reason.SESSION_INVALID, Verdict.DENY, detail="unknown session cookie"
                    )
                ]
            return self._mfa(ctx, rs, None, [])
        if session.revoked:
            # A terminated API session's token stays refused until it expires.
            view.cookie_invalid = kind == "cookie"
            return [
                Finding(
                    NAME,
                    Reason.SESSION_TERMINATED,
                    Verdict.DENY,
                    detail=session.revoked_reason or "",
                )
            ]
        idle = rs.idle_timeout or cfg.idle_timeout
        if now >= session.expires_at or now - session.last_seen > idle:
            if kind != "token":
                view.cookie_invalid = True
                return [Finding(NAME, Reason.SESSION_EXPIRED, Verdict.DENY)]
            # The token is still valid: its session simply starts again.
            view.session = None
            return self._mfa(ctx, rs, None, [])
        if session.device_id and session.device_id != device_id:
            # SECURITY: a session bound to a device is used only with that device's
            # certificate. Without one (client_cert = "optional", forward-auth behind
            # `ssl_verify_client optional`) a stolen cookie would work from anywhere (security
            # review M3).
            view.cookie_invalid = kind == "cookie"
            detail = "presented by another device" if device_id else "presented without its device"
            return [Finding(NAME, Reason.SESSION_INVALID, Verdict.DENY, detail=detail)]
        if user and session.user != user:
            return [
                Finding(
                    NAME, Reason.SESSION_INVALID, Verdict.DENY, detail="presented by another user"
                )
            ]

        out: list[Finding] = []
        # Two parts: events (an IP change, a new user agent) accumulate and decay over time and
        # are stored; levels (a burst in the window, refusals in the window, this request's
        # risk) are recomputed each request and never stored, so a steady level cannot
        # compound request after request into a step-up or a termination.
        anomaly = decayed(session.anomaly, now - session.anomaly_at, cfg.anomaly_half_life)
        verified_ip = session.verified_ip or session.start_ip
        if ctx.client_ip != verified_ip:
            mode = rs.ip_drift
            near = same_network(ctx.client_ip, verified_ip)
            detail = f"{verified_ip} -> {ctx.client_ip}"
            view.drifted = True
            if mode == "terminate":
                out.append(Finding(NAME, Reason.IP_DRIFT, Verdict.TERMINATE, detail=detail))
            elif mode == "step_up" or (mode == "allow_same_network" and not near):
                out.append(
                    Finding(NAME, Reason.IP_DRIFT, Verdict.STEP_UP, risk=IP_CHANGE, detail=detail)
                )
            if ctx.client_ip != session.last_ip:
                anomaly = combine(anomaly, IP_CHANGE)
        ua = ctx.headers.get("User-Agent", "")
        if session.user_agent and ua != session.user_agent and not session.extra.get("ua_changed"):
            anomaly = combine(anomaly, UA_CHANGE)
            out.append(
                Finding(
                    NAME, Reason.SESSION_INVALID, None, risk=UA_CHANGE, detail="user agent changed"
                )
            )
        view.accumulated = anomaly
        level = 0.0
        recent = await store.failures_async(f"req:{session.session_id}", now, cfg.burst_window)
        if recent >= cfg.burst_requests:
            level = combine(level, BURST)
        refusals = await store.failures_async(f"refused:{session.session_id}", now, 300.0)
        if refusals:
            level = combine(level, min(0.6, REFUSAL * refusals))
        risk = ctx.risk_score
        if risk:
            level = combine(level, RISK_SHARE * risk)
        anomaly = combine(anomaly, level)
        view.anomaly = anomaly
        answered = step_up_answers(session, rs)
        if answered and session.mfa_at is not None and now - session.mfa_at <= cfg.step_up_validity:
            # A second factor given moments ago answers a risk-triggered step-up.
            ctx.mfa_fresh = True
        asked = account.step_up_after if account is not None else None
        if asked is not None and session.created <= asked and (session.mfa_at or 0.0) < asked:
            # The identity provider said the credentials or the assurance changed (CAEP):
            # a session from before must give a second factor again (signals/actions.py).
            why = (account.step_up_reason if account is not None else None) or ""
            out.append(Finding(NAME, Reason.SIGNAL_STEP_UP, Verdict.STEP_UP, detail=why))

        terminate_at = (
            rs.anomaly_terminate if rs.anomaly_terminate is not None else cfg.anomaly_terminate
        )
        step_up_at = rs.anomaly_step_up if rs.anomaly_step_up is not None else cfg.anomaly_step_up
        if anomaly >= terminate_at:
            out.append(
                Finding(
                    NAME,
                    Reason.SESSION_TERMINATED,
                    Verdict.TERMINATE,
                    risk=anomaly,
                    detail=f"anomaly {anomaly:.2f}",
                )
            )
        elif anomaly >= step_up_at:
            mfa_at = (session.mfa_at or 0.0) if answered else 0.0
            if mfa_at < float(session.extra.get("anomaly_since", now)):
                out.append(
                    Finding(
                        NAME,
                        Reason.SESSION_ANOMALY,
                        Verdict.STEP_UP,
                        risk=anomaly,
                        detail=f"anomaly {anomaly:.2f}",
                    )
                )
        return self._mfa(ctx, rs, session, out)

    def _mfa(
        self,
        ctx: RequestContext,
        rs: RouteSession,
        session: Session | None,
        out: list[Finding],
    ) -> list[Finding]:
        max_age = rs.mfa_max_age
        if max_age is None:
            return out
        route = ctx.route
        if (
            ctx.identity is not None
            and ctx.identity.source == "cert"
            and route is not None
            and route.policy.login == "never"
        ):
            # A machine identified by its certificate alone has no second factor to give. On a
            # route that logs people in, though, the certificate is a person's too, and any
            # client holding it (a script, malware) must not skip the second factor the route
            # asks of that person (security review M2).
            return out
        mfa_at = session.mfa_at if session else None
        if mfa_at is None or ctx.now - mfa_at > max_age:
            ctx.mfa_max_age = max_age
            out.append(
                Finding(
                    NAME, Reason.MFA_REQUIRED, Verdict.STEP_UP, detail=f"within {int(max_age)} s"
                )
            )
        elif not step_up_answers(session, rs):
            # SECURITY: a fresh TOTP code does not answer a route that asks for a
            # phishing-resistant factor (or for user verification): docs/webauthn.md.
            ctx.mfa_max_age = max_age
            factors = "+".join(rs.step_up_factors)
            uv = " with user verification" if rs.require_user_verification else ""
            out.append(
                Finding(NAME, Reason.MFA_REQUIRED, Verdict.STEP_UP, detail=f"by {factors}{uv}")
            )
        return out
