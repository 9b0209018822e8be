"""Browser and API sessions outside the pipeline: their cookies, their ids and the write-back.

The session stage (`stages/session.py`) only reads and judges; everything that changes a
session lives here, so the portal, the MFA endpoints and the identity stage need no stage
module to read a cookie or start a session:

- the cookie: `read_cookie`, `new_cookie_header`, `clear_cookie_header` (`__Host-` rules);
- the ids a session is stored under: `cookie_session_id` (a hash, the store never holds a
  usable cookie) and `token_session_id`;
- `SessionKeeper`: after the decision is final (decisions.py), count failed attempts, touch,
  score or revoke the request's session, start a verified token's session, and `remember()`
  what an ALLOW taught about the user (known devices, routes, last location); and the one place
  a browser session starts (`start_browser_session`, after a sign-in or a step-up).

Why after and not in the stage: docs/decisions/0006-session-keeper.md.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import replace
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any

from .decision import Decision, Reason, Verdict
from .store.base import Session, SessionDecision, UserRecord

if TYPE_CHECKING:
    from .config import RouteConfig, SessionsConfig
    from .context import RequestContext
    from .store.base import Store

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


def new_cookie_header(name: str, value: str, *, max_age: int | None = None) -> str:
    """`__Host-` prefix: Secure, Path=/, no Domain (RFC 6265bis §4.1.3.2). Without `max_age` a
    session cookie (RFC 6265 §5.3 step 3): it ends with the browser, while the gateway's own
    idle and absolute timeouts bound the session on the server either way (issue 18, I6)."""
    lifetime = f"; Max-Age={max_age}" if max_age is not None else ""
    return f"{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax{lifetime}"


def clear_cookie_header(name: str) -> str:
    return f"{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"


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

    def remember(self, ctx: RequestContext) -> None:
        """After an ALLOW: this user now knows this device, this route, and was here
        (write-behind; the risk stage reads it on the next request)."""
        ident = ctx.identity
        route = ctx.route
        if ident is None or ident.user is None or route is None:
            return
        store = self.store
        account = store.user(ident.user) or UserRecord(user=ident.user)
        device_id = ctx.cert.device_id if ctx.cert else None
        changed = False
        if device_id and device_id not in account.known_devices:
            account = replace(account, known_devices=(*account.known_devices[-49:], device_id))
            changed = True
        if route.risk.sensitive and route.name not in account.known_routes:
            account = replace(account, known_routes=(*account.known_routes, route.name))
            changed = True
        location = ctx.risk_location
        if location is not None:
            account = replace(account, last_location=(location[0], location[1], ctx.now))
            changed = True
        if changed:
            store.touch_user(account)

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
