"""WebAuthn over HTTP: `/.ztgw/webauthn` (a person's security keys and passkeys, adding one),
the JSON ceremony endpoints the page's script calls, and the security-key part of the step-up
page (`/.ztgw/mfa`).

The same rules as TOTP (mfa_endpoints.py): who is stepping up is established with the same
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
import html
import json
from datetime import UTC, datetime
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import web

from . import SERVER_BANNER
from .audit import AuditUnavailable
from .context import RequestContext
from .credentials.webauthn import MAX_CREDENTIAL_JSON, WebAuthnRefused
from .decision import Reason, Verdict
from .edge.http1 import Request
from .forms import JSON_TYPE, csrf_binding, local_redirect, read_checked_body
from .mfa_endpoints import (
    Who,
    _json,
    _mark_verified,
    _rd,
    _record,
    _refused,
    _signed_in,
    route_session,
    who_steps_up,
)
from .portal import page
from .responses import DECISION_HEADER
from .store.base import WebAuthnCredential

if TYPE_CHECKING:
    from .app import Gateway

STAGE = "webauthn"
PURPOSE = "webauthn"
KEYS_PAGE = "/.ztgw/webauthn"
SCRIPT = "/.ztgw/webauthn.js"
_SCRIPT_TEXT = files("ztgateway").joinpath("webauthn.js").read_text(encoding="utf-8")


def keys_url(rd: str) -> str:
    return KEYS_PAGE + "?rd=" + quote(rd, safe="/")


async def script(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET /.ztgw/webauthn.js: the pages' one script (CSP allows no inline script)."""
    resp = web.Response(text=_SCRIPT_TEXT, content_type="text/javascript")
    resp.headers[DECISION_HEADER] = ctx.decision_id
    resp.headers["Server"] = SERVER_BANNER
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _fresh(gw: Gateway, ctx: RequestContext, who: Who) -> bool:
    session = who.session
    validity = gw.config.sessions.step_up_validity
    return (
        session is not None and session.mfa_at is not None and ctx.now - session.mfa_at <= validity
    )


async def _needs_step_up(gw: Gateway, ctx: RequestContext, who: Who) -> bool:
    """SECURITY: an account with a second factor adds another only right after using one."""
    if _fresh(gw, ctx, who):
        return False
    return gw.mfa.enrolled(who.user) or bool(await gw.webauthn.credentials(who.user))


async def _person(gw: Gateway, ctx: RequestContext, rd: str) -> Who | web.Response:
    """A person signed in with the identity provider, in this browser, on this device."""
    return await _signed_in(gw, ctx, rd, keys_url(rd), STAGE)


def _section(gw: Gateway, ctx: RequestContext, who: Who, rd: str, inner: str) -> str:
    token = gw.csrf.issue(PURPOSE, csrf_binding(ctx, who.cookie_value), ctx.now)
    return (
        f'<div id="webauthn" data-csrf="{html.escape(token)}" data-rd="{html.escape(rd)}">'
        f'{inner}<p id="webauthn-status" class="muted" role="status" aria-live="polite"></p></div>'
    )


def _when(at: float | None) -> str:
    if at is None:
        return "never"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _key_list(credentials: list[WebAuthnCredential]) -> str:
    if not credentials:
        return "<p>No security key or passkey is registered for your account yet.</p>"
    rows = "".join(
        f"<li><strong>{html.escape(c.name)}</strong> · added {_when(c.created_at)} · last used "
        f"{_when(c.last_used_at)}</li>"
        for c in credentials
    )
    return f'<ul id="webauthn-keys">{rows}</ul>'


async def keys_page(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET /.ztgw/webauthn: the person's keys, and the button that adds one."""
    if not gw.webauthn.available:
        return _refused(gw, ctx, Reason.SERVICE_UNAVAILABLE, "WebAuthn is not configured")
    rd = _rd(ctx)
    who = await _person(gw, ctx, rd)
    if isinstance(who, web.Response):
        return who
    credentials = await gw.webauthn.credentials(who.user)
    body = _key_list(credentials)
    if await _needs_step_up(gw, ctx, who):
        step_up = "/.ztgw/mfa?rd=" + quote(keys_url(rd), safe="/")
        body += (
            "<p>To add another security key, first confirm it is you with a factor you "
            f'already have.</p><p><a class="button" href="{html.escape(step_up)}">'
            "Confirm it is you</a></p>"
        )
    else:
        body += _section(
            gw,
            ctx,
            who,
            rd,
            '<p><label for="webauthn-name">Name for the new key</label> '
            '<input id="webauthn-name" maxlength="64" placeholder="e.g. YubiKey, laptop"></p>'
            '<p><button id="webauthn-register" type="button">Add a security key or passkey'
            "</button></p>",
        )
    body += f'<p><a href="{html.escape(rd)}">Continue</a></p>'
    return page("Security keys and passkeys", body, ctx, scripts=(SCRIPT,))


async def step_up_section(gw: Gateway, ctx: RequestContext, who: Who, rd: str) -> str | None:
    """The step-up page's security-key button, or None when this person has no key here."""
    if not gw.webauthn.available or who.kind != "cookie":
        return None
    if not await gw.webauthn.credentials(who.user):
        return None
    return _section(
        gw,
        ctx,
        who,
        rd,
        "<p>Use your security key or passkey.</p>"
        '<p><button id="webauthn-authenticate" type="button">Use my security key</button></p>',
    )


# --- the ceremonies (JSON, called by webauthn.js) --------------------------------------------


async def _posted(
    gw: Gateway, request: Request, ctx: RequestContext
) -> tuple[dict[str, Any], str] | web.Response:
    """The JSON body once forms.py passed it, with a valid CSRF token; and its `rd`."""
    if not gw.webauthn.available:
        return _refused(gw, ctx, Reason.SERVICE_UNAVAILABLE, "WebAuthn is not configured")
    raw = await read_checked_body(
        gw, request, ctx, JSON_TYPE, limit=MAX_CREDENTIAL_JSON, stage=STAGE
    )
    if isinstance(raw, web.Response):
        return raw
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return _refused(gw, ctx, Reason.REQUEST_INVALID, "expected a JSON object", None, STAGE)
    return body, local_redirect(body.get("rd") if isinstance(body.get("rd"), str) else None)


def _csrf_ok(gw: Gateway, ctx: RequestContext, who: Who, body: dict[str, Any]) -> bool:
    token = body.get("csrf")
    binding = csrf_binding(ctx, who.cookie_value)
    return isinstance(token, str) and gw.csrf.valid(token, PURPOSE, binding, ctx.now)


def _options(text: str, ctx: RequestContext) -> web.Response:
    resp = web.Response(text=text, content_type="application/json")
    resp.headers[DECISION_HEADER] = ctx.decision_id
    resp.headers["Server"] = SERVER_BANNER
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _ceremony_refused(
    gw: Gateway, ctx: RequestContext, who: Who, ceremony: str, refused: WebAuthnRefused
) -> web.Response:
    gw.metrics.webauthn_ceremonies.labels(ceremony, refused.reason.value).inc()
    if ceremony == "authenticate":
        gw.metrics.step_ups.labels("failed").inc()
    return _refused(gw, ctx, refused.reason, refused.detail, who.user, STAGE)


async def _for_ceremony(
    gw: Gateway, request: Request, ctx: RequestContext, *, adding: bool
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
            return _refused(gw, ctx, found, "step-up identity", None, STAGE)
        if found.kind != "cookie":
            return _refused(
                gw,
                ctx,
                Reason.IDENTITY_UNAUTHENTICATED,
                "a security-key step-up is made in a browser session",
                found.user,
                STAGE,
            )
        who = found
    if not _csrf_ok(gw, ctx, who, body):
        return _refused(gw, ctx, Reason.CSRF_INVALID, f"{PURPOSE}: missing or invalid token", who.user, STAGE)  # fmt: skip
    if adding and await _needs_step_up(gw, ctx, who):
        return _refused(
            gw,
            ctx,
            Reason.MFA_REQUIRED,
            "adding a security key needs a step-up with a factor the account has",
            who.user,
            STAGE,
        )
    return body, rd, who


async def _begin(
    gw: Gateway, request: Request, ctx: RequestContext, *, adding: bool
) -> tuple[Who, bool] | web.Response:
    """Who asks for options, and whether the route `rd` leads to wants user verification."""
    checked = await _for_ceremony(gw, request, ctx, adding=adding)
    if isinstance(checked, web.Response):
        return checked
    _, rd, who = checked
    return who, route_session(gw, ctx, rd).require_user_verification


async def register_options(
    gw: Gateway, request: Request, ctx: RequestContext
) -> web.StreamResponse:
    """POST /.ztgw/webauthn/register/options {"csrf", "rd"}: options for credentials.create()."""
    begun = await _begin(gw, request, ctx, adding=True)
    if isinstance(begun, web.Response):
        return begun
    who, uv = begun
    options = await gw.webauthn.registration_options(
        who.user, who.session_id, ctx.now, require_uv=uv
    )
    return _options(options, ctx)


async def register(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
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
    except WebAuthnRefused as refused:
        return _ceremony_refused(gw, ctx, who, "register", refused)
    gw.metrics.webauthn_ceremonies.labels("register", "success").inc()
    with contextlib.suppress(AuditUnavailable):
        detail = f"webauthn credential {added.credential_id[:16]} ({added.name}) registered"
        _record(gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, detail, who.user, STAGE)
    # The person just used the new key: that is a step-up too (as a confirmed TOTP enrolment).
    cookie = await _mark_verified(gw, ctx, who, "webauthn", user_verified=added.user_verified)
    return _json({"redirect": keys_url(rd), "credential_id": added.credential_id}, ctx, cookie)


async def authenticate_options(
    gw: Gateway, request: Request, ctx: RequestContext
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
        return _refused(
            gw, ctx, Reason.MFA_NOT_ENROLLED, "no security key registered", who.user, STAGE
        )
    gw.metrics.step_ups.labels("issued").inc()
    return _options(options, ctx)


async def authenticate(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """POST /.ztgw/webauthn/authenticate {"csrf", "rd", "credential"}: the step-up."""
    checked = await _for_ceremony(gw, request, ctx, adding=False)
    if isinstance(checked, web.Response):
        return checked
    body, rd, who = checked
    try:
        verified = await gw.webauthn.authenticate(
            who.user, who.session_id, body.get("credential"), ctx.now
        )
    except WebAuthnRefused as refused:
        return _ceremony_refused(gw, ctx, who, "authenticate", refused)
    gw.metrics.webauthn_ceremonies.labels("authenticate", "success").inc()
    gw.metrics.step_ups.labels("passed").inc()
    key = verified.credential
    with contextlib.suppress(AuditUnavailable):
        detail = f"step-up passed (webauthn {key.credential_id[:16]} {key.name})"
        _record(gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, detail, who.user, STAGE)
    cookie = await _mark_verified(gw, ctx, who, "webauthn", user_verified=verified.user_verified)
    return _json({"redirect": rd}, ctx, cookie)
