"""Pages for people: sign-in, the OIDC callback, sign-out, whoami.

No external assets (a gateway's pages must work when nothing else does), every value escaped,
readable on a phone, a strict Content-Security-Policy. Forms carry a CSRF token; redirect
targets stay on this origin.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from aiohttp import web

from .. import DECISION_HEADER
from ..audit import AuditUnavailable
from ..context import Identity, RequestContext
from ..credentials.oidc import OIDCClient, OIDCError
from ..decision import Reason, Verdict
from ..edge.http1 import Request
from ..request.fetchmeta import wants_html
from ..request.paths import PathError, normalize_path
from ..responses import problem, see_other
from ..sessions import clear_cookie_header, cookie_session_id, read_cookie
from ..store.base import ID_TOKEN, StoreUnavailable
from .forms import issue_csrf, public_origin, read_checked_form, return_target
from .posture_text import check_text
from .render import template_page
from .session_end import ended_text
from .when import moment, zone

if TYPE_CHECKING:
    from ..services import Services

LOGIN_COOKIE = "__Host-ztgw-oidc"


def _record(
    gw: Services, ctx: RequestContext, verdict: Verdict, reason: Reason, detail: str
) -> None:
    with contextlib.suppress(AuditUnavailable):
        gw.record_outcome(ctx, "portal", verdict, reason, detail)


def _offered(gw: Services, ctx: RequestContext, rd: str) -> list[OIDCClient]:
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


async def login_page(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET /.ztgw/login: the providers the route accepts; with one, straight to it.

    The chooser lists each provider as a link that starts its sign-in (a GET, as the provider's
    own authorization request is): the person's click is the choice."""
    if not gw.providers or ctx.cert is None:
        reason = Reason.CLIENT_CERT_REQUIRED if ctx.cert is None else Reason.ROUTE_NOT_FOUND
        return problem(
            reason, ctx.decision_id, accept=request.headers.get("Accept", ""), look=ctx.look
        )
    rd = return_target(ctx)
    offered = _offered(gw, ctx, rd)
    # After a session ended the person is told why before anything else happens, even where
    # the route offers one provider (otherwise the browser goes straight to it).
    ended = ended_text(parse_qs(ctx.query).get("ended", [""])[0])
    if len(offered) == 1 and ended is None:
        gw.metrics.portal_views.labels("login", "straight").inc()
        return see_other(_start_url(offered[0].cfg.name, rd), ctx.decision_id)
    gw.metrics.portal_views.labels("login", "shown").inc()
    return template_page(
        "sign_in.html",
        ctx,
        title="Sign in",
        ended=ended,
        device=ctx.cert.device_id,
        # "Recognised" only for a device the registry has seen (the review's F10).
        known_device=gw.store.device(ctx.cert.device_id) is not None,
        providers=[(c.cfg.label, _start_url(c.cfg.name, rd)) for c in offered],
        rd=rd,
    )


async def login_start(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET /.ztgw/login/start?provider=NAME&rd=PATH: begin the sign-in with that provider."""
    if not gw.providers or ctx.cert is None:
        return problem(
            Reason.CLIENT_CERT_REQUIRED if ctx.cert is None else Reason.ROUTE_NOT_FOUND,
            ctx.decision_id,
            look=ctx.look,
        )
    accept = request.headers.get("Accept", "")
    rd = return_target(ctx)
    names = parse_qs(ctx.query).get("provider")
    if names is None and len(gw.providers) == 1:
        names = [gw.providers.offered(())[0].cfg.name]  # links of the single-provider form
    client = gw.providers.get(names[0]) if names is not None and len(names) == 1 else None
    if client is None:
        _record(gw, ctx, Verdict.DENY, Reason.REQUEST_INVALID, "login start: unknown provider")
        return problem(Reason.REQUEST_INVALID, ctx.decision_id, accept=accept, look=ctx.look)
    if client not in _offered(gw, ctx, rd):
        # Signing in there would only end in a refusal at the route: say so now.
        _record(
            gw,
            ctx,
            Verdict.DENY,
            Reason.PROVIDER_NOT_ALLOWED,
            f"login start: {client.cfg.name} not accepted for {rd}",
        )
        return problem(Reason.PROVIDER_NOT_ALLOWED, ctx.decision_id, accept=accept, look=ctx.look)
    name = client.cfg.name
    try:
        # The device is the source: one device looping on "sign in" only ever evicts its
        # own attempts in flight (issue 18, I5).
        start = await client.begin(rd, source=ctx.cert.device_id)
    except ValueError:
        # local_redirect() only gives what begin() accepts; should they ever disagree, this
        # is the client's odd input, refused clearly (never a 503).
        _record(gw, ctx, Verdict.DENY, Reason.REQUEST_INVALID, "login start: rd")
        return problem(Reason.REQUEST_INVALID, ctx.decision_id, accept=accept, look=ctx.look)
    except StoreUnavailable:
        _record(gw, ctx, Verdict.DENY, Reason.SERVICE_UNAVAILABLE, "login start: store unavailable")
        return problem(
            Reason.SERVICE_UNAVAILABLE, ctx.decision_id, accept="text/html", look=ctx.look
        )
    except OIDCError as exc:
        gw.metrics.logins.labels(name, exc.reason.value).inc()
        _record(
            gw,
            ctx,
            Verdict.DENY,
            Reason.SERVICE_UNAVAILABLE,
            f"login start: {name}: {exc.reason.value}",
        )
        return template_page(
            "sign_in_unavailable.html",
            ctx,
            title="Sign-in is unavailable",
            status=503,
            provider=client.cfg.label,
            rd_query=quote(return_target(ctx), safe="/"),
        )
    gw.metrics.logins.labels(name, "started").inc()
    cookie = (
        f"{LOGIN_COOKIE}={start.cookie_value}; Path=/; Secure; HttpOnly; SameSite=Lax; "
        f"Max-Age={int(client.cfg.max_auth_age)}"
    )
    return see_other(start.authorization_url, ctx.decision_id, cookie)


async def callback(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET <redirect URI path>: finish the code flow of the provider this path belongs to,
    start the session (under the provider's name space), go back to `rd`."""
    oidc = gw.providers.by_callback(ctx.path or "")
    clear_login = f"{LOGIN_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
    if oidc is None or ctx.cert is None:
        return problem(
            Reason.CLIENT_CERT_REQUIRED if ctx.cert is None else Reason.ROUTE_NOT_FOUND,
            ctx.decision_id,
            look=ctx.look,
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
        return problem(
            Reason.SERVICE_UNAVAILABLE, ctx.decision_id, accept="text/html", look=ctx.look
        )
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
        return template_page(
            "sign_in_failed.html",
            ctx,
            title="Sign-in failed",
            status=401,
            cookies=(clear_login,),
            reason=exc.reason.value,
        )
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
            # The provider's names for the person and for its own session: what its
            # back-channel logout tokens and shared signals name (signals/).
            **_provider_ids(result.subject, result.claims.get("sid")),
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


def _provider_ids(sub: str, sid: object) -> dict[str, str]:
    ids = {"sub": sub}
    if isinstance(sid, str) and sid:
        ids["sid"] = sid
    return ids


def _provider_origins(gw: Services) -> tuple[str, ...]:
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


async def logout(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET shows a confirmation form (CSRF token); POST ends the session and the provider's."""
    name = gw.config.sessions.cookie_name
    cookie = read_cookie(ctx.headers.get("Cookie", ""), name)
    if request.method == "GET":
        token = issue_csrf(gw, ctx, "logout", cookie)
        return template_page(
            "sign_out.html",
            ctx,
            title="Sign out",
            form_targets=_provider_origins(gw),
            csrf=token,
        )
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


async def home(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """GET /.ztgw/: the gateway's own namespace, not an application: the person's page."""
    return see_other("/.ztgw/whoami", ctx.decision_id)


async def signed_out(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
    gw.metrics.portal_views.labels("signed-out", "shown").inc()
    return template_page("signed_out.html", ctx, title="Signed out")


def _provider_label(gw: Services, name: str) -> str:
    client = gw.providers.get(name)
    return client.cfg.label if client is not None else name


async def whoami(gw: Services, request: Request, ctx: RequestContext) -> web.StreamResponse:
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
    decision = (await gw.decisions.decide(probe, *gw.dry_snapshot(), dry=True)).decision
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
        return web.json_response(
            data, headers={DECISION_HEADER: ctx.decision_id, "Cache-Control": "no-store"}
        )
    gw.metrics.portal_views.labels("whoami", "shown").inc()
    account = gw.store.user(ident.user) if ident is not None and ident.user else None
    tz = zone(account.timezone if account else None, gw.config.risk.default_timezone)
    now = ctx.now

    def at(t: float | None) -> str | None:
        return moment(t, now, tz)

    you: list[tuple[str, object]] = [("User", None)]
    if ident is not None:
        you = [
            ("User", ident.user),
            ("Identified by", _SOURCES.get(ident.source, ident.source)),
            ("Identity provider", _provider_label(gw, ident.provider) if ident.provider else None),
            ("E-mail", ident.email),
            ("Groups", ", ".join(sorted(ident.groups))),
        ]
    device_rows: list[tuple[str, object]] = [("Device", ctx.cert.device_id if ctx.cert else None)]
    device = probe.device
    if device is not None:
        device_rows = [
            ("Device", device.device.device_id if device.device else None),
            ("Trust level", device.trust),
        ]
        posture = device.posture
        if posture is not None:
            failed = [check_text(c) for c in posture.checks if not c.passed]
            said = "; ".join(f"{v.title.lower()}: {v.result}" for v in failed)
            device_rows.append(
                ("Posture", "meets the requirements" if posture.compliant else f"fails ({said})")
            )
    risk = [
        (c["reason"], f"{c.get('risk', 0):.2f} — {c.get('detail', '')}")
        for c in data["risk"]["contributions"]
    ]
    session_rows: list[tuple[str, object]] = [("Session", None)]
    if session is not None:
        session_rows = [
            ("Started", at(session.created)),
            ("Last seen", at(session.last_seen)),
            ("Ends at the latest", at(session.expires_at)),
            ("Second factor given", at(session.mfa_at) or "not yet in this session"),
            ("Anomaly score", f"{session.anomaly:.2f} (0 to 1)"),
        ]
    return template_page(
        "whoami.html",
        ctx,
        title="Who you are to the gateway",
        you=you,
        device=device_rows,
        risk=risk,
        risk_score=f"{probe.risk_score:.2f}",
        session=session_rows,
        times_in=tz.key,
    )


_SOURCES = {
    "session": "your sign-in with the identity provider",
    "token": "a bearer token",
    "cert": "the device certificate only",
    "mfa": "a second factor",
}
