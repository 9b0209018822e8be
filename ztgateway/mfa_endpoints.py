"""The second factor over HTTP: `POST /.ztgw/mfa/verify` (API clients), `/.ztgw/mfa` (the
step-up page) and `/.ztgw/mfa/enroll` (setting up an authenticator), for people and programs.

Who is stepping up is established as on any request, and held to the same checks (issue 18,
L3): a valid, unrevoked client certificate of a device that is not revoked (nor another user's
where the configuration refuses that); then the bearer token bound to it, or the gateway's
session cookie (not revoked, not past its absolute or idle timeout, of this very device), or
else the certificate's user; and an account that is not locked. A step-up never extends a
session: the rotated session keeps its expiry.

Every POST first passes `forms.py` (Fetch Metadata, Origin, content type; a CSRF token on
forms), before the identity is looked at or an attempt counted, so another site can neither
burn someone's attempts (L1) nor enrol them (M1). Enrolment needs a person signed in with the
identity provider (not a certificate alone), is a POST, stays pending until a code from the new
secret confirms it, and replacing a factor needs the current one (or an operator's reset).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote
from zoneinfo import ZoneInfo

from aiohttp import web

from . import SERVER_BANNER
from .audit import AuditUnavailable
from .config import RouteSession
from .context import Identity, LockView, RequestContext
from .credentials.jwt import TokenError, check_binding
from .credentials.mfa import MFABusy, MFAUnavailable, PendingEnrolment
from .credentials.totp import SealedSecretError, TOTPError, qr_svg
from .decision import Reason, Verdict
from .edge.http1 import Request
from .forms import (
    JSON_TYPE,
    MAX_FORM_BYTES,
    csrf_binding,
    local_redirect,
    read_checked_body,
    read_checked_form,
)
from .pages.render import trusted
from .pages.when import until, zone
from .portal import login_redirect_to, template_page
from .request.paths import PathError, normalize_path
from .responses import DECISION_HEADER, lock_ends_text, problem, see_other
from .sessions import MFA_METHOD, MFA_UV, cookie_session_id, read_cookie, token_session_id
from .stages.identity import identity_from_token
from .store.base import ID_TOKEN, Session

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("ztgateway.mfa")
safe_redirect = local_redirect
"""Where `rd` may lead: a path on this origin (kept under its old name for callers)."""

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


def _rd(ctx: RequestContext) -> str:
    return local_redirect(parse_qs(ctx.query).get("rd", ["/"])[0])


def route_session(gw: Gateway, ctx: RequestContext, rd: str) -> RouteSession:
    """The session settings of the route `rd` leads to (what a step-up for it must meet)."""
    try:
        route = gw.runtime.routes.match(ctx.host, normalize_path(rd.partition("?")[0]))
    except PathError:
        route = None
    return route.session if route is not None else RouteSession()


async def who_steps_up(gw: Gateway, ctx: RequestContext, rd: str = "/") -> Who | Reason:
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


async def _credential(gw: Gateway, ctx: RequestContext, rd: str) -> Who | Reason:
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


def _record(
    gw: Gateway,
    ctx: RequestContext,
    verdict: Verdict,
    reason: Reason,
    detail: str,
    user: str | None,
    stage: str = "mfa",
) -> None:
    if user:
        ctx.identity = Identity(
            user=user, source="mfa", device_id=ctx.cert.device_id if ctx.cert else None
        )
    gw.record_outcome(ctx, stage, verdict, reason, detail)


def _refused(
    gw: Gateway,
    ctx: RequestContext,
    reason: Reason,
    detail: str,
    user: str | None = None,
    stage: str = "mfa",
) -> web.Response:
    """Audited (best effort: the refusal stands either way), counted, rendered."""
    with contextlib.suppress(AuditUnavailable):
        _record(gw, ctx, Verdict.DENY, reason, detail, user, stage)
    return problem(
        reason,
        ctx.decision_id,
        accept=ctx.headers.get("Accept", ""),
        detail=detail,
        look=ctx.look,
        lock_ends=lock_ends_text(ctx) if reason is Reason.ACCOUNT_LOCKED else None,
    )


def _unidentified(gw: Gateway, ctx: RequestContext, reason: Reason, rd: str) -> web.Response:
    """No identity to step up: a person whose sign-in has ended signs in again."""
    if gw.oidc is not None and ctx.wants_html and reason in _SIGN_IN_AGAIN:
        with contextlib.suppress(AuditUnavailable):
            _record(gw, ctx, Verdict.DENY, reason, "step-up: sign in again", None)
        return see_other(login_redirect_to(rd), ctx.decision_id)
    return _refused(gw, ctx, reason, "step-up identity")


async def _mark_verified(
    gw: Gateway, ctx: RequestContext, who: Who, method: str, *, user_verified: bool = False
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


def _json(data: dict[str, Any], ctx: RequestContext, cookie: str | None = None) -> web.Response:
    resp = web.json_response(data)
    resp.headers[DECISION_HEADER] = ctx.decision_id
    resp.headers["Server"] = SERVER_BANNER
    resp.headers["Cache-Control"] = "no-store"
    if cookie:
        resp.headers["Set-Cookie"] = cookie
    return resp


@dataclass(frozen=True, slots=True)
class CodeRefused:
    """A code that did not pass, already audited and counted."""

    reason: Reason
    detail: str
    retry_after: int | None = None
    locked_until: float | None = None

    def response(self, ctx: RequestContext) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return problem(
            self.reason,
            ctx.decision_id,
            accept=ctx.headers.get("Accept", ""),
            detail=self.detail,
            extra_headers=headers,
            look=ctx.look,
        )

    @property
    def message(self) -> str:
        return _MESSAGES.get(self.reason, "That did not work. Try again.")


async def _check_code(
    gw: Gateway, ctx: RequestContext, who: Who, code: object
) -> str | CodeRefused:
    """'totp' or 'backup', or why not (audited and counted)."""
    try:
        method = await gw.mfa.verify(who.user, code, now=ctx.now)
    except TOTPError as exc:
        return _code_refused(gw, ctx, who, exc)
    except MFABusy:
        return _audited(gw, ctx, who, CodeRefused(Reason.RATE_LIMITED, "checks saturated", 1))
    except (MFAUnavailable, SealedSecretError) as exc:
        log.error("step-up for %s cannot be checked: %s", who.user, exc)
        detail = "the second factor cannot be checked"
        return _audited(gw, ctx, who, CodeRefused(Reason.SERVICE_UNAVAILABLE, detail))
    gw.metrics.step_ups.labels("passed").inc()
    return method


def _audited(gw: Gateway, ctx: RequestContext, who: Who, refused: CodeRefused) -> CodeRefused:
    with contextlib.suppress(AuditUnavailable):
        _record(gw, ctx, Verdict.DENY, refused.reason, refused.detail, who.user)
    return refused


def _code_refused(gw: Gateway, ctx: RequestContext, who: Who, exc: TOTPError) -> CodeRefused:
    gw.metrics.step_ups.labels("failed").inc()
    retry = max(1, math.ceil(exc.locked_until - ctx.now)) if exc.locked_until else None
    refused = CodeRefused(Reason(exc.reason), exc.reason, retry, exc.locked_until)
    return _audited(gw, ctx, who, refused)


# --- the API -------------------------------------------------------------------------------


async def verify_api(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """POST /.ztgw/mfa/verify {"code": "123456"} (application/json) with the same certificate
    and token or cookie the step-up is for."""
    raw = await read_checked_body(gw, request, ctx, JSON_TYPE, limit=MAX_FORM_BYTES, stage="mfa")
    if isinstance(raw, web.Response):
        return raw
    who = await who_steps_up(gw, ctx)
    if isinstance(who, Reason):
        return _refused(gw, ctx, who, "step-up identity")
    try:
        body = json.loads(raw)
        if not isinstance(body, dict) or set(body) != {"code"}:
            raise ValueError('expected {"code": "123456"}')
    except (ValueError, RecursionError) as exc:
        return _refused(gw, ctx, Reason.REQUEST_INVALID, str(exc)[:100], who.user)
    result = await _check_code(gw, ctx, who, body["code"])
    if isinstance(result, CodeRefused):
        return result.response(ctx)
    try:
        _record(
            gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, f"step-up passed ({result})", who.user
        )
    except AuditUnavailable:
        return problem(Reason.SERVICE_UNAVAILABLE, ctx.decision_id, look=ctx.look)
    # The browser session the step-up rotated goes back to the caller (issue 18, I2): without
    # it a cookie client would have revoked its own session.
    cookie = await _mark_verified(gw, ctx, who, result)
    return _json({"mfa_verified_at": int(ctx.now), "user": who.user, "method": result}, ctx, cookie)


# --- the step-up page ----------------------------------------------------------------------


def _code_form(
    gw: Gateway,
    ctx: RequestContext,
    who_cookie: str | None,
    *,
    action: str,
    purpose: str,
    rd: str,
    label: str,
    button: str,
    hidden: dict[str, str] | None = None,
    error: str = "",
) -> dict[str, Any]:
    """The values of the code form (`_macros.html` code_form), with a fresh CSRF token."""
    token = gw.csrf.issue(purpose, csrf_binding(ctx, who_cookie), ctx.now)
    return {
        "action": action,
        "hidden": {"csrf": token, "rd": rd, **(hidden or {})},
        "label": label,
        "button": button,
        "error": error,
    }


_WHY = {
    Reason.MFA_REQUIRED: "This page asks for your second factor every so often.",
    Reason.IP_DRIFT: "Your network address changed since you signed in.",
    Reason.SESSION_ANOMALY: "Your session's activity looked unusual.",
    Reason.RISK_STEP_UP: "This request looked riskier than usual (for example a new place, "
    "device or time).",
}


def _step_up(
    gw: Gateway,
    ctx: RequestContext,
    who: Who,
    rd: str,
    *,
    error: str = "",
    status: int = 200,
    why: Reason | None = None,
    lock_ends: str | None = None,
    key_section: str | None = None,
    totp: bool = True,
) -> web.Response:
    """The step-up page: the security-key section (HTML webauthn_endpoints built and escaped)
    where the route takes a key the person has, the TOTP form where it takes TOTP."""
    from . import webauthn_endpoints as wa

    # The reason travels with the form, so a wrong code keeps the page's words.
    form = _code_form(
        gw, ctx, who.cookie_value, action="/.ztgw/mfa", purpose="mfa", rd=rd, label="Code",
        button="Verify", error=error, hidden={"why": why.value} if why in _WHY else None,
    )  # fmt: skip
    return template_page(
        "step_up.html",
        ctx,
        title="Confirm it is you",
        status=status,
        why=(_WHY.get(why) if why is not None else None)
        or "For this page the gateway needs your second factor.",
        form=form,
        lock_ends=lock_ends,
        key_section=trusted(key_section) if key_section else None,
        totp=totp,
        scripts=(wa.SCRIPT,) if key_section else (),
    )


async def _step_up_choice(gw: Gateway, ctx: RequestContext, who: Who, rd: str) -> web.Response:
    """The factors the person has that the route `rd` takes: a security key, a TOTP code, or
    both; none yet: set one up (a security key where the route takes nothing else)."""
    from . import webauthn_endpoints as wa

    factors = route_session(gw, ctx, rd).step_up_factors
    key = await wa.step_up_section(gw, ctx, who, rd) if "webauthn" in factors else None
    totp = "totp" in factors and gw.mfa.enrolled(who.user)
    if key is None and not totp:
        enrol = (
            wa.keys_url(rd)
            if factors == ("webauthn",)
            else "/.ztgw/mfa/enroll?rd=" + quote(rd, safe="/")
        )
        return see_other(enrol, ctx.decision_id)
    why = _reason(parse_qs(ctx.query).get("why", [""])[0])
    return _step_up(gw, ctx, who, rd, why=why, key_section=key, totp=totp)


_MESSAGES = {
    Reason.MFA_INVALID: "That code did not work. Wait for the next code and try again.",
    Reason.MFA_REPLAYED: "That code was already used. Wait for the next code and try again.",
    Reason.MFA_MALFORMED: "Enter the six digits your app shows, or a backup code.",
    Reason.MFA_LOCKED: "Too many wrong codes. Try again later.",
    Reason.MFA_NOT_ENROLLED: "No second factor is set up for your account.",
    Reason.RATE_LIMITED: "The gateway is busy checking codes. Try again in a moment.",
    Reason.MFA_ENROLMENT_EXISTS: "A second factor is already set up: to replace it, enter a "
    "code from your current authenticator.",
    Reason.MFA_ENROLMENT_EXPIRED: "That set-up expired. Start again.",
}


async def _posted_form(
    gw: Gateway, request: Request, ctx: RequestContext, purpose: str
) -> dict[str, str] | web.Response:
    """The fields of one of these pages' forms once forms.py passed it (before anyone is
    identified or anything is counted), or its refusal."""
    cookie = read_cookie(ctx.headers.get("Cookie", ""), gw.config.sessions.cookie_name)
    return await read_checked_form(gw, request, ctx, purpose, cookie, stage="mfa")


async def step_up_page(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET shows the code form; POST checks it and sends the browser back to `rd`."""
    if request.method == "GET":
        rd = _rd(ctx)
        who = await who_steps_up(gw, ctx, rd)
        if isinstance(who, Reason):
            return _unidentified(gw, ctx, who, rd)
        return await _step_up_choice(gw, ctx, who, rd)
    form = await _posted_form(gw, request, ctx, "mfa")
    if isinstance(form, web.Response):
        return form
    rd = local_redirect(form.get("rd"))
    who = await who_steps_up(gw, ctx, rd)
    if isinstance(who, Reason):
        return _unidentified(gw, ctx, who, rd)
    result = await _check_code(gw, ctx, who, form.get("code", ""))
    if isinstance(result, CodeRefused):
        if not ctx.wants_html:
            return result.response(ctx)
        lock_ends = None
        if result.locked_until is not None:
            lock_ends = until(result.locked_until, ctx.now, _user_zone(gw, who.user))
        return _step_up(
            gw, ctx, who, rd, error=result.message, status=result.reason.status,
            why=_reason(form.get("why", "")), lock_ends=lock_ends,
        )  # fmt: skip
    with contextlib.suppress(AuditUnavailable):
        _record(
            gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, f"step-up passed ({result})", who.user
        )
    cookie_header = await _mark_verified(gw, ctx, who, result)
    return see_other(rd, ctx.decision_id, *((cookie_header,) if cookie_header else ()))


# --- enrolment -----------------------------------------------------------------------------


def _enrol_page(
    gw: Gateway, ctx: RequestContext, who: Who, rd: str, *, status: int = 200, error: str = ""
) -> web.Response:
    """What the person sees at /.ztgw/mfa/enroll, from the state of their enrolment."""
    now = ctx.now
    pending = gw.mfa.pending(who.user, now)
    if pending is not None:
        return _pending_page(gw, ctx, who, rd, pending, error, status)
    if gw.mfa.enrolled(who.user):
        form = _enrol_form(
            gw, ctx, who, rd, "replace", "Current code", "Replace my authenticator", error
        )
        return template_page(
            "enrol_replace.html", ctx, title="Your second factor", status=status, form=form
        )
    token = gw.csrf.issue("enroll", csrf_binding(ctx, who.cookie_value), now)
    return template_page(
        "enrol_start.html",
        ctx,
        title="Set up your second factor",
        status=status,
        error=error,
        hidden={"csrf": token, "rd": rd, "action": "start"},
    )


def _enrol_form(
    gw: Gateway, ctx: RequestContext, who: Who, rd: str, action: str, label: str, button: str,
    error: str,
) -> dict[str, Any]:  # fmt: skip
    return _code_form(
        gw, ctx, who.cookie_value, action="/.ztgw/mfa/enroll", purpose="enroll", rd=rd,
        label=label, button=button, hidden={"action": action}, error=error,
    )  # fmt: skip


def _pending_page(
    gw: Gateway,
    ctx: RequestContext,
    who: Who,
    rd: str,
    pending: PendingEnrolment,
    error: str,
    status: int,
) -> web.Response:
    secret = pending.secret
    return template_page(
        "enrol_pending.html",
        ctx,
        title="Set up your second factor",
        status=status,
        qr=trusted(qr_svg(pending.uri)),
        # A phone cannot scan its own screen: the otpauth:// link opens the app on it.
        uri=pending.uri,
        secret=secret,
        secret_grouped=" ".join(secret[i : i + 4] for i in range(0, len(secret), 4)),
        minutes=max(1, int((pending.expires_at - ctx.now) // 60)),
        form=_enrol_form(gw, ctx, who, rd, "confirm", "Code from your app", "Finish set-up", error),
    )


async def _signed_in(
    gw: Gateway,
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
        return _unidentified(gw, ctx, who, enrol_here)
    if who.kind == "cookie" and who.signed_in:
        return who
    # SECURITY: a certificate is ambient (another site can make the browser present it), and
    # a token is not a person at a browser: neither may set up a second factor (issue 18, M1).
    if gw.oidc is not None and ctx.wants_html:
        return see_other(login_redirect_to(enrol_here), ctx.decision_id)
    return _refused(
        gw,
        ctx,
        Reason.IDENTITY_UNAUTHENTICATED,
        "setting up a second factor needs a sign-in with the identity provider; "
        "without one, IT enrols you (ztgateway users mfa enroll)",
        who.user,
        stage,
    )


async def enroll_page(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET shows the enrolment as it stands; POST starts, replaces or confirms it."""
    if not gw.mfa.available:
        return _refused(gw, ctx, Reason.SERVICE_UNAVAILABLE, "MFA is not configured")
    if request.method == "GET":
        rd = _rd(ctx)
        who = await _signed_in(gw, ctx, rd)
        if isinstance(who, web.Response):
            return who
        return _enrol_page(gw, ctx, who, rd)
    form = await _posted_form(gw, request, ctx, "enroll")
    if isinstance(form, web.Response):
        return form
    rd = local_redirect(form.get("rd"))
    who = await _signed_in(gw, ctx, rd)
    if isinstance(who, web.Response):
        return who
    action = form.get("action", "")
    try:
        if action == "start":
            return await _start(gw, ctx, who, rd)
        if action == "replace":
            return await _replace(gw, ctx, who, rd, form.get("code", ""))
        if action == "confirm":
            return await _confirm(gw, ctx, who, rd, form.get("code", ""))
    except SealedSecretError as exc:
        log.error("enrolment for %s cannot be read: %s", who.user, exc)
        return _refused(gw, ctx, Reason.SERVICE_UNAVAILABLE, "the enrolment cannot be read")
    return _refused(gw, ctx, Reason.REQUEST_INVALID, f"unknown action {action[:20]!r}", who.user)


def _enrol_refused(
    gw: Gateway, ctx: RequestContext, who: Who, rd: str, refused: CodeRefused
) -> web.Response:
    """A person sees the enrolment page again (same QR code) with what went wrong; a program
    gets problem+json."""
    if not ctx.wants_html:
        return refused.response(ctx)
    return _enrol_page(gw, ctx, who, rd, status=refused.reason.status, error=refused.message)


def _back_to_enrolment(ctx: RequestContext, rd: str) -> web.Response:
    # Post/redirect/get: a reload shows the page again instead of re-posting the form.
    return see_other("/.ztgw/mfa/enroll?rd=" + quote(rd, safe="/"), ctx.decision_id)


async def _start(gw: Gateway, ctx: RequestContext, who: Who, rd: str) -> web.Response:
    if gw.mfa.enrolled(who.user):
        # Replacing a factor needs the current one: the "replace" form.
        refused = CodeRefused(Reason.MFA_ENROLMENT_EXISTS, "start: replace with the current code")
        return _enrol_refused(gw, ctx, who, rd, _audited(gw, ctx, who, refused))
    await gw.mfa.start_enrolment(who.user, ctx.now)
    with contextlib.suppress(AuditUnavailable):
        _record(gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, "mfa enrolment started", who.user)
    return _back_to_enrolment(ctx, rd)


async def _replace(gw: Gateway, ctx: RequestContext, who: Who, rd: str, code: str) -> web.Response:
    if not gw.mfa.enrolled(who.user):
        return _back_to_enrolment(ctx, rd)
    result = await _check_code(gw, ctx, who, code)
    if isinstance(result, CodeRefused):
        return _enrol_refused(gw, ctx, who, rd, result)
    await gw.mfa.start_enrolment(who.user, ctx.now)
    with contextlib.suppress(AuditUnavailable):
        _record(
            gw,
            ctx,
            Verdict.ALLOW,
            Reason.POLICY_ALLOWED,
            f"mfa replacement started ({result})",
            who.user,
        )
    return _back_to_enrolment(ctx, rd)


async def _confirm(gw: Gateway, ctx: RequestContext, who: Who, rd: str, code: str) -> web.Response:
    try:
        enrollment = await gw.mfa.confirm_enrolment(who.user, code, ctx.now)
    except LookupError:
        refused = CodeRefused(Reason.MFA_ENROLMENT_EXPIRED, "confirm: nothing pending")
        return _enrol_refused(gw, ctx, who, rd, _audited(gw, ctx, who, refused))
    except TOTPError as exc:
        return _enrol_refused(gw, ctx, who, rd, _code_refused(gw, ctx, who, exc))
    gw.metrics.mfa_enrollments.inc()
    with contextlib.suppress(AuditUnavailable):
        _record(gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, "mfa enrolment confirmed", who.user)
    # The person just proved the new factor: that is a step-up too.
    cookie_header = await _mark_verified(gw, ctx, who, "totp")
    return template_page(
        "enrolled.html",
        ctx,
        title="Second factor set up",
        cookies=(cookie_header,) if cookie_header else (),
        codes=list(enrollment.backup_codes),
        rd=rd,
    )


def _user_zone(gw: Gateway, user: str) -> ZoneInfo:
    account = gw.store.user(user)
    return zone(account.timezone if account else None, gw.config.risk.default_timezone)


def _reason(value: str) -> Reason | None:
    """Why the data plane asked for a step-up (`why=` on the redirect, then in the form), for
    the page's words: only a reason with words of its own counts."""
    try:
        reason = Reason(value)
    except ValueError:
        return None
    return reason if reason in _WHY else None
