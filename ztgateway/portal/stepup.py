"""Who is stepping up: the identity behind a request to the second-factor pages and APIs.

Shared by TOTP (mfa.py) and security keys (webauthn.py). Who is stepping up is established as
on any request, and held to the same checks (issue 18, L3): a valid, unrevoked client
certificate of a device that is not revoked (nor another user's where the configuration refuses
that); then the bearer token bound to it, or the gateway's session cookie (not revoked, not past
its absolute or idle timeout, of this very device), or else the certificate's user; and an
account that is not locked. A step-up never extends a session: the rotated session keeps its
expiry. Enrolment needs more: a person signed in with the identity provider (`signed_in`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import web

from ..audit import AuditUnavailable
from ..config import RouteSession
from ..context import Identity, LockView, RequestContext
from ..credentials.jwt import TokenError, check_binding
from ..decision import Reason, Verdict
from ..request.paths import PathError, normalize_path
from ..responses import lock_ends_text, problem, see_other
from ..sessions import MFA_METHOD, MFA_UV, cookie_session_id, read_cookie, token_session_id
from ..stages.identity import identity_from_token
from ..store.base import ID_TOKEN, Session
from .redirect import login_redirect_to

if TYPE_CHECKING:
    from ..services import Services


_SIGN_IN_AGAIN = frozenset(
    {
        Reason.IDENTITY_UNAUTHENTICATED,
        Reason.SESSION_EXPIRED,
        Reason.SESSION_INVALID,
        Reason.SESSION_TERMINATED,
    }
)


@dataclass(slots=True)
class Who:
    """The identity a step-up or an enrolment is for."""

    user: str
    kind: str  # "token" | "cookie" | "cert"
    session_id: str
    session: Session | None
    cookie_value: str | None = None
    signed_in: bool = False
    """A session from a sign-in with the identity provider (what enrolment needs)."""


def route_session(gw: Services, ctx: RequestContext, rd: str) -> RouteSession:
    """The session settings of the route `rd` leads to (what a step-up for it must meet)."""
    try:
        route = gw.runtime.routes.match(ctx.host, normalize_path(rd.partition("?")[0]))
    except PathError:
        route = None
    return route.session if route is not None else RouteSession()


async def who_steps_up(gw: Services, ctx: RequestContext, rd: str = "/") -> Who | Reason:
    """The identity behind this request, or the reason there is none we may step up.

    The same checks the identity, device and session stages make for the route `rd` leads to.
    """
    now = ctx.now
    cert = ctx.cert
    if cert is None:
        return Reason.CLIENT_CERT_REQUIRED
    if gw.tls.current.revocations.is_revoked(cert.serial):
        return Reason.CLIENT_CERT_REVOKED
    if not (cert.not_before <= now <= cert.not_after) or not cert.client_auth:
        return Reason.CLIENT_CERT_INVALID
    store = gw.store
    device = store.device(cert.device_id)
    if device is not None and device.state == "revoked":
        return Reason.DEVICE_REVOKED
    who = await _credential(gw, ctx, rd)
    if isinstance(who, Reason):
        return who
    if (
        device is not None
        and device.owner
        and device.owner != who.user
        and gw.config.devices.owner_mismatch == "deny"
    ):
        return Reason.DEVICE_OWNER_MISMATCH
    account = store.user(who.user)
    if account is not None and account.locked(now):
        assert account.locked_until is not None
        ctx.locked = LockView(
            account.locked_until, account.timezone or gw.config.risk.default_timezone
        )
        return Reason.ACCOUNT_LOCKED
    return who


async def _credential(gw: Services, ctx: RequestContext, rd: str) -> Who | Reason:
    cert = ctx.cert
    assert cert is not None
    store = gw.store
    auth = ctx.headers.getall("Authorization", ())
    if len(auth) > 1:
        return Reason.TOKEN_INVALID
    if auth:
        scheme, _, credential = auth[0].partition(" ")
        if scheme.lower() != "bearer" or gw.tokens is None:
            return Reason.TOKEN_INVALID
        try:
            token = await gw.tokens.verify(credential.strip(), now=ctx.now)
        except TokenError as exc:
            return exc.reason
        binding = check_binding(token, cert.der, required=False)
        if binding is not None:
            return binding
        sid = token_session_id(token.token_hash)
        session = await store.find_session(sid)
        if session is not None and session.revoked:
            return Reason.SESSION_TERMINATED
        # The user the pipeline sees for this token (its issuer's claim map), not `sub`.
        user = identity_from_token(token, gw.config.claim_maps.get(token.issuer), None).user
        if not user:
            return Reason.TOKEN_CLAIMS_INVALID
        return Who(user, "token", sid, session)
    cookie = read_cookie(ctx.headers.get("Cookie", ""), gw.config.sessions.cookie_name)
    if cookie is not None:
        sid = cookie_session_id(cookie)
        session = await store.find_session(sid)
        if session is None:
            return Reason.SESSION_INVALID
        if session.revoked:
            return Reason.SESSION_TERMINATED
        idle = route_session(gw, ctx, rd).idle_timeout or gw.config.sessions.idle_timeout
        if ctx.now >= session.expires_at or ctx.now - session.last_seen > idle:
            # SECURITY: a code must not revive a session that has ended (issue 18, L3).
            return Reason.SESSION_EXPIRED
        if session.device_id != cert.device_id:
            return Reason.SESSION_INVALID
        signed_in = session.extra.get("source") == "oidc"
        return Who(session.user, "cookie", sid, session, cookie, signed_in)
    if cert.user:
        return Who(cert.user, "cert", "", None)
    return Reason.IDENTITY_UNAUTHENTICATED


def record(
    gw: Services,
    ctx: RequestContext,
    verdict: Verdict,
    reason: Reason,
    detail: str,
    user: str | None,
    stage: str = "mfa",
) -> None:
    """Audit and count a second-factor outcome as `user`'s (raises AuditUnavailable)."""
    if user:
        ctx.identity = Identity(
            user=user, source="mfa", device_id=ctx.cert.device_id if ctx.cert else None
        )
    gw.record_outcome(ctx, stage, verdict, reason, detail)


def refuse_mfa(
    gw: Services,
    ctx: RequestContext,
    reason: Reason,
    detail: str,
    user: str | None = None,
    stage: str = "mfa",
) -> web.Response:
    """Audited (best effort: the refusal stands either way), counted, rendered."""
    with contextlib.suppress(AuditUnavailable):
        record(gw, ctx, Verdict.DENY, reason, detail, user, stage)
    return problem(
        reason,
        ctx.decision_id,
        accept=ctx.headers.get("Accept", ""),
        detail=detail,
        look=ctx.look,
        lock_ends=lock_ends_text(ctx) if reason is Reason.ACCOUNT_LOCKED else None,
    )


def unidentified(gw: Services, ctx: RequestContext, reason: Reason, rd: str) -> web.Response:
    """No identity to step up: a person whose sign-in has ended signs in again."""
    if gw.oidc is not None and ctx.wants_html and reason in _SIGN_IN_AGAIN:
        with contextlib.suppress(AuditUnavailable):
            record(gw, ctx, Verdict.DENY, reason, "step-up: sign in again", None)
        return see_other(login_redirect_to(rd), ctx.decision_id)
    return refuse_mfa(gw, ctx, reason, "step-up identity")


async def mark_verified(
    gw: Services, ctx: RequestContext, who: Who, method: str, *, user_verified: bool = False
) -> str | None:
    """Record the step-up (its factor, and whether the person was verified: what a route's
    `step_up_factors` checks); returns the Set-Cookie of the browser session it (re)issued."""
    now = ctx.now
    store = gw.store
    session = who.session
    if who.kind == "token":
        if session is None:
            sessions = gw.config.sessions
            expires = now + sessions.absolute_timeout
            session = Session(
                session_id=who.session_id,
                kind="token",
                user=who.user,
                device_id=ctx.cert.device_id if ctx.cert else None,
                start_ip=ctx.client_ip,
                last_ip=ctx.client_ip,
                user_agent=ctx.headers.get("User-Agent", ""),
                created=now,
                last_seen=now,
                expires_at=expires,
            )
        session.mfa_at = now
        session.anomaly, session.anomaly_at = 0.0, now
        session.verified_ip = ctx.client_ip
        session.extra[MFA_METHOD] = method
        session.extra[MFA_UV] = user_verified
        session.extra.pop("anomaly_since", None)
        await store.save_session(session)
        return None
    # SECURITY: privilege changed, so a browser gets a fresh session id (no fixation); the
    # old one ends, and what the sign-in established (provider, groups, e-mail, the ID token
    # for logout) moves to the new one, with the old one's expiry.
    extra: dict[str, Any] = {}
    if session is not None:
        extra = {k: v for k, v in session.extra.items() if k != "anomaly_since"}
        id_token = await store.session_id_token(session.session_id)
        if id_token:
            extra[ID_TOKEN] = id_token
    extra[MFA_METHOD] = method
    extra[MFA_UV] = user_verified
    return await gw.keeper.start_browser_session(
        ctx,
        user=who.user,
        extra=extra,
        replaces=session,
        replaced_because="rotated after step-up",
        mfa_at=now,
    )


async def signed_in(
    gw: Services,
    ctx: RequestContext,
    rd: str,
    enrol_here: str | None = None,
    stage: str = "mfa",
) -> Who | web.Response:
    """Enrolment (of a TOTP app, or at `enrol_here`, of a security key) is for a person signed
    in with the identity provider on this device."""
    enrol_here = enrol_here or "/.ztgw/mfa/enroll?rd=" + quote(rd, safe="/")
    who = await who_steps_up(gw, ctx, enrol_here)
    if isinstance(who, Reason):
        return unidentified(gw, ctx, who, enrol_here)
    if who.kind == "cookie" and who.signed_in:
        return who
    # SECURITY: a certificate is ambient (another site can make the browser present it), and
    # a token is not a person at a browser: neither may set up a second factor (issue 18, M1).
    if gw.oidc is not None and ctx.wants_html:
        return see_other(login_redirect_to(enrol_here), ctx.decision_id)
    return refuse_mfa(
        gw,
        ctx,
        Reason.IDENTITY_UNAUTHENTICATED,
        "setting up a second factor needs a sign-in with the identity provider; "
        "without one, IT enrols you (ztgateway users mfa enroll)",
        who.user,
        stage,
    )
