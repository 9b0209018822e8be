"""WebAuthn over HTTP: `/.ztgw/webauthn` (a person's security keys and passkeys, adding one),
the JSON ceremony endpoints the page's script calls, and the security-key part of the step-up
page (`/.ztgw/mfa`).

The same rules as TOTP (portal/mfa.py): who is stepping up is established with the same
checks as any request (`who_steps_up`); every POST passes `forms.py` first (Fetch Metadata,
Origin, `application/json`) and carries the page's CSRF token, bound to the device certificate
and the browser session; adding a key needs a person signed in with the identity provider, and,
when the account already has a second factor, a step-up within `step_up_validity` (so a stolen
session cookie cannot add the thief's key). Every refusal is audited with its reason, counted in
`ztgw_webauthn_ceremonies`, and answered with problem+json (the page's script shows its title).
The ceremonies are for browsers: they are bound to the browser session's id.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import web

from .. import DECISION_HEADER
from ..audit import AuditUnavailable
from ..context import RequestContext
from ..credentials.webauthn import MAX_CREDENTIAL_JSON, WebAuthnRefused
from ..decision import Reason, Verdict
from ..edge.http1 import Request
from .forms import JSON_TYPE, csrf_ok, issue_csrf, json_object, read_checked_body, return_target
from .redirect import local_redirect
from .render import json_answer, template_page
from .stepup import (
    Who,
    mark_verified,
    record,
    refuse_mfa,
    route_session,
    signed_in,
    who_steps_up,
)

if TYPE_CHECKING:
    from ..services import Services

STAGE = "webauthn"
PURPOSE = "webauthn"
KEYS_PAGE = "/.ztgw/webauthn"
SCRIPT = "/.ztgw/webauthn.js"
KeySection = dict[str, str]
"""The values of `_macros.html` webauthn_section: csrf, rd and the ceremony."""
_SCRIPT_TEXT = files("ztgateway.portal").joinpath("webauthn.js").read_text(encoding="utf-8")


def keys_url(rd: str) -> str:
    return KEYS_PAGE + "?rd=" + quote(rd, safe="/")


async def script(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET /.ztgw/webauthn.js: the pages' one script (CSP allows no inline script)."""
    resp = web.Response(text=_SCRIPT_TEXT, content_type="text/javascript")
    resp.headers[DECISION_HEADER] = ctx.decision_id
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _fresh(gw: Services, ctx: RequestContext, who: Who) -> bool:
    session = who.session
    validity = gw.config.sessions.step_up_validity
    return (
        session is not None and session.mfa_at is not None and ctx.now - session.mfa_at <= validity
    )


async def _needs_step_up(gw: Services, ctx: RequestContext, who: Who) -> bool:
    """SECURITY: an account with a second factor adds another only right after using one."""
    if _fresh(gw, ctx, who):
        return False
    return gw.mfa.enrolled(who.user) or bool(await gw.webauthn.credentials(who.user))


async def _person(gw: Services, ctx: RequestContext, rd: str) -> Who | web.Response:
    """A person signed in with the identity provider, in this browser, on this device."""
    return await signed_in(gw, ctx, rd, keys_url(rd), STAGE)


def _section(gw: Services, ctx: RequestContext, who: Who, rd: str, ceremony: str) -> KeySection:
    """What `_macros.html` webauthn_section shows: the page's CSRF token, bound to this device
    and browser session, for the ceremony its button starts."""
    token = issue_csrf(gw, ctx, PURPOSE, who.cookie_value)
    return {"csrf": token, "rd": rd, "ceremony": ceremony}


def _when(at: float | None) -> str:
    if at is None:
        return "never"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")


async def keys_page(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET /.ztgw/webauthn: the person's keys, and the button that adds one."""
    if not gw.webauthn.available:
        return refuse_mfa(gw, ctx, Reason.SERVICE_UNAVAILABLE, "WebAuthn is not configured")
    rd = return_target(ctx)
    who = await _person(gw, ctx, rd)
    if isinstance(who, web.Response):
        return who
    credentials = await gw.webauthn.credentials(who.user)
    keys = [
        {"name": c.name, "added": _when(c.created_at), "last_used": _when(c.last_used_at)}
        for c in credentials
    ]
    step_up = None
    key = None
    if await _needs_step_up(gw, ctx, who):
        step_up = "/.ztgw/mfa?rd=" + quote(keys_url(rd), safe="/")
    else:
        key = _section(gw, ctx, who, rd, "register")
    return template_page(
        "security_keys.html",
        ctx,
        title="Security keys and passkeys",
        scripts=(SCRIPT,),
        keys=keys,
        step_up=step_up,
        key=key,
        rd=rd,
    )


async def step_up_section(
    gw: Services, ctx: RequestContext, who: Who, rd: str
) -> KeySection | None:
    """The step-up page's security-key button, or None when this person has no key here."""
    if not gw.webauthn.available or who.kind != "cookie":
        return None
    if not await gw.webauthn.credentials(who.user):
        return None
    return _section(gw, ctx, who, rd, "authenticate")


# --- the ceremonies (JSON, called by webauthn.js) --------------------------------------------


async def _posted(
    gw: Services, request: Request, ctx: RequestContext
) -> tuple[dict[str, Any], str] | web.Response:
    """The JSON body once forms.py passed it, with a valid CSRF token; and its `rd`."""
    if not gw.webauthn.available:
        return refuse_mfa(gw, ctx, Reason.SERVICE_UNAVAILABLE, "WebAuthn is not configured")
    raw = await read_checked_body(
        gw, request, ctx, JSON_TYPE, limit=MAX_CREDENTIAL_JSON, stage=STAGE
    )
    if isinstance(raw, web.Response):
        return raw
    body = json_object(raw)
    if body is None:
        return refuse_mfa(gw, ctx, Reason.REQUEST_INVALID, "expected a JSON object", None, STAGE)
    return body, local_redirect(body.get("rd") if isinstance(body.get("rd"), str) else None)


def _ceremony_refused(
    gw: Services, ctx: RequestContext, who: Who, ceremony: str, exc: WebAuthnRefused
) -> web.Response:
    gw.metrics.webauthn_ceremonies.labels(ceremony, exc.reason.value).inc()
    if ceremony == "authenticate":
        gw.metrics.step_ups.labels("failed").inc()
    return refuse_mfa(gw, ctx, exc.reason, exc.detail, who.user, STAGE)


async def _for_ceremony(
    gw: Services, request: Request, ctx: RequestContext, *, adding: bool
) -> tuple[dict[str, Any], str, Who] | web.Response:
    posted = await _posted(gw, request, ctx)
    if isinstance(posted, web.Response):
        return posted
    body, rd = posted
    if adding:
        who = await _person(gw, ctx, rd)
        if isinstance(who, web.Response):
            return who
    else:
        found = await who_steps_up(gw, ctx, rd)
        if isinstance(found, Reason):
            return refuse_mfa(gw, ctx, found, "step-up identity", None, STAGE)
        if found.kind != "cookie":
            return refuse_mfa(
                gw,
                ctx,
                Reason.IDENTITY_UNAUTHENTICATED,
                "a security-key step-up is made in a browser session",
                found.user,
                STAGE,
            )
        who = found
    if not csrf_ok(gw, ctx, body.get("csrf"), PURPOSE, who.cookie_value):
        detail = f"{PURPOSE}: missing or invalid token"
        return refuse_mfa(gw, ctx, Reason.CSRF_INVALID, detail, who.user, STAGE)
    if adding and await _needs_step_up(gw, ctx, who):
        return refuse_mfa(
            gw,
            ctx,
            Reason.MFA_REQUIRED,
            "adding a security key needs a step-up with a factor the account has",
            who.user,
            STAGE,
        )
    return body, rd, who


async def _begin(
    gw: Services, request: Request, ctx: RequestContext, *, adding: bool
) -> tuple[Who, bool] | web.Response:
    """Who asks for options, and whether the route `rd` leads to wants user verification."""
    checked = await _for_ceremony(gw, request, ctx, adding=adding)
    if isinstance(checked, web.Response):
        return checked
    _, rd, who = checked
    return who, route_session(gw, ctx, rd).require_user_verification


async def register_options(
    gw: Services, request: Request, ctx: RequestContext
) -> web.StreamResponse:
    """POST /.ztgw/webauthn/register/options {"csrf", "rd"}: options for credentials.create()."""
    begun = await _begin(gw, request, ctx, adding=True)
    if isinstance(begun, web.Response):
        return begun
    who, uv = begun
    options = await gw.webauthn.registration_options(
        who.user, who.session_id, ctx.now, require_uv=uv
    )
    return json_answer(options, ctx)


async def register(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """POST /.ztgw/webauthn/register {"csrf", "rd", "name", "credential"}."""
    checked = await _for_ceremony(gw, request, ctx, adding=True)
    if isinstance(checked, web.Response):
        return checked
    body, rd, who = checked
    name = body.get("name") if isinstance(body.get("name"), str) else ""
    try:
        added = await gw.webauthn.register(
            who.user, who.session_id, body.get("credential"), str(name), ctx.now
        )
    except WebAuthnRefused as exc:
        return _ceremony_refused(gw, ctx, who, "register", exc)
    gw.metrics.webauthn_ceremonies.labels("register", "success").inc()
    with contextlib.suppress(AuditUnavailable):
        detail = f"webauthn credential {added.credential_id[:16]} ({added.name}) registered"
        record(gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, detail, who.user, STAGE)
    # The person just used the new key: that is a step-up too (as a confirmed TOTP enrolment).
    cookie = await mark_verified(gw, ctx, who, "webauthn", user_verified=added.user_verified)
    return json_answer(
        {"redirect": keys_url(rd), "credential_id": added.credential_id}, ctx, cookie=cookie
    )


async def authenticate_options(
    gw: Services, request: Request, ctx: RequestContext
) -> web.StreamResponse:
    """POST /.ztgw/webauthn/authenticate/options {"csrf", "rd"}: for credentials.get()."""
    begun = await _begin(gw, request, ctx, adding=False)
    if isinstance(begun, web.Response):
        return begun
    who, uv = begun
    options = await gw.webauthn.authentication_options(
        who.user, who.session_id, ctx.now, require_uv=uv
    )
    if options is None:
        return refuse_mfa(
            gw, ctx, Reason.MFA_NOT_ENROLLED, "no security key registered", who.user, STAGE
        )
    gw.metrics.step_ups.labels("issued").inc()
    return json_answer(options, ctx)


async def authenticate(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """POST /.ztgw/webauthn/authenticate {"csrf", "rd", "credential"}: the step-up."""
    checked = await _for_ceremony(gw, request, ctx, adding=False)
    if isinstance(checked, web.Response):
        return checked
    body, rd, who = checked
    try:
        verified = await gw.webauthn.authenticate(
            who.user, who.session_id, body.get("credential"), ctx.now
        )
    except WebAuthnRefused as exc:
        return _ceremony_refused(gw, ctx, who, "authenticate", exc)
    gw.metrics.webauthn_ceremonies.labels("authenticate", "success").inc()
    gw.metrics.step_ups.labels("passed").inc()
    key = verified.credential
    with contextlib.suppress(AuditUnavailable):
        detail = f"step-up passed (webauthn {key.credential_id[:16]} {key.name})"
        record(gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, detail, who.user, STAGE)
    cookie = await mark_verified(gw, ctx, who, "webauthn", user_verified=verified.user_verified)
    return json_answer({"redirect": rd}, ctx, cookie=cookie)
