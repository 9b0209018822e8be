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
import html
import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from aiohttp import web

from .audit import AuditUnavailable
from .config import RouteSession
from .context import Identity, RequestContext
from .credentials.jwt import TokenError, check_binding
from .credentials.totp import Enrollment, SealedSecretError, TOTPError, qr_svg
from .decision import Reason, Verdict
from .forms import (
    JSON_TYPE,
    MAX_FORM_BYTES,
    csrf_binding,
    local_redirect,
    read_checked_body,
    read_checked_form,
)
from .forward.headers import SERVER_BANNER
from .http1 import Request
from .mfa import MFABusy, MFAUnavailable, PendingEnrolment
from .paths import PathError, normalize_path
from .portal import login_redirect_to, page
from .responses import DECISION_HEADER, problem, see_other
from .stages.identity import identity_from_token
from .stages.session import MFA_METHOD, MFA_UV, cookie_session_id, read_cookie, token_session_id
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
    return problem(reason, ctx.decision_id, accept=ctx.headers.get("Accept", ""), detail=detail)


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

    def response(self, ctx: RequestContext) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return problem(
            self.reason,
            ctx.decision_id,
            accept=ctx.headers.get("Accept", ""),
            detail=self.detail,
            extra_headers=headers,
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
    return _audited(gw, ctx, who, CodeRefused(Reason(exc.reason), exc.reason, retry))


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
        return problem(Reason.SERVICE_UNAVAILABLE, ctx.decision_id)
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
) -> str:
    token = gw.csrf.issue(purpose, csrf_binding(ctx, who_cookie), ctx.now)
    fields = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
        for k, v in {"csrf": token, "rd": rd, **(hidden or {})}.items()
    )
    err = f'<p class="err" role="alert">{html.escape(error)}</p>' if error else ""
    return f"""{err}<form method="post" action="{html.escape(action)}">{fields}
<label for="code">{html.escape(label)}</label>
<input id="code" name="code" autocomplete="one-time-code" maxlength="32" required autofocus>
<button type="submit">{html.escape(button)}</button></form>"""


def _step_up_form(gw: Gateway, ctx: RequestContext, who: Who, rd: str, error: str = "") -> str:
    return (
        "<p>For this page the gateway needs your second factor. Enter the six-digit code from "
        "your authenticator app, or one of your backup codes.</p>"
        + _code_form(
            gw,
            ctx,
            who.cookie_value,
            action="/.ztgw/mfa",
            purpose="mfa",
            rd=rd,
            label="Code",
            button="Verify",
            error=error,
        )
        + '<p class="muted">Lost your authenticator? Use a backup code, or ask IT to reset '
        "your second factor.</p>"
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
    body = key or ""
    if totp:
        body += _step_up_form(gw, ctx, who, rd)
    return page("Confirm it is you", body, ctx, scripts=(wa.SCRIPT,) if key else ())


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
        form_html = _step_up_form(gw, ctx, who, rd, result.message)
        return page("Confirm it is you", form_html, ctx, status=result.reason.status)
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
        return page(
            "Set up your second factor",
            _pending_body(gw, ctx, who, rd, pending, error),
            ctx,
            status=status,
        )
    if gw.mfa.enrolled(who.user):
        body = (
            "<p>Your second factor is set up. To move it to a new authenticator app, enter a "
            "code from the one you use now (or a backup code).</p>"
            + _enrol_form(
                gw, ctx, who, rd, "replace", "Current code", "Replace my authenticator", error
            )
            + '<p class="muted">Lost it and have no backup codes? Ask IT to reset your second '
            "factor.</p>"
        )
        return page("Your second factor", body, ctx, status=status)
    token = gw.csrf.issue("enroll", csrf_binding(ctx, who.cookie_value), now)
    err = f'<p class="err" role="alert">{html.escape(error)}</p>' if error else ""
    body = f"""{err}<p>Some applications behind this gateway ask for a second factor: a six-digit
code from an authenticator app on your phone. Setting it up takes a minute.</p>
<form method="post" action="/.ztgw/mfa/enroll">
<input type="hidden" name="csrf" value="{html.escape(token)}">
<input type="hidden" name="rd" value="{html.escape(rd)}">
<input type="hidden" name="action" value="start">
<button type="submit">Set up an authenticator app</button></form>"""
    return page("Set up your second factor", body, ctx, status=status)


def _enrol_form(
    gw: Gateway, ctx: RequestContext, who: Who, rd: str, action: str, label: str, button: str,
    error: str,
) -> str:  # fmt: skip
    return _code_form(
        gw, ctx, who.cookie_value, action="/.ztgw/mfa/enroll", purpose="enroll", rd=rd,
        label=label, button=button, hidden={"action": action}, error=error,
    )  # fmt: skip


def _pending_body(
    gw: Gateway, ctx: RequestContext, who: Who, rd: str, pending: PendingEnrolment, error: str
) -> str:
    minutes = max(1, int((pending.expires_at - ctx.now) // 60))
    return f"""<p>Scan this code with your authenticator app, then enter the six-digit code it
shows to finish. Until you do, nothing changes: reloading this page shows the same code.</p>
{qr_svg(pending.uri)}
<p>Or enter this key by hand: <code>{html.escape(pending.secret)}</code></p>
<p><a href="{html.escape(pending.uri)}">Open in an authenticator app on this device</a></p>
<p class="muted">This set-up waits {minutes} more minutes for your code.</p>
""" + _enrol_form(gw, ctx, who, rd, "confirm", "Code from your app", "Finish set-up", error)


def _enrolled_body(enrollment: Enrollment, rd: str) -> str:
    codes = "".join(f"<li><code>{html.escape(c)}</code></li>" for c in enrollment.backup_codes)
    return f"""<p>Your second factor is set up.</p>
<h2>Your backup codes</h2>
<p>Each works once, in place of a code from your app, if you lose your phone. Write them down
or print this page now: they are shown only this once.</p>
<ol>{codes}</ol>
<p><a class="button" href="{html.escape(rd)}">Continue</a></p>"""


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
    return page(
        "Second factor set up",
        _enrolled_body(enrollment, rd),
        ctx,
        cookies=(cookie_header,) if cookie_header else (),
    )
