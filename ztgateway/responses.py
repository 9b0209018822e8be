"""How a refusal becomes HTTP (Pomerium's handleResult).

`render()` maps a pipeline decision on the data plane to a redirect (sign-in, the device page,
the step-up page) or a problem; `problem_parts()` / `problem()` write the problem for any reason,
wherever it was decided (the parser, forward-auth, the gateway's own pages). Two answers keep
their own body on purpose: the Shared Signals receiver's (RFC 8935 §2.3 fixes its members; it
adds the same `type`, `reason` and `decision_id`) and the ops listener's (the admin API's
challenge names its own realm; errors that are no decision, a malformed /decide body or the
audit log down, are RFC 9457 `about:blank`).

JSON clients get `application/problem+json` (RFC 9457) with the reason code and decision id;
browsers (Accept: text/html) get a small page with the same facts. 401s carry a
`WWW-Authenticate` challenge (RFC 6750 §3, RFC 9470 for step-up). The internal detail of a
finding is sent only where the route enables it; request bytes are never echoed.
"""

from __future__ import annotations

import functools
import json
import math
from typing import TYPE_CHECKING, Any, TypedDict, Unpack
from urllib.parse import quote

from aiohttp import web
from markupsafe import escape

from . import DECISION_HEADER, SERVER_BANNER
from .decision import Decision, Reason, Verdict
from .portal.advice import advice_for
from .portal.branding import DEFAULT_LOOK, PortalConfig
from .portal.redirect import login_redirect
from .portal.render import page_headers
from .portal.render import render as render_page
from .portal.session_end import ended_code
from .portal.when import until, zone
from .request.fetchmeta import wants_html
from .request.paths import encode_path
from .sessions import clear_cookie_header

if TYPE_CHECKING:
    from .context import RequestContext

PROBLEM_BASE = "https://ztgateway.dev/problems/"
SIGN_IN_AGAIN = frozenset(
    {
        Reason.IDENTITY_UNAUTHENTICATED,
        Reason.SESSION_EXPIRED,
        Reason.SESSION_TERMINATED,
        Reason.SESSION_INVALID,
    }
)
_REALM = 'realm="ztgateway"'
_TOKEN_REASONS = frozenset(r for r in Reason if r.value.startswith("token-"))

# What the gateway's own answers (refusals, redirects, portal pages, JWKS, protocol errors) carry
# unless a page set its own: no MIME sniffing of a problem+json body into HTML, no framing
# (clickjacking of portal forms), no referrer leaking decision ids or return paths to another
# site, no other site embedding them (CORP), nothing loaded by what is not a page (pages set
# their own policy: styles and images from this origin only, portal/render.py).
# "same-origin", not "no-referrer": under no-referrer a browser sends `Origin: null` with the
# page's own form posts, which the forms' same-origin check must then refuse.
_OWN_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    (
        "Content-Security-Policy",
        "default-src 'none'; frame-ancestors 'none'",
    ),
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
_OWN_NAMES = frozenset(n.lower() for n, _ in _OWN_HEADERS)


def hsts_value(max_age: int, include_subdomains: bool) -> str | None:
    """RFC 6797 Strict-Transport-Security for our TLS listener (None: switched off)."""
    if max_age <= 0:
        return None
    return f"max-age={max_age}" + ("; includeSubDomains" if include_subdomains else "")


def add_security_headers(resp: web.StreamResponse, hsts: str | None) -> None:
    """Add the headers above (and HSTS, on the TLS listener) where the response has none, and
    the gateway's banner in place of aiohttp's (which names Python's and aiohttp's versions)."""
    headers = resp.headers
    if "Server" not in headers:
        headers["Server"] = SERVER_BANNER
    for name, value in _OWN_HEADERS:
        if name not in headers:
            headers[name] = value
    if hsts and "Strict-Transport-Security" not in headers:
        headers["Strict-Transport-Security"] = hsts


def with_security_headers(
    headers: list[tuple[str, str]], hsts: str | None
) -> list[tuple[str, str]]:
    """The same for a response the data plane writes as parts."""
    present = {n.lower() for n, _ in headers}
    out = list(headers)
    if "server" not in present:
        out.append(("Server", SERVER_BANNER))
    out.extend((n, v) for n, v in _OWN_HEADERS if n.lower() not in present)
    if hsts and "strict-transport-security" not in present:
        out.append(("Strict-Transport-Security", hsts))
    return out


def www_authenticate(
    reason: Reason,
    verdict: Verdict,
    *,
    step_up_how: str | None = None,
    mfa_max_age: float | None = None,
) -> str | None:
    """The one challenge builder (RFC 6750 §3; RFC 9470 §3 for a step-up, which says how to
    step up when the route is known, and `max_age` when the route bounds the factor's age)."""
    if verdict is Verdict.STEP_UP or reason in (Reason.MFA_REQUIRED, Reason.RISK_STEP_UP):
        why = f"{reason.value}: complete {step_up_how}" if step_up_how else reason.value
        challenge = (
            f'Bearer {_REALM}, error="insufficient_user_authentication", error_description="{why}"'
        )
        if mfa_max_age:
            challenge += f", max_age={int(mfa_max_age)}"
        return challenge
    if reason is Reason.SCOPE_INSUFFICIENT:
        return f'Bearer {_REALM}, error="insufficient_scope", error_description="{reason.value}"'
    if reason.status != 401:
        return None
    if reason in (Reason.TOKEN_REQUIRED, Reason.IDENTITY_UNAUTHENTICATED):
        # RFC 6750 §3.1: no error code when the request carried no credentials.
        return f"Bearer {_REALM}"
    if reason in _TOKEN_REASONS:
        return f'Bearer {_REALM}, error="invalid_token", error_description="{reason.value}"'
    return f"Bearer {_REALM}"


Parts = tuple[int, list[tuple[str, str]], bytes]
"""A response as the data plane writes it: status, header fields, body."""


def problem_parts(
    reason: Reason,
    decision_id: str,
    *,
    verdict: Verdict = Verdict.DENY,
    accept: str = "",
    detail: str | None = None,
    status: int | None = None,
    extra_headers: dict[str, str] | None = None,
    look: PortalConfig = DEFAULT_LOOK,
    lock_ends: str | None = None,
    continue_to: str | None = None,
    continue_label: str | None = None,
    step_up_how: str | None = None,
    mfa_max_age: float | None = None,
) -> Parts:
    """The refusal body and headers: problem+json (RFC 9457), or a page for a browser.

    `look`: the branding of the page; `lock_ends`: when a lock ends, in the person's terms;
    `step_up_how`, `mfa_max_age`: for the step-up challenge (`www_authenticate`)."""
    code = status or reason.status
    headers = {DECISION_HEADER: decision_id, "Cache-Control": "no-store", "Server": SERVER_BANNER}
    challenge = www_authenticate(reason, verdict, step_up_how=step_up_how, mfa_max_age=mfa_max_age)
    if challenge:
        headers["WWW-Authenticate"] = challenge
    if wants_html(accept):
        headers.update(page_headers(decision_id))
        body = refusal_page(
            reason, decision_id, code, detail, look, lock_ends, continue_to, continue_label
        ).encode()
    else:
        doc: dict[str, Any] = {
            "type": PROBLEM_BASE + reason.value,
            "title": reason.summary,
            "status": code,
            "reason": reason.value,
            "decision_id": decision_id,
        }
        if detail:
            doc["detail"] = detail
        headers["Content-Type"] = "application/problem+json"
        body = json.dumps(doc).encode()
    if extra_headers:
        headers.update(extra_headers)
    return code, list(headers.items()), body


class RefusalOptions(TypedDict, total=False):
    """What `problem_parts` takes beside the reason and decision id, so `problem` passes it
    through without listing it again; the defaults are `problem_parts`'s."""

    verdict: Verdict
    accept: str
    detail: str | None
    status: int | None
    extra_headers: dict[str, str] | None
    look: PortalConfig
    lock_ends: str | None
    continue_to: str | None
    continue_label: str | None
    step_up_how: str | None
    mfa_max_age: float | None


def problem(reason: Reason, decision_id: str, **options: Unpack[RefusalOptions]) -> web.Response:
    """The same refusal as an aiohttp response (the ops listener, the gateway's pages)."""
    code, headers, body = problem_parts(reason, decision_id, **options)
    return web.Response(status=code, body=body, headers=headers)


def see_other_parts(location: str, decision_id: str, *cookies: str) -> Parts:
    """303 to a page of ours: the decision id travels along, nothing is cached."""
    headers = [
        ("Location", location),
        (DECISION_HEADER, decision_id),
        ("Server", SERVER_BANNER),
        ("Cache-Control", "no-store"),
    ]
    headers.extend(("Set-Cookie", c) for c in cookies)
    return 303, headers, b""


def render(
    ctx: RequestContext,
    decision: Decision,
    *,
    sign_in: bool,
    step_up_page: bool,
    cookie_name: str,
) -> Parts:
    """THE mapping from a refusal decision to HTTP, for every entry point on the data plane.

    A browser without a (valid) sign-in goes to sign in; a browser on a non-compliant device
    to the remediation page; a step-up to the TOTP page (browsers) or an RFC 9470 challenge;
    everything else is problem+json or the refusal page, with Retry-After where the client may
    retry and a stale session cookie cleared.
    """
    route = ctx.route
    reason, verdict = decision.reason, decision.verdict
    browser = ctx.wants_html
    view = ctx.session
    stale = view is not None and view.cookie_invalid
    if browser and sign_in and (reason in SIGN_IN_AGAIN or verdict is Verdict.TERMINATE):
        # The page says why the session ended (a fixed sentence per code: portal/session_end.py).
        why = next((f.detail for f in decision.findings if f.reason is reason), "")
        ended = ended_code(reason, why)
        ended_session = stale or verdict is Verdict.TERMINATE
        cookies = (clear_cookie_header(cookie_name),) if ended_session else ()
        target = login_redirect(ctx) + (f"&ended={ended}" if ended else "")
        return see_other_parts(target, ctx.decision_id, *cookies)
    if browser and reason in (Reason.DEVICE_NONCOMPLIANT, Reason.POSTURE_STALE):
        # With the way back: the device page offers "check again" and a link to return.
        target = (ctx.path or "/") + ("?" + ctx.query if ctx.query else "")
        return see_other_parts("/.ztgw/device?rd=" + quote(target, safe="/"), ctx.decision_id)
    if verdict is Verdict.STEP_UP and browser and step_up_page:
        target = (ctx.path or "/") + ("?" + ctx.query if ctx.query else "")
        # `why`: a reason code the page words (a fixed sentence each; anything else: none).
        location = f"/.ztgw/mfa?rd={quote(target, safe='/')}&why={reason.value}"
        return see_other_parts(location, ctx.decision_id)
    detail = None
    if route is not None and route.expose_detail:
        detail = next((f.detail for f in decision.findings if f.reason is reason), None)
    extra: dict[str, str] = {}
    if ctx.retry_after:
        extra["Retry-After"] = str(max(1, math.ceil(ctx.retry_after)))
    how = None
    if verdict is Verdict.STEP_UP:
        webauthn_only = route is not None and route.session.step_up_factors == ("webauthn",)
        how = "a security key at /.ztgw/mfa" if webauthn_only else "TOTP at /.ztgw/mfa/verify"
    if stale and (ctx.fetch.navigation or not ctx.browser):
        # Not from a browser's subresource (the favicon, an image, a fetch): that would clear
        # the cookie before the person's next navigation is told why the session ended
        # (`ended=`), sending them to the provider without a word. The session stays refused
        # on every request meanwhile; only the cookie's removal waits for a navigation.
        extra["Set-Cookie"] = clear_cookie_header(cookie_name)
    continue_to = continue_label = None
    if reason is Reason.PROVIDER_NOT_ALLOWED and browser and sign_in:
        # Which provider signed the person in and which this route accepts: names they see
        # on the sign-in page anyway, so the page says them whatever `expose_detail` says.
        detail = next((f.detail for f in decision.findings if f.reason is reason), None)
        continue_to, continue_label = login_redirect(ctx), "Sign in with an accepted provider"
    if (
        reason is Reason.ORIGIN_DENIED
        and ctx.path is not None
        and ctx.method in ("GET", "HEAD")
        and ctx.fetch.navigation
    ):
        # A link from another site: the person confirms with a click on our own page, which
        # the browser then sends as a same-origin navigation (docs/security.md).
        continue_to = encode_path(ctx.path) + ("?" + ctx.query if ctx.query else "")
    return problem_parts(
        reason,
        ctx.decision_id,
        verdict=verdict,
        accept=ctx.headers.get("Accept", ""),
        detail=detail,
        extra_headers=extra,
        look=ctx.look,
        lock_ends=lock_ends_text(ctx) if reason is Reason.ACCOUNT_LOCKED else None,
        continue_to=continue_to,
        continue_label=continue_label,
        step_up_how=how,
        mfa_max_age=ctx.mfa_max_age if how else None,
    )


def lock_ends_text(ctx: RequestContext) -> str | None:
    """When the account lock the session stage found ends, in the person's time zone."""
    locked = ctx.locked
    if locked is None:
        return None
    return until(locked.until, ctx.now, zone(locked.timezone))


def refusal_page(
    reason: Reason,
    decision_id: str,
    status: int,
    detail: str | None,
    look: PortalConfig = DEFAULT_LOOK,
    lock_ends: str | None = None,
    continue_to: str | None = None,
    continue_label: str | None = None,
) -> str:
    """The refusal page: the reason in words, what to do, the reference to quote.

    Without a detail, lock time or link (nearly every refusal) the page differs between
    requests only by its decision id, so it is rendered once per reason, status and branding
    and the id put in (a template rendering costs about five times a problem+json body, and
    a browser's refusals should not be the cheap way to make the gateway work)."""
    if detail is None and lock_ends is None and continue_to is None:
        before, after = _plain_refusal(reason, status, look)
        return before + str(escape(decision_id)) + after
    return _render_refusal(
        reason, decision_id, status, detail, look, lock_ends, continue_to, continue_label
    )


_ID_MARK = "@@decision-id@@"


@functools.lru_cache(maxsize=256)
def _plain_refusal(reason: Reason, status: int, look: PortalConfig) -> tuple[str, str]:
    page = _render_refusal(reason, _ID_MARK, status, None, look, None, None, None)
    before, _, after = page.partition(_ID_MARK)
    assert _ID_MARK not in after
    return before, after


def _render_refusal(
    reason: Reason,
    decision_id: str,
    status: int,
    detail: str | None,
    look: PortalConfig,
    lock_ends: str | None,
    continue_to: str | None,
    continue_label: str | None,
) -> str:
    advice, ask_support = advice_for(reason)
    return render_page(
        "refusal.html",
        look,
        title=reason.summary,
        decision_id=decision_id,
        status=status,
        advice=advice,
        ask_support=ask_support,
        detail=detail if detail and detail != advice else None,
        lock_ends=lock_ends,
        reason=reason.value,
        # A link on this origin: following it is the person's own same-origin navigation.
        continue_url=continue_to,
        continue_label=continue_label,
    )


def see_other(location: str, decision_id: str, *cookies: str) -> web.Response:
    """303 to a page of ours (as an aiohttp response, for the gateway's pages)."""
    status, headers, _ = see_other_parts(location, decision_id, *cookies)
    resp = web.Response(status=status)
    for name, value in headers:
        resp.headers.add(name, value)
    return resp
