"""Pages for people: sign-in, the OIDC callback, sign-out, whoami.

No external assets (a gateway's pages must work when nothing else does), every value escaped,
readable on a phone, a strict Content-Security-Policy. Forms carry a CSRF token; redirect
targets stay on this origin.
"""

from __future__ import annotations

import contextlib
import html
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from aiohttp import web

from .audit import AuditUnavailable
from .context import Identity, RequestContext
from .credentials.oidc import OIDCClient, OIDCError
from .decision import Reason, Verdict
from .forms import csrf_binding, local_redirect, public_origin, read_checked_form
from .forward.headers import SERVER_BANNER
from .http1 import Request
from .paths import PathError, normalize_path
from .responses import DECISION_HEADER, problem, see_other, wants_html
from .stages.session import clear_cookie_header, cookie_session_id, read_cookie
from .store.base import ID_TOKEN, StoreUnavailable

if TYPE_CHECKING:
    from .app import Gateway

LOGIN_COOKIE = "__Host-ztgw-oidc"

STYLE = """body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:34rem;margin:2.5rem auto;
padding:0 1rem;color:#1b1b1b;background:#fff} h1{font-size:1.45rem;line-height:1.3}
a.button,button{display:inline-block;font:inherit;padding:.55rem 1.2rem;border-radius:6px;border:1px solid #0b57d0;
background:#0b57d0;color:#fff;text-decoration:none;cursor:pointer} a.button:focus,button:focus{outline:3px solid #a8c7fa}
label{display:block;margin:1rem 0 .3rem;font-weight:600} input{font:inherit;font-size:1.4rem;letter-spacing:.3rem;
padding:.4rem;width:9rem} .err{color:#b42318} .muted{color:#555;font-size:.9rem} code{background:#f1f1f1;
padding:.1rem .3rem;word-break:break-all} table{border-collapse:collapse;width:100%} td,th{text-align:left;
padding:.3rem .4rem;border-bottom:1px solid #eee;vertical-align:top} svg{width:14rem;height:14rem}
footer{margin-top:2rem;color:#666;font-size:.85rem} ul.providers{list-style:none;padding:0}
ul.providers li{margin:.7rem 0}"""


def page(
    title: str,
    body: str,
    ctx: RequestContext,
    *,
    status: int = 200,
    cookies: tuple[str, ...] = (),
    form_targets: tuple[str, ...] = (),
    scripts: tuple[str, ...] = (),
) -> web.Response:
    """The one shell of every portal page (`body` is trusted HTML built with html.escape).

    `form_targets`: origins a form on the page may end up at besides this one (CSP
    `form-action` also governs the redirects after a submission: sign-out goes on to the
    identity provider's end-session endpoint). `scripts`: the gateway's own script paths the
    page loads (the WebAuthn ceremonies); CSP then allows scripts and fetches from this origin
    only, never inline."""
    tags = "".join(f'<script src="{html.escape(src)}" defer></script>' for src in scripts)
    text = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} – ztgateway</title><style>{STYLE}</style>{tags}</head>
<body><main><h1>{html.escape(title)}</h1>{body}</main>
<footer>ztgateway · decision <code>{html.escape(ctx.decision_id)}</code></footer></body></html>"""
    resp = web.Response(text=text, content_type="text/html", status=status)
    resp.headers[DECISION_HEADER] = ctx.decision_id
    resp.headers["Server"] = SERVER_BANNER
    resp.headers["Cache-Control"] = "no-store"
    targets = " ".join(("'self'", *form_targets))
    script = "script-src 'self'; connect-src 'self'; " if scripts else ""
    resp.headers["Content-Security-Policy"] = (
        f"default-src 'none'; {script}style-src 'unsafe-inline'; img-src data:; "
        f"form-action {targets}; frame-ancestors 'none'"
    )
    resp.headers["X-Frame-Options"] = "DENY"
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" on the
    # portal's own form posts (Fetch §3.1), which made sign-out fail in Chromium; other
    # origins still get no Referer at all.
    resp.headers["Referrer-Policy"] = "same-origin"
    for cookie in cookies:
        resp.headers.add("Set-Cookie", cookie)
    return resp


def _record(
    gw: Gateway, ctx: RequestContext, verdict: Verdict, reason: Reason, detail: str
) -> None:
    with contextlib.suppress(AuditUnavailable):
        gw.record_outcome(ctx, "portal", verdict, reason, detail)


def _rd(ctx: RequestContext) -> str:
    return local_redirect(parse_qs(ctx.query).get("rd", ["/"])[0])


def _fmt(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else None


def login_redirect(ctx: RequestContext) -> str:
    return login_redirect_to((ctx.path or "/") + ("?" + ctx.query if ctx.query else ""))


def login_redirect_to(target: str) -> str:
    """The sign-in page, coming back to `target` (a path on this origin) afterwards."""
    return "/.ztgw/login?rd=" + quote(target, safe="/")


def _offered(gw: Gateway, ctx: RequestContext, rd: str) -> list[OIDCClient]:
    """The providers the route at `rd` accepts (all, when no route matches: the route itself
    enforces its choice when the browser comes back, so this only spares a useless choice)."""
    try:
        path = normalize_path(urlsplit(rd).path)
    except PathError:
        path = None
    route = gw.runtime.routes.match(ctx.host, path) if path is not None else None
    offered = gw.providers.offered(route.policy.providers if route is not None else ())
    return offered or gw.providers.offered(())


def _start_url(provider: str, rd: str) -> str:
    return "/.ztgw/login/start?" + urlencode({"provider": provider, "rd": rd}, safe="/")


async def login_page(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET /.ztgw/login: the providers the route accepts; with one, straight to it.

    The chooser lists each provider as a link that starts its sign-in (a GET, as the provider's
    own authorization request is): the person's click is the choice."""
    if not gw.providers or ctx.cert is None:
        reason = Reason.CLIENT_CERT_REQUIRED if ctx.cert is None else Reason.ROUTE_NOT_FOUND
        return problem(reason, ctx.decision_id, accept=request.headers.get("Accept", ""))
    rd = _rd(ctx)
    offered = _offered(gw, ctx, rd)
    if len(offered) == 1:
        gw.metrics.portal_views.labels("login", "straight").inc()
        return see_other(_start_url(offered[0].cfg.name, rd), ctx.decision_id)
    gw.metrics.portal_views.labels("login", "shown").inc()
    e = html.escape
    choices = "".join(
        f'<li><a class="button" href="{e(_start_url(c.cfg.name, rd))}">'
        f"Sign in with {e(c.cfg.label)}</a></li>"
        for c in offered
    )
    body = f"""<p>This application is protected by your organisation's zero-trust gateway. Your device
<code>{e(ctx.cert.device_id)}</code> is recognised; now sign in with your account.</p>
<p>Choose where your account is:</p>
<ul class="providers" aria-label="Identity providers">{choices}</ul>
<p class="muted">You will come back to <code>{e(rd)}</code> afterwards.</p>"""
    return page("Sign in", body, ctx)


async def login_start(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET /.ztgw/login/start?provider=NAME&rd=PATH: begin the sign-in with that provider."""
    if not gw.providers or ctx.cert is None:
        return problem(
            Reason.CLIENT_CERT_REQUIRED if ctx.cert is None else Reason.ROUTE_NOT_FOUND,
            ctx.decision_id,
        )
    accept = request.headers.get("Accept", "")
    rd = _rd(ctx)
    names = parse_qs(ctx.query).get("provider")
    if names is None and len(gw.providers) == 1:
        names = [gw.providers.offered(())[0].cfg.name]  # links of the single-provider form
    client = gw.providers.get(names[0]) if names is not None and len(names) == 1 else None
    if client is None:
        _record(gw, ctx, Verdict.DENY, Reason.REQUEST_INVALID, "login start: unknown provider")
        return problem(Reason.REQUEST_INVALID, ctx.decision_id, accept=accept)
    if client not in _offered(gw, ctx, rd):
        # Signing in there would only end in a refusal at the route: say so now.
        _record(
            gw,
            ctx,
            Verdict.DENY,
            Reason.PROVIDER_NOT_ALLOWED,
            f"login start: {client.cfg.name} not accepted for {rd}",
        )
        return problem(Reason.PROVIDER_NOT_ALLOWED, ctx.decision_id, accept=accept)
    name = client.cfg.name
    try:
        # The device is the source: one device looping on "sign in" only ever evicts its
        # own attempts in flight (issue 18, I5).
        start = await client.begin(rd, source=ctx.cert.device_id)
    except ValueError:
        # local_redirect() only gives what begin() accepts; should they ever disagree, this
        # is the client's odd input, refused clearly (never a 503).
        _record(gw, ctx, Verdict.DENY, Reason.REQUEST_INVALID, "login start: rd")
        return problem(Reason.REQUEST_INVALID, ctx.decision_id, accept=accept)
    except StoreUnavailable:
        _record(gw, ctx, Verdict.DENY, Reason.SERVICE_UNAVAILABLE, "login start: store unavailable")
        return problem(Reason.SERVICE_UNAVAILABLE, ctx.decision_id, accept="text/html")
    except OIDCError as exc:
        gw.metrics.logins.labels(name, exc.reason.value).inc()
        _record(
            gw,
            ctx,
            Verdict.DENY,
            Reason.SERVICE_UNAVAILABLE,
            f"login start: {name}: {exc.reason.value}",
        )
        return page(
            "Sign-in is unavailable",
            f"<p>{html.escape(client.cfg.label)} cannot be reached right now. Try again in a "
            "minute.</p>",
            ctx,
            status=503,
        )
    gw.metrics.logins.labels(name, "started").inc()
    cookie = (
        f"{LOGIN_COOKIE}={start.cookie_value}; Path=/; Secure; HttpOnly; SameSite=Lax; "
        f"Max-Age={int(client.cfg.max_auth_age)}"
    )
    return see_other(start.authorization_url, ctx.decision_id, cookie)


async def callback(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET <redirect URI path>: finish the code flow of the provider this path belongs to,
    start the session (under the provider's name space), go back to `rd`."""
    oidc = gw.providers.by_callback(ctx.path or "")
    clear_login = f"{LOGIN_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
    if oidc is None or ctx.cert is None:
        return problem(
            Reason.CLIENT_CERT_REQUIRED if ctx.cert is None else Reason.ROUTE_NOT_FOUND,
            ctx.decision_id,
        )
    provider = oidc.cfg
    try:
        q = parse_qs(ctx.query, max_num_fields=20)
    except ValueError:  # more fields than any provider sends: refused, not a 503
        q = {}

    def one(name: str) -> str | None:
        values = q.get(name)
        return values[0] if values and len(values) == 1 else None

    try:
        result = await oidc.finish(
            state=one("state"),
            code=one("code"),
            error=one("error"),
            cookie_value=read_cookie(ctx.headers.get("Cookie", ""), LOGIN_COOKIE),
            source=ctx.cert.device_id,
            iss=one("iss"),
        )
    except StoreUnavailable:
        _record(gw, ctx, Verdict.DENY, Reason.SERVICE_UNAVAILABLE, "callback: store unavailable")
        return problem(Reason.SERVICE_UNAVAILABLE, ctx.decision_id, accept="text/html")
    except OIDCError as exc:
        gw.metrics.logins.labels(provider.name, exc.reason.value).inc()
        gw.metrics.portal_views.labels("callback", "refused").inc()
        _record(
            gw,
            ctx,
            Verdict.DENY,
            Reason.IDENTITY_UNAUTHENTICATED,
            f"oidc {provider.name}: {exc.reason.value}: {exc.detail}",
        )
        body = f"""<p>The sign-in could not be completed ({html.escape(exc.reason.value)}). This happens when a
sign-in link is reused, expires, or was started in another browser.</p>
<p><a class="button" href="/.ztgw/login">Sign in again</a></p>"""
        return page("Sign-in failed", body, ctx, status=401, cookies=(clear_login,))
    old_cookie = read_cookie(ctx.headers.get("Cookie", ""), gw.config.sessions.cookie_name)
    if old_cookie:
        # A sign-in starts afresh: the browser's old session (if any) ends, nothing of it
        # carries over (a new id: no fixation), whichever provider signed it in.
        await gw.store.revoke_session(cookie_session_id(old_cookie), "replaced by sign-in", ctx.now)
    # SECURITY: one name, one person: a namespaced provider's "alice" (and its "admins") are
    # "<namespace>:alice" ("<namespace>:admins"), never the directory's or another provider's.
    user = provider.qualify(result.user)
    groups = [provider.qualify(g) for g in result.groups]
    session_cookie = await gw.keeper.start_browser_session(
        ctx,
        user=user,
        extra={
            "source": "oidc",
            "provider": provider.name,
            "email": result.email,
            "groups": groups,
            # For logout's id_token_hint: the store keeps it apart, not in memory.
            ID_TOKEN: result.id_token,
        },
    )
    ctx.identity = Identity(
        user=user,
        source="session",
        email=result.email,
        groups=frozenset(groups),
        device_id=ctx.cert.device_id,
        provider=provider.name,
    )
    gw.metrics.logins.labels(provider.name, "success").inc()
    _record(gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, f"signed in with {provider.name}")
    return see_other(result.return_to, ctx.decision_id, clear_login, session_cookie)


def _provider_origins(gw: Gateway) -> tuple[str, ...]:
    """Where sign-out may continue: each provider's end-session endpoint (its issuer's origin
    until discovery has told us the endpoint)."""
    origins: list[str] = []
    for client in gw.providers:
        metadata = client.metadata
        url = (
            metadata.end_session_endpoint
            if metadata is not None and metadata.end_session_endpoint
            else client.cfg.issuer
        )
        origin = public_origin(url)
        if origin and origin not in origins:
            origins.append(origin)
    return tuple(origins)


async def logout(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET shows a confirmation form (CSRF token); POST ends the session and the provider's."""
    name = gw.config.sessions.cookie_name
    cookie = read_cookie(ctx.headers.get("Cookie", ""), name)
    if request.method == "GET":
        token = gw.csrf.issue("logout", csrf_binding(ctx, cookie), ctx.now)
        body = f"""<form method="post" action="/.ztgw/logout">
<input type="hidden" name="csrf" value="{html.escape(token)}">
<p>Sign out of every application behind this gateway on this device?</p>
<button type="submit">Sign out</button></form>"""
        return page("Sign out", body, ctx, form_targets=_provider_origins(gw))
    form = await read_checked_form(gw, request, ctx, "logout", cookie)
    if isinstance(form, web.StreamResponse):
        return form
    id_token = None
    client = None
    if cookie:
        session = await gw.store.find_session(cookie_session_id(cookie))
        if session is not None:
            # The provider that signed this session in is the one to sign out of.
            signed_by = session.extra.get("provider")
            client = gw.providers.get(signed_by if isinstance(signed_by, str) else None)
            # Read from the store (not held in memory); without it the provider may only ask
            # the person to confirm, so a failed read does not stop the sign-out.
            with contextlib.suppress(StoreUnavailable):
                id_token = await gw.store.session_id_token(session.session_id)
            await gw.store.revoke_session(session.session_id, "signed out", ctx.now)
    if client is None and len(gw.providers) == 1:
        client = gw.providers.first  # the one provider: its sign-out page, without a hint
    _record(gw, ctx, Verdict.ALLOW, Reason.POLICY_ALLOWED, "signed out")
    target = gw.config.oidc.post_logout_path
    if client is not None:
        public = gw.config.server.public_url.rstrip("/") or f"https://{request.host}"
        provider_logout = client.logout_url(id_token, public + target)
        if provider_logout:
            target = provider_logout
    return see_other(target, ctx.decision_id, clear_cookie_header(name))


async def signed_out(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    gw.metrics.portal_views.labels("signed-out", "shown").inc()
    body = """<p>You are signed out. Close this window, or
<a href="/.ztgw/login">sign in again</a>.</p>"""
    return page("Signed out", body, ctx)


def _provider_label(gw: Gateway, name: str) -> str:
    client = gw.providers.get(name)
    return client.cfg.label if client is not None else name


async def whoami(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """Identity, device, posture, risk contributions and session times, as the gateway sees them."""
    probe = RequestContext.synthetic(
        method="GET",
        path="/",
        host=ctx.host,
        headers=dict(ctx.headers),
        client_ip=ctx.client_ip,
        cert=ctx.cert,
        now=ctx.now,
    )
    decision = (await gw.decisions.decide(probe, gw.dry_runtime(), dry=True)).decision
    ident = probe.identity
    view = probe.session
    session = view.session if view else None
    data: dict[str, Any] = {
        "identity": ident.to_json() if ident else None,
        "device": probe.device.to_json() if probe.device else None,
        "risk": {
            "score": round(probe.risk_score, 4),
            "contributions": [
                f.to_json() for f in decision.findings if f.stage == "risk" and f.verdict is None
            ],
        },
        "session": session.to_json() if session else None,
        "decision_for_/": decision.verdict.label,
    }
    if not wants_html(request.headers.get("Accept", "")):
        resp = web.json_response(
            data, headers={DECISION_HEADER: ctx.decision_id, "Cache-Control": "no-store"}
        )
        resp.headers["Server"] = SERVER_BANNER
        return resp
    gw.metrics.portal_views.labels("whoami", "shown").inc()
    e = html.escape

    def row(k: str, v: object) -> str:
        return f"<tr><th scope=row>{e(k)}</th><td>{e(str(v) if v not in (None, '') else '—')}</td></tr>"

    ident_rows = ""
    if ident is not None:
        ident_rows = (
            row("User", ident.user)
            + row("Signed in by", ident.source)
            + (
                row("Identity provider", _provider_label(gw, ident.provider))
                if ident.provider
                else ""
            )
            + row("E-mail", ident.email)
            + row("Groups", ", ".join(sorted(ident.groups)))
        )
    device = probe.device
    dev_rows = ""
    if device is not None:
        posture = device.posture
        dev_rows = row("Device", device.device.device_id if device.device else "—") + row(
            "Trust level", device.trust
        )
        if posture is not None:
            dev_rows += row(
                "Posture",
                "compliant" if posture.compliant else "fails: " + ", ".join(posture.failed),
            )
    risk_rows = "".join(
        row(c["reason"], f"{c.get('risk', 0):.2f} — {c.get('detail', '')}")
        for c in data["risk"]["contributions"]
    )
    sess_rows = ""
    if session is not None:
        sess_rows = (
            row("Started", _fmt(session.created))
            + row("Last seen", _fmt(session.last_seen))
            + row("Expires", _fmt(session.expires_at))
            + row("Second factor", _fmt(session.mfa_at))
            + row("Anomaly score", f"{session.anomaly:.2f}")
        )
    body = f"""<h2>You</h2><table>{ident_rows or row("User", None)}</table>
<h2>This device</h2><table>{dev_rows or row("Device", None)}</table>
<p><a href="/.ztgw/device">Device details and what to fix</a></p>
<h2>Risk now</h2><p>Score <strong>{probe.risk_score:.2f}</strong></p><table>{risk_rows or row("Signals", "none")}</table>
<h2>Session</h2><table>{sess_rows or row("Session", None)}</table>
<p><a href="/.ztgw/logout">Sign out</a></p>"""
    return page("Who you are to the gateway", body, ctx)
