"""Step-up endpoints: `POST /.ztgw/mfa/verify` (API clients), `/.ztgw/mfa` and
`/.ztgw/mfa/enroll` (browsers).

Who is stepping up is established exactly as on any request — the presented client
certificate, plus the bearer token (bound to it) or the gateway's session cookie, else the
certificate's user — and success is recorded on that session (created if the step-up came
before any session existed). Browser forms carry a CSRF token bound to the device certificate,
and `rd` only ever leads back to this origin.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import json
import math
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from aiohttp import web

from .audit import AuditUnavailable
from .context import RequestContext
from .credentials.jwt import TokenError, check_binding
from .credentials.totp import TOTPError, qr_svg
from .decision import Reason, Verdict
from .forward.headers import SERVER_BANNER
from .mfa import MFAUnavailable
from .paths import PathError, normalize_path
from .responses import DECISION_HEADER, problem, see_other
from .stages.identity import identity_from_token
from .stages.session import (
    clear_cookie_header,
    cookie_session_id,
    new_cookie_header,
    read_cookie,
    token_session_id,
)
from .store.base import ID_TOKEN, Session

if TYPE_CHECKING:
    from .app import Gateway

MAX_FORM = 4096
CSRF_TTL = 3600


def safe_redirect(rd: str | None) -> str:
    """Only a path on this origin: no scheme, no `//host`, no `/\\host`, nothing we would refuse."""
    if not rd or not rd.startswith("/") or rd.startswith("//") or "\\" in rd:
        return "/"
    path, _, query = rd.partition("?")
    try:
        norm = normalize_path(path)
    except PathError:
        return "/"
    if any(c in rd for c in "\r\n\t"):
        return "/"
    return norm + ("?" + query if query else "")


class _Who:
    def __init__(self, user: str, session_id: str, kind: str, session: Session | None) -> None:
        self.user, self.session_id, self.kind, self.session = user, session_id, kind, session


def _csrf(gw: Gateway, ctx: RequestContext, ts: int | None = None) -> str:
    ts = int(ctx.now) if ts is None else ts
    binding = (ctx.cert.fingerprint_sha256 if ctx.cert else "-") + f":{ts}"
    mac = hmac.new(gw.csrf_key, binding.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{ts}.{mac}"


def _csrf_ok(gw: Gateway, ctx: RequestContext, token: str) -> bool:
    ts_text, _, _ = token.partition(".")
    if not ts_text.isdigit() or ctx.now - int(ts_text) > CSRF_TTL:
        return False
    return hmac.compare_digest(_csrf(gw, ctx, int(ts_text)), token)


async def _who(gw: Gateway, ctx: RequestContext) -> _Who | Reason:
    cert = ctx.cert
    if cert is None:
        return Reason.CLIENT_CERT_REQUIRED
    if gw.tls.current.revocations.is_revoked(cert.serial):
        return Reason.CLIENT_CERT_REVOKED
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
        # The user the pipeline sees (claim map, issuer namespace), not the raw `sub`: MFA
        # state belongs to that user (security review L8).
        user = identity_from_token(token, gw.config.claim_maps.get(token.issuer), None).user
        return _Who(user or token.subject, sid, "token", gw.store.session(sid))
    cookie = read_cookie(ctx.headers.get("Cookie", ""), gw.config.sessions.cookie_name)
    if cookie is not None:
        sid = cookie_session_id(cookie)
        session = gw.store.session(sid)
        if session is None:
            return Reason.SESSION_INVALID
        if session.revoked:
            return Reason.SESSION_TERMINATED
        if session.device_id and session.device_id != cert.device_id:
            return Reason.SESSION_INVALID
        return _Who(session.user, sid, "cookie", session)
    if cert.user:
        return _Who(cert.user, "", "cert", None)
    return Reason.IDENTITY_UNAUTHENTICATED


def _record(
    gw: Gateway,
    ctx: RequestContext,
    verdict: Verdict,
    reason: Reason,
    detail: str,
    user: str | None,
) -> None:
    if user:
        from .context import Identity

        ctx.identity = Identity(
            user=user, source="mfa", device_id=ctx.cert.device_id if ctx.cert else None
        )
    gw.record_outcome(ctx, "mfa", verdict, reason, detail)


async def _mark_verified(gw: Gateway, ctx: RequestContext, who: _Who, method: str) -> str | None:
    """Record the step-up on the session; returns a new cookie value when one is (re)issued."""
    now = ctx.now
    store = gw.store
    session = who.session
    cookie_value: str | None = None
    if session is None or who.kind in ("cookie", "cert"):
        # SECURITY: privilege changed, so a browser gets a fresh session id (no fixation).
        cookie_value = secrets.token_urlsafe(32) if who.kind != "token" else None
        sid = cookie_session_id(cookie_value) if cookie_value else who.session_id
        old = session
        extra = dict(old.extra) if old else {}
        if old is not None:
            # The ID token is kept apart by the store: the new session gets it too, so that
            # logout still sends it to the provider.
            id_token = await store.session_id_token(old.session_id)
            if id_token:
                extra[ID_TOKEN] = id_token
        session = Session(
            session_id=sid,
            kind="cookie" if cookie_value else "token",
            user=who.user,
            device_id=ctx.cert.device_id if ctx.cert else None,
            start_ip=old.start_ip if old else ctx.client_ip,
            last_ip=ctx.client_ip,
            user_agent=ctx.headers.get("User-Agent", ""),
            created=old.created if old else now,
            last_seen=now,
            expires_at=old.expires_at if old else now + gw.config.sessions.absolute_timeout,
            requests=old.requests if old else 0,
            # Keep what the sign-in established (provider, groups, e-mail, ID token).
            extra=extra,
        )
        if old is not None and cookie_value:
            await store.revoke_session(old.session_id, "rotated after step-up", now)
    session.mfa_at = now
    session.anomaly, session.anomaly_at = 0.0, now
    session.extra["verified_ip"] = ctx.client_ip
    session.extra["mfa_method"] = method
    session.extra.pop("anomaly_since", None)
    await store.save_session(session)
    return cookie_value


def _json(data: dict[str, Any], ctx: RequestContext, status: int = 200) -> web.Response:
    resp = web.json_response(data, status=status)
    resp.headers[DECISION_HEADER] = ctx.decision_id
    resp.headers["Server"] = SERVER_BANNER
    resp.headers["Cache-Control"] = "no-store"
    return resp


_TOTP_STATUS = {
    "mfa-invalid": 401,
    "mfa-replayed": 401,
    "mfa-malformed": 400,
    "mfa-locked": 429,
    "mfa-not-enrolled": 403,
}


def _unidentified(
    gw: Gateway, ctx: RequestContext, reason: Reason, *, accept: str = ""
) -> web.Response:
    """A step-up asked without an identity to step up: refused and audited (best effort: the
    refusal stands even if the audit log cannot take it)."""
    with contextlib.suppress(AuditUnavailable):
        _record(gw, ctx, Verdict.DENY, reason, "step-up identity", None)
    return problem(reason, ctx.decision_id, accept=accept)


async def verify_api(
    gw: Gateway, request: web.BaseRequest, ctx: RequestContext
) -> web.StreamResponse:
    """POST /.ztgw/mfa/verify {"code": "123456"} with the same certificate and token or cookie."""
    who = await _who(gw, ctx)
    if isinstance(who, Reason):
        return _unidentified(gw, ctx, who)
    raw = await request.content.read(MAX_FORM + 1)
    try:
        if len(raw) > MAX_FORM:
            raise ValueError("body too large")
        body = json.loads(raw)
        if not isinstance(body, dict) or set(body) - {"code"}:
            raise ValueError('expected {"code": "123456"}')
        code = body.get("code")
    except ValueError as exc:
        with contextlib.suppress(AuditUnavailable):
            _record(gw, ctx, Verdict.DENY, Reason.REQUEST_INVALID, str(exc), who.user)
        return problem(Reason.REQUEST_INVALID, ctx.decision_id, detail=str(exc)[:100])
    result = await _verify_code(gw, ctx, who, code)
    if isinstance(result, web.Response):
        return result
    try:
        _record(
            gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, f"step-up passed ({result})", who.user
        )
    except AuditUnavailable:
        return problem(Reason.SERVICE_UNAVAILABLE, ctx.decision_id)
    await _mark_verified(gw, ctx, who, result)
    return _json({"mfa_verified_at": int(ctx.now), "user": who.user, "method": result}, ctx)


async def _verify_code(
    gw: Gateway, ctx: RequestContext, who: _Who, code: object
) -> str | web.Response:
    try:
        method = await gw.mfa.verify(who.user, code)
    except MFAUnavailable:
        return problem(Reason.SERVICE_UNAVAILABLE, ctx.decision_id, detail="MFA is not configured")
    except TOTPError as exc:
        status = _TOTP_STATUS.get(exc.reason, 401)
        gw.metrics.step_ups.labels("failed").inc()
        with contextlib.suppress(AuditUnavailable):
            _record(gw, ctx, Verdict.DENY, Reason.MFA_REQUIRED, exc.reason, who.user)
        headers: dict[str, str] = {}
        if exc.locked_until:
            headers["Retry-After"] = str(max(1, math.ceil(exc.locked_until - ctx.now)))
        resp = problem(
            Reason.MFA_REQUIRED,
            ctx.decision_id,
            status=status,
            detail=exc.reason,
            extra_headers=headers,
        )
        return resp
    gw.metrics.step_ups.labels("passed").inc()
    return method


# --- browser pages ------------------------------------------------------------------------

_STYLE = """body{font:16px/1.5 system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem;color:#1b1b1b}
label{display:block;margin:1rem 0 .3rem;font-weight:600} input{font:inherit;font-size:1.4rem;letter-spacing:.3rem;
padding:.4rem;width:9rem} button{font:inherit;padding:.5rem 1.2rem;margin-top:1rem} .err{color:#b42318}
svg{width:14rem;height:14rem} code{background:#f1f1f1;padding:.1rem .3rem;word-break:break-all}"""


def _page(
    title: str, body: str, ctx: RequestContext, status: int = 200, cookie: str | None = None
) -> web.Response:
    text = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} – ztgateway</title><style>{_STYLE}</style></head>
<body><main><h1>{html.escape(title)}</h1>{body}</main></body></html>"""
    resp = web.Response(text=text, content_type="text/html", status=status)
    resp.headers[DECISION_HEADER] = ctx.decision_id
    resp.headers["Server"] = SERVER_BANNER
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
    )
    resp.headers["X-Frame-Options"] = "DENY"
    if cookie:
        resp.headers["Set-Cookie"] = cookie
    return resp


def _form(gw: Gateway, ctx: RequestContext, rd: str, error: str = "") -> str:
    err = f'<p class="err" role="alert">{html.escape(error)}</p>' if error else ""
    return f"""<p>For this page the gateway needs your second factor. Enter the six-digit code from your
authenticator app.</p>{err}
<form method="post" action="/.ztgw/mfa">
<input type="hidden" name="csrf" value="{html.escape(_csrf(gw, ctx))}">
<input type="hidden" name="rd" value="{html.escape(rd)}">
<label for="code">Code</label>
<input id="code" name="code" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9]{{6}}" maxlength="6" required autofocus>
<button type="submit">Verify</button></form>"""


async def _read_form(request: web.BaseRequest) -> dict[str, str] | None:
    raw = await request.content.read(MAX_FORM + 1)
    if len(raw) > MAX_FORM:
        return None
    try:
        parsed = parse_qs(raw.decode("utf-8"), max_num_fields=10, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    return {k: v[0] for k, v in parsed.items()}


def _same_origin(request: web.BaseRequest) -> bool:
    """Browsers send Origin on POST; if present it must be ours (defence in depth over CSRF)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin == f"https://{request.host}"


async def step_up_page(
    gw: Gateway, request: web.BaseRequest, ctx: RequestContext
) -> web.StreamResponse:
    """GET shows the code form; POST checks it and sends the browser back to `rd`."""
    who = await _who(gw, ctx)
    if isinstance(who, Reason):
        return _unidentified(gw, ctx, who, accept="text/html")
    if request.method == "GET":
        rd = safe_redirect(parse_qs(ctx.query).get("rd", ["/"])[0])
        if not gw.mfa.enrolled(who.user):
            return see_other("/.ztgw/mfa/enroll?rd=" + quote(rd, safe="/"), ctx.decision_id)
        return _page("Confirm it is you", _form(gw, ctx, rd), ctx)
    form = await _read_form(request)
    if form is None or not _same_origin(request) or not _csrf_ok(gw, ctx, form.get("csrf", "")):
        with contextlib.suppress(AuditUnavailable):
            _record(gw, ctx, Verdict.DENY, Reason.REQUEST_INVALID, "csrf", who.user)
        return problem(
            Reason.REQUEST_INVALID,
            ctx.decision_id,
            accept="text/html",
            detail="The form expired or did not come from this site. Go back and try again.",
        )
    rd = safe_redirect(form.get("rd"))
    result = await _verify_code(gw, ctx, who, form.get("code", ""))
    if isinstance(result, web.Response):
        message = "That code did not work. Wait for the next code and try again."
        if result.status == 429:
            message = "Too many wrong codes. Try again later."
        return _page("Confirm it is you", _form(gw, ctx, rd, message), ctx, status=result.status)
    with contextlib.suppress(AuditUnavailable):
        _record(
            gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, f"step-up passed ({result})", who.user
        )
    cookie_value = await _mark_verified(gw, ctx, who, result)
    sessions = gw.config.sessions
    cookies = (
        (
            new_cookie_header(
                sessions.cookie_name, cookie_value, max_age=int(sessions.absolute_timeout)
            ),
        )
        if cookie_value
        else ()
    )
    return see_other(rd, ctx.decision_id, *cookies)


async def enroll_page(
    gw: Gateway, request: web.BaseRequest, ctx: RequestContext
) -> web.StreamResponse:
    """Enrolment in the browser, after a full verification (certificate + session or token)."""
    who = await _who(gw, ctx)
    if isinstance(who, Reason):
        return problem(who, ctx.decision_id, accept="text/html")
    rd = safe_redirect(parse_qs(ctx.query).get("rd", ["/"])[0])
    if request.method == "GET":
        if gw.mfa.enrolled(who.user):
            return _page(
                "Already enrolled",
                "<p>Your second factor is set up. To replace it, ask IT to reset it.</p>",
                ctx,
            )
        try:
            enrollment = await gw.mfa.enroll(who.user)
        except MFAUnavailable:
            return problem(Reason.SERVICE_UNAVAILABLE, ctx.decision_id, accept="text/html")
        gw.metrics.mfa_enrollments.inc()
        with contextlib.suppress(AuditUnavailable):
            _record(
                gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, "mfa enrolment started", who.user
            )
        codes = "".join(f"<li><code>{html.escape(c)}</code></li>" for c in enrollment.backup_codes)
        body = f"""<p>Scan this code with your authenticator app, then enter the six-digit code it shows.</p>
{qr_svg(enrollment.uri)}
<p>Or enter this key by hand: <code>{html.escape(enrollment.secret)}</code></p>
<details><summary>Backup codes (shown once — keep them somewhere safe)</summary><ul>{codes}</ul></details>
{_form(gw, ctx, rd)}"""
        return _page("Set up your second factor", body, ctx)
    return problem(Reason.METHOD_NOT_ALLOWED, ctx.decision_id, accept="text/html")


def clear_cookie(gw: Gateway) -> str:
    return clear_cookie_header(gw.config.sessions.cookie_name)
