"""The one place that turns a refusal into HTTP (Pomerium's handleResult).

JSON clients get `application/problem+json` (RFC 9457) with the reason code and decision id;
browsers (Accept: text/html) get a small page with the same facts. 401s carry a
`WWW-Authenticate` challenge (RFC 6750 §3, RFC 9470 for step-up). The internal detail of a
finding is sent only where the route enables it; request bytes are never echoed.
"""

from __future__ import annotations

import html
import json
from typing import Any

from aiohttp import web

from .decision import Reason, Verdict

PROBLEM_BASE = "https://ztgateway.dev/problems/"
DECISION_HEADER = "X-ZT-Decision-Id"
_REALM = 'realm="ztgateway"'
_TOKEN_REASONS = frozenset(r for r in Reason if r.value.startswith("token-"))

_ADVICE: dict[Reason, str] = {
    Reason.CLIENT_CERT_REQUIRED: "Connect with your device's client certificate installed.",
    Reason.CLIENT_CERT_REVOKED: "This device's certificate was revoked. Ask IT for a new one.",
    Reason.CLIENT_CERT_INVALID: "Your device certificate is expired or not valid for sign-in. Ask IT to renew it.",
    Reason.ROUTE_NOT_FOUND: "Check the address you followed.",
    Reason.IDENTITY_UNAUTHENTICATED: "Sign in and try again.",
    Reason.TOKEN_REQUIRED: "Send a bearer token from a trusted issuer.",
    Reason.GROUP_REQUIRED: "Ask the application owner for access.",
    Reason.UPSTREAM_UNAVAILABLE: "Try again in a moment; if it persists, tell the application owner.",
    Reason.UPSTREAM_TIMEOUT: "Try again in a moment; if it persists, tell the application owner.",
    Reason.ORIGIN_DENIED: "A page of another site sent your browser here with your device's "
    "certificate. If you meant to open this page, continue from here.",
}


# What the gateway's own answers (refusals, redirects, portal pages, JWKS, protocol errors) carry
# unless a page set its own: no MIME sniffing of a problem+json body into HTML, no framing
# (clickjacking of portal forms), no referrer leaking decision ids or return paths to another
# site, no other site embedding them (CORP), nothing but inline styles in our pages.
# "same-origin", not "no-referrer": under no-referrer a browser sends `Origin: null` with the
# page's own form posts, which the forms' same-origin check must then refuse.
_OWN_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    ),
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)


def hsts_value(max_age: int, include_subdomains: bool) -> str | None:
    """RFC 6797 Strict-Transport-Security for our TLS listener (None: switched off)."""
    if max_age <= 0:
        return None
    return f"max-age={max_age}" + ("; includeSubDomains" if include_subdomains else "")


def add_security_headers(resp: web.StreamResponse, hsts: str | None) -> None:
    """Add the headers above (and HSTS, on the TLS listener) where the response has none."""
    headers = resp.headers
    for name, value in _OWN_HEADERS:
        if name not in headers:
            headers[name] = value
    if hsts and "Strict-Transport-Security" not in headers:
        headers["Strict-Transport-Security"] = hsts


def www_authenticate(reason: Reason, verdict: Verdict) -> str | None:
    if verdict is Verdict.STEP_UP or reason in (Reason.MFA_REQUIRED, Reason.RISK_STEP_UP):
        return f'Bearer {_REALM}, error="insufficient_user_authentication", error_description="{reason.value}"'
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


def wants_html(accept: str) -> bool:
    """A browser navigation, not an API client: text/html listed before any JSON type."""
    if not accept or "text/html" not in accept:
        return False
    a = accept.lower()
    json_at = min((i for i in (a.find("application/json"), a.find("+json")) if i >= 0), default=-1)
    return json_at < 0 or a.find("text/html") < json_at


def problem(
    reason: Reason,
    decision_id: str,
    *,
    verdict: Verdict = Verdict.DENY,
    accept: str = "",
    detail: str | None = None,
    status: int | None = None,
    extra_headers: dict[str, str] | None = None,
    continue_to: str | None = None,
) -> web.Response:
    code = status or reason.status
    headers = {DECISION_HEADER: decision_id, "Cache-Control": "no-store"}
    challenge = www_authenticate(reason, verdict)
    if challenge:
        headers["WWW-Authenticate"] = challenge
    if extra_headers:
        headers.update(extra_headers)
    if wants_html(accept):
        return web.Response(
            status=code,
            text=_page(reason, decision_id, code, detail, continue_to),
            content_type="text/html",
            headers=headers,
        )
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + reason.value,
        "title": reason.summary,
        "status": code,
        "reason": reason.value,
        "decision_id": decision_id,
    }
    if detail:
        body["detail"] = detail
    return web.Response(
        status=code,
        body=json.dumps(body).encode(),
        content_type="application/problem+json",
        headers=headers,
    )


def _page(
    reason: Reason, decision_id: str, status: int, detail: str | None, continue_to: str | None
) -> str:
    e = html.escape
    advice = _ADVICE.get(
        reason, "If you think this is wrong, contact your IT support and quote the decision id."
    )
    detail_html = f"<p class=detail>{e(detail)}</p>" if detail else ""
    if continue_to:
        # A link on this origin: following it is the person's own same-origin navigation.
        detail_html += (
            f'<p><a href="{e(continue_to)}">Continue to <code>{e(continue_to)}</code></a></p>'
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{status} – {e(reason.summary)}</title>
<style>
body{{font:16px/1.5 system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;color:#1b1b1b}}
h1{{font-size:1.4rem}} code{{background:#f1f1f1;padding:.1rem .3rem;border-radius:3px}}
.detail{{color:#555}} footer{{margin-top:2rem;color:#666;font-size:.85rem}}
</style></head>
<body><main>
<h1>{e(reason.summary)}</h1>
<p>{e(advice)}</p>
{detail_html}
<p>Reason: <code>{e(reason.value)}</code><br>Decision id: <code>{e(decision_id)}</code></p>
</main><footer>ztgateway · HTTP {status}</footer></body></html>
"""


def see_other(location: str, decision_id: str, *cookies: str) -> web.Response:
    """303 to a page of ours: the decision id travels along, nothing is cached."""
    resp = web.Response(
        status=303,
        headers={
            "Location": location,
            DECISION_HEADER: decision_id,
            "Server": "ztgateway",
            "Cache-Control": "no-store",
        },
    )
    for cookie in cookies:
        resp.headers.add("Set-Cookie", cookie)
    return resp
