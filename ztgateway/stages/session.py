"""The session stage: continuous verification of a session on every request.

Logging in once is not zero trust. A session (a browser cookie the gateway issued, or an API
client's token bound to its certificate) is checked on every request: not revoked, not
expired, presented by the same device and user, from the same network (IP drift modes), within
its rate limits, with an anomaly score that rises with odd behaviour, decays with time, asks
for TOTP step-up and finally terminates the session.

The stage only reads and decides; `SessionKeeper.after_decision()` (called by the gateway once
the decision is final) creates, updates and revokes sessions, and hands each decision on a
session to the store, which writes the last few behind for `ztgateway sessions show`
(docs/decisions/0008-session-history.md): nothing on the request path reads them, so they are
not kept on the session in memory.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any

from ..context import RequestContext
from ..decision import Decision, Finding, Reason, Verdict
from ..store.base import SESSION_HISTORY, Session, SessionDecision, UserRecord

if TYPE_CHECKING:
    from ..config import RouteConfig, RouteSession, SessionsConfig
    from ..runtime import Runtime
    from ..store.base import Store

NAME = "session"
UA_CHANGE = 0.3
IP_CHANGE = 0.2
BURST = 0.25
REFUSAL = 0.08
RISK_SHARE = 0.4
HISTORY = SESSION_HISTORY  # recent decisions the store keeps per session, for `sessions show`
_NOT_AN_ATTEMPT = frozenset(
    {
        Reason.IDENTITY_UNAUTHENTICATED,
        Reason.TOKEN_REQUIRED,
        Reason.ROUTE_NOT_FOUND,
        # Another site's page made the request with the user's ambient certificate: counting
        # it against the user would let any page step them up or lock them out.
        Reason.ORIGIN_DENIED,
    }
)


MFA_METHOD = "mfa_method"
"""The `extra` key of the factor the session's last step-up was made with."""
MFA_UV = "mfa_uv"
"""The `extra` key: that step-up verified the person (WebAuthn UV flag), not only presence."""
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


@dataclass(slots=True)
class SessionView:
    """What the stage learned, for the keeper to write back after the decision."""

    session: Session | None
    session_id: str | None
    kind: str
    anomaly: float
    cookie_value: str | None = None
    cookie_invalid: bool = False
    drifted: bool = False
    accumulated: float = 0.0
    """The event part of the anomaly score (what is stored and decays)."""


def cookie_session_id(value: str) -> str:
    """Cookie sessions are stored by hash: the database never holds a usable cookie."""
    return "ck:" + hashlib.sha256(value.encode()).hexdigest()[:48]


def token_session_id(token_hash: str) -> str:
    return "tok:" + token_hash[:48]


def read_cookie(header: str, name: str) -> str | None:
    if name not in header:
        return None
    try:
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


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


class SessionKeeper:
    """Writes back what a decided request means for its session (create, touch, revoke)."""

    def __init__(self, store: Store, cfg: SessionsConfig) -> None:
        self.store = store
        self.cfg = cfg

    async def after_decision(self, ctx: RequestContext, decision: Decision) -> None:
        """Count refusals, touch or revoke the request's session, start a token's session.

        A browser session is never started here: only a sign-in or a step-up starts one
        (`start_browser_session`). Minting one for every cookie-less page request let any
        client fill memory for 12 hours a request (issue 18, M6).
        """
        store, cfg = self.store, self.cfg
        now = ctx.now
        view = ctx.session
        ident = ctx.identity
        user = ident.user if ident else None
        if decision.verdict >= Verdict.DENY and decision.reason not in _NOT_AN_ATTEMPT:
            # A refusal of presented credentials or behaviour counts as a failed attempt; a
            # step-up challenge or a first visit without credentials does not.
            for key in (
                f"user:{user}" if user else None,
                f"device:{ctx.cert.device_id}" if ctx.cert else None,
                f"ip:{ctx.client_ip}",
            ):
                if key:
                    await store.record_failure_async(key, now)
            if view is not None and view.session is not None:
                await store.record_failure_async(f"refused:{view.session.session_id}", now)
        if view is None or user is None or ctx.route is None:
            return
        session = view.session
        ip = ctx.client_ip
        if session is not None:
            store.record_decision(
                session.session_id,
                SessionDecision(
                    now, ip, ctx.route.name, decision.verdict.label, decision.reason.value
                ),
            )
        if decision.verdict is Verdict.TERMINATE and session is not None:
            reason = decision.reason.value
            await store.revoke_session(session.session_id, reason, now)
            if cfg.lock_on_terminate > 0:
                account = store.user(user) or UserRecord(user=user)
                account.locked_until = now + cfg.lock_on_terminate
                account.lock_reason = f"session terminated: {reason}"
                await store.save_user(account)
            return
        if session is not None:
            session.last_seen = now
            if ip != session.last_ip:
                # The request's string lives as long as the session: share an equal one.
                session.last_ip = session.start_ip if ip == session.start_ip else ip
            session.requests += 1
            if view.anomaly >= cfg.anomaly_step_up and session.anomaly < cfg.anomaly_step_up:
                session.extra["anomaly_since"] = now
            session.anomaly, session.anomaly_at = view.accumulated, now
            ua = ctx.headers.get("User-Agent", "")
            if ua != session.user_agent:
                session.extra["ua_changed"] = True
            await store.record_failure_async(f"req:{session.session_id}", now)
            store.touch_session(session)
            return
        if not decision.allowed or view.kind != "token" or not view.session_id:
            return
        # A verified token's first request: its session (keyed by the token's hash, so one
        # per token however many requests carry it) is what continuous verification tracks.
        route = ctx.route
        absolute = route.session.absolute_timeout or cfg.absolute_timeout
        session_id = view.session_id
        if ident is not None and ident.token is not None:
            absolute = min(absolute, max(1.0, ident.token.expires_at - now))
        await store.save_session(
            Session(
                session_id=session_id,
                kind="token",
                user=user,
                device_id=ctx.cert.device_id if ctx.cert else None,
                start_ip=ip,
                last_ip=ip,
                user_agent=ctx.headers.get("User-Agent", ""),
                created=now,
                last_seen=now,
                expires_at=now + absolute,
                requests=1,
                verified_ip=ip,
            )
        )
        store.record_decision(
            session_id,
            SessionDecision(now, ip, route.name, decision.verdict.label, decision.reason.value),
        )

    async def start_browser_session(
        self,
        ctx: RequestContext,
        *,
        user: str,
        extra: dict[str, Any],
        replaces: Session | None = None,
        replaced_because: str = "replaced by sign-in",
        mfa_at: float | None = None,
    ) -> str:
        """A new browser session after a sign-in or a step-up; returns its Set-Cookie header.

        The one place that starts one. A fresh id every time, the session it `replaces`
        revoked (no fixation), its expiry kept if it replaces one (a step-up never extends a
        session), and at most `max_per_device` live ones per user and device: a client
        signing in in a loop ends its own oldest sessions instead of filling memory.
        """
        store, cfg = self.store, self.cfg
        now = ctx.now
        cookie_value = secrets.token_urlsafe(32)
        device_id = ctx.cert.device_id if ctx.cert else None
        old = replaces
        session = Session(
            session_id=cookie_session_id(cookie_value),
            kind="cookie",
            user=user,
            device_id=device_id,
            start_ip=old.start_ip if old else ctx.client_ip,
            last_ip=ctx.client_ip,
            user_agent=ctx.headers.get("User-Agent", ""),
            created=old.created if old else now,
            last_seen=now,
            expires_at=old.expires_at if old else now + cfg.absolute_timeout,
            requests=old.requests if old else 0,
            mfa_at=mfa_at,
            extra=extra,
            verified_ip=ctx.client_ip,
        )
        if old is not None:
            await store.revoke_session(old.session_id, replaced_because, now)
        await store.save_session(session)
        live = [
            s
            for s in store.sessions(user)
            if s.kind == "cookie"
            and s.device_id == device_id
            and not s.revoked
            and s.expires_at > now
            and s.session_id != session.session_id
        ]
        for s in sorted(live, key=lambda s: s.last_seen)[
            : max(0, len(live) + 1 - cfg.max_per_device)
        ]:
            await store.revoke_session(s.session_id, "too many sessions on this device", now)
        return self.cookie_header(cookie_value)

    def cookie_header(self, value: str) -> str:
        cfg = self.cfg
        max_age = int(cfg.absolute_timeout) if cfg.persistent_cookie else None
        return new_cookie_header(cfg.cookie_name, value, max_age=max_age)

    async def expire(self, now: float, routes: Sequence[RouteConfig]) -> int:
        """Forget sessions nothing can use any more (see `Store.expire_sessions`); a browser
        session is idle-dead after the longest idle timeout any route allows."""
        idle = max([self.cfg.idle_timeout, *(r.session.idle_timeout or 0.0 for r in routes)])
        return await self.store.expire_sessions(now, idle_timeout=idle)


def new_cookie_header(name: str, value: str, *, max_age: int | None = None) -> str:
    """`__Host-` prefix: Secure, Path=/, no Domain (RFC 6265bis §4.1.3.2). Without `max_age` a
    session cookie (RFC 6265 §5.3 step 3): it ends with the browser, while the gateway's own
    idle and absolute timeouts bound the session on the server either way (issue 18, I6)."""
    lifetime = f"; Max-Age={max_age}" if max_age is not None else ""
    return f"{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax{lifetime}"


def clear_cookie_header(name: str) -> str:
    return f"{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
