"""The second factor over HTTP: `POST /.ztgw/mfa/verify` (API clients), `/.ztgw/mfa` (the
step-up page) and `/.ztgw/mfa/enroll` (setting up an authenticator), for people and programs.

Who is stepping up is established by stepup.py, with the same checks as any request (issue
18, L3); a step-up never extends a session. Every POST first passes `forms.py` (Fetch
Metadata, Origin, content type; a CSRF token on forms), before the identity is looked at or an
attempt counted, so another site can neither burn someone's attempts (L1) nor enrol them (M1).
Enrolment needs a person signed in with the identity provider (not a certificate alone), is a
POST, stays pending until a code from the new secret confirms it, and replacing a factor needs
the current one (or an operator's reset).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote
from zoneinfo import ZoneInfo

from aiohttp import web

from ..audit import AuditUnavailable
from ..context import RequestContext
from ..credentials.mfa import MFABusy, MFAUnavailable, PendingEnrolment
from ..credentials.totp import SealedSecretError, TOTPError, qr_svg
from ..decision import Reason, Verdict
from ..edge.http1 import Request
from ..responses import problem, see_other
from ..sessions import read_cookie
from . import webauthn as wa
from .forms import (
    JSON_TYPE,
    MAX_FORM_BYTES,
    issue_csrf,
    json_object,
    read_checked_body,
    read_checked_form,
    return_target,
)
from .redirect import local_redirect
from .render import json_answer, template_page, trusted
from .stepup import (
    Who,
    mark_verified,
    record,
    refuse_mfa,
    route_session,
    signed_in,
    unidentified,
    who_steps_up,
)
from .when import until, zone

if TYPE_CHECKING:
    from ..services import Services

log = logging.getLogger("ztgateway.mfa")


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
    gw: Services, ctx: RequestContext, who: Who, code: object
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


def _audited(gw: Services, ctx: RequestContext, who: Who, refused: CodeRefused) -> CodeRefused:
    with contextlib.suppress(AuditUnavailable):
        record(gw, ctx, Verdict.DENY, refused.reason, refused.detail, who.user)
    return refused


def _code_refused(gw: Services, ctx: RequestContext, who: Who, exc: TOTPError) -> CodeRefused:
    gw.metrics.step_ups.labels("failed").inc()
    retry = max(1, math.ceil(exc.locked_until - ctx.now)) if exc.locked_until else None
    refused = CodeRefused(Reason(exc.reason), exc.reason, retry, exc.locked_until)
    return _audited(gw, ctx, who, refused)


# --- the API -------------------------------------------------------------------------------


async def verify_api(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """POST /.ztgw/mfa/verify {"code": "123456"} (application/json) with the same certificate
    and token or cookie the step-up is for."""
    raw = await read_checked_body(gw, request, ctx, JSON_TYPE, limit=MAX_FORM_BYTES, stage="mfa")
    if isinstance(raw, web.Response):
        return raw
    who = await who_steps_up(gw, ctx)
    if isinstance(who, Reason):
        return refuse_mfa(gw, ctx, who, "step-up identity")
    body = json_object(raw)
    if body is None or set(body) != {"code"}:
        return refuse_mfa(gw, ctx, Reason.REQUEST_INVALID, 'expected {"code": "123456"}', who.user)
    result = await _check_code(gw, ctx, who, body["code"])
    if isinstance(result, CodeRefused):
        return result.response(ctx)
    try:
        record(
            gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, f"step-up passed ({result})", who.user
        )
    except AuditUnavailable:
        return problem(Reason.SERVICE_UNAVAILABLE, ctx.decision_id, look=ctx.look)
    # The browser session the step-up rotated goes back to the caller (issue 18, I2): without
    # it a cookie client would have revoked its own session.
    cookie = await mark_verified(gw, ctx, who, result)
    return json_answer(
        {"mfa_verified_at": int(ctx.now), "user": who.user, "method": result}, ctx, cookie=cookie
    )


# --- the step-up page ----------------------------------------------------------------------


def _code_form(
    gw: Services,
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
    token = issue_csrf(gw, ctx, purpose, who_cookie)
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
    gw: Services,
    ctx: RequestContext,
    who: Who,
    rd: str,
    *,
    error: str = "",
    status: int = 200,
    why: Reason | None = None,
    lock_ends: str | None = None,
    key_section: wa.KeySection | None = None,
    totp: bool = True,
) -> web.Response:
    """The step-up page: the security-key section (`_macros.html` webauthn_section)
    where the route takes a key the person has, the TOTP form where it takes TOTP."""
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
        key_section=key_section,
        totp=totp,
        scripts=(wa.SCRIPT,) if key_section else (),
    )


async def _step_up_choice(gw: Services, ctx: RequestContext, who: Who, rd: str) -> web.Response:
    """The factors the person has that the route `rd` takes: a security key, a TOTP code, or
    both; none yet: set one up (a security key where the route takes nothing else)."""
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
    gw: Services, request: Request, ctx: RequestContext, purpose: str
) -> dict[str, str] | web.Response:
    """The fields of one of these pages' forms once forms.py passed it (before anyone is
    identified or anything is counted), or its refusal."""
    cookie = read_cookie(ctx.headers.get("Cookie", ""), gw.config.sessions.cookie_name)
    return await read_checked_form(gw, request, ctx, purpose, cookie, stage="mfa")


async def step_up_page(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET shows the code form; POST checks it and sends the browser back to `rd`."""
    if request.method == "GET":
        rd = return_target(ctx)
        who = await who_steps_up(gw, ctx, rd)
        if isinstance(who, Reason):
            return unidentified(gw, ctx, who, rd)
        return await _step_up_choice(gw, ctx, who, rd)
    form = await _posted_form(gw, request, ctx, "mfa")
    if isinstance(form, web.Response):
        return form
    rd = local_redirect(form.get("rd"))
    who = await who_steps_up(gw, ctx, rd)
    if isinstance(who, Reason):
        return unidentified(gw, ctx, who, rd)
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
        record(
            gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, f"step-up passed ({result})", who.user
        )
    cookie_header = await mark_verified(gw, ctx, who, result)
    return see_other(rd, ctx.decision_id, *((cookie_header,) if cookie_header else ()))


# --- enrolment -----------------------------------------------------------------------------


def _enrol_page(
    gw: Services, ctx: RequestContext, who: Who, rd: str, *, status: int = 200, error: str = ""
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
    token = issue_csrf(gw, ctx, "enroll", who.cookie_value)
    return template_page(
        "enrol_start.html",
        ctx,
        title="Set up your second factor",
        status=status,
        error=error,
        hidden={"csrf": token, "rd": rd, "action": "start"},
    )


def _enrol_form(
    gw: Services, ctx: RequestContext, who: Who, rd: str, action: str, label: str, button: str,
    error: str,
) -> dict[str, Any]:  # fmt: skip
    return _code_form(
        gw, ctx, who.cookie_value, action="/.ztgw/mfa/enroll", purpose="enroll", rd=rd,
        label=label, button=button, hidden={"action": action}, error=error,
    )  # fmt: skip


def _pending_page(
    gw: Services,
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


async def enroll_page(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET shows the enrolment as it stands; POST starts, replaces or confirms it."""
    if not gw.mfa.available:
        return refuse_mfa(gw, ctx, Reason.SERVICE_UNAVAILABLE, "MFA is not configured")
    if request.method == "GET":
        rd = return_target(ctx)
        who = await signed_in(gw, ctx, rd)
        if isinstance(who, web.Response):
            return who
        return _enrol_page(gw, ctx, who, rd)
    form = await _posted_form(gw, request, ctx, "enroll")
    if isinstance(form, web.Response):
        return form
    rd = local_redirect(form.get("rd"))
    who = await signed_in(gw, ctx, rd)
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
        return refuse_mfa(gw, ctx, Reason.SERVICE_UNAVAILABLE, "the enrolment cannot be read")
    return refuse_mfa(gw, ctx, Reason.REQUEST_INVALID, f"unknown action {action[:20]!r}", who.user)


def _enrol_refused(
    gw: Services, ctx: RequestContext, who: Who, rd: str, refused: CodeRefused
) -> web.Response:
    """A person sees the enrolment page again (same QR code) with what went wrong; a program
    gets problem+json."""
    if not ctx.wants_html:
        return refused.response(ctx)
    return _enrol_page(gw, ctx, who, rd, status=refused.reason.status, error=refused.message)


def _back_to_enrolment(ctx: RequestContext, rd: str) -> web.Response:
    # Post/redirect/get: a reload shows the page again instead of re-posting the form.
    return see_other("/.ztgw/mfa/enroll?rd=" + quote(rd, safe="/"), ctx.decision_id)


async def _start(gw: Services, ctx: RequestContext, who: Who, rd: str) -> web.Response:
    if gw.mfa.enrolled(who.user):
        # Replacing a factor needs the current one: the "replace" form.
        refused = CodeRefused(Reason.MFA_ENROLMENT_EXISTS, "start: replace with the current code")
        return _enrol_refused(gw, ctx, who, rd, _audited(gw, ctx, who, refused))
    await gw.mfa.start_enrolment(who.user, ctx.now)
    with contextlib.suppress(AuditUnavailable):
        record(gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, "mfa enrolment started", who.user)
    return _back_to_enrolment(ctx, rd)


async def _replace(gw: Services, ctx: RequestContext, who: Who, rd: str, code: str) -> web.Response:
    if not gw.mfa.enrolled(who.user):
        return _back_to_enrolment(ctx, rd)
    result = await _check_code(gw, ctx, who, code)
    if isinstance(result, CodeRefused):
        return _enrol_refused(gw, ctx, who, rd, result)
    await gw.mfa.start_enrolment(who.user, ctx.now)
    with contextlib.suppress(AuditUnavailable):
        record(
            gw,
            ctx,
            Verdict.ALLOW,
            Reason.POLICY_ALLOWED,
            f"mfa replacement started ({result})",
            who.user,
        )
    return _back_to_enrolment(ctx, rd)


async def _confirm(gw: Services, ctx: RequestContext, who: Who, rd: str, code: str) -> web.Response:
    try:
        enrollment = await gw.mfa.confirm_enrolment(who.user, code, ctx.now)
    except LookupError:
        refused = CodeRefused(Reason.MFA_ENROLMENT_EXPIRED, "confirm: nothing pending")
        return _enrol_refused(gw, ctx, who, rd, _audited(gw, ctx, who, refused))
    except TOTPError as exc:
        return _enrol_refused(gw, ctx, who, rd, _code_refused(gw, ctx, who, exc))
    gw.metrics.mfa_enrollments.inc()
    with contextlib.suppress(AuditUnavailable):
        record(gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, "mfa enrolment confirmed", who.user)
    # The person just proved the new factor: that is a step-up too.
    cookie_header = await mark_verified(gw, ctx, who, "totp")
    return template_page(
        "enrolled.html",
        ctx,
        title="Second factor set up",
        cookies=(cookie_header,) if cookie_header else (),
        codes=list(enrollment.backup_codes),
        rd=rd,
    )


def _user_zone(gw: Services, user: str) -> ZoneInfo:
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
