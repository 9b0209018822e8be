"""The gateway's own state-changing requests, and why no other site can make a browser send them.

Sign-out, step-up, TOTP enrolment, the MFA API and posture reports change state. Client
certificates are ambient: a browser presents the selected certificate on requests that other
sites start (`<form>`, `fetch(..., {mode: "no-cors"})`, `<img>`), so the certificate never makes
such a request trustworthy on its own, and neither does a SameSite cookie (a same-site sibling
host is not the same origin). Every POST under `/.ztgw/` therefore passes, before any other work:

1. Fetch Metadata (W3C Fetch Metadata Request Headers §2.1): `Sec-Fetch-Site` must be
   `same-origin`, or `none` (the person started it: typed, bookmarked). `same-site` and
   `cross-site` are refused. Clients that are not browsers send no such header.
2. Origin (RFC 6454 §7; Fetch §3.1): when sent, it must be this gateway's origin as the browser
   addressed it (the Host it sent) or the configured `public_url`. `Origin: null` is what
   Chromium sends under a `no-referrer` policy; it is accepted only together with
   `Sec-Fetch-Site: same-origin`, which an opaque (sandboxed) origin never carries.
3. Content type: forms are `application/x-www-form-urlencoded` (what an HTML form posts); the
   JSON APIs take only `application/json` (and posture also `application/jose`). Neither JSON
   type is a CORS-safelisted request type (Fetch §2.2.2), so a cross-origin page cannot send one
   without a preflight, which the gateway never grants.
4. Forms carry a CSRF token: an HMAC over the form's purpose, the device certificate, the
   browser session and the time it was issued, keyed by a key every worker and replica derives
   from the same secret (`keys.py`), valid for an hour.

A refusal is a decision like any other: reason `origin-mismatch`, `media-type-unsupported` or
`csrf-invalid`, audited, counted, rendered as problem+json or a page.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

from aiohttp import web

from ..audit import AuditUnavailable
from ..decision import Reason, Verdict
from ..edge.http1 import Request
from ..request.fetchmeta import own_origin, wants_html
from ..responses import problem
from .redirect import local_redirect

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..services import Services

MAX_FORM_BYTES = 4096
MAX_FORM_FIELDS = 10
CSRF_TTL = 3600.0
CSRF_FUTURE_SKEW = 60.0
"""A token stamped this far ahead of the gateway's clock (another replica's clock) still counts."""

FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"
_SAME_ORIGIN_SITES = frozenset({"same-origin", "none"})
# ASCII digits only: `str.isdigit()` also takes "²" or "٣", which `int()` reads and
# `hmac.compare_digest` then refuses with a TypeError (issue 18, I4).
_CSRF_SHAPE = re.compile(r"([0-9]{1,12})\.([0-9a-f]{32})", re.ASCII)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request to one of the gateway's own endpoints is refused (detail: for the audit)."""

    reason: Reason
    detail: str


def media_type(headers: Mapping[str, str]) -> str:
    """The request's media type, lower-cased, without parameters ("" when none was sent)."""
    return headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def public_origin(public_url: str) -> str | None:
    parts = urlsplit(public_url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def cross_site(ctx: RequestContext, public_url: str = "") -> Refusal | None:
    """A refusal when the request was started by another site, else None.

    Clients that are not browsers send neither Sec-Fetch-Site nor Origin and pass; what they
    may do is then up to their credentials, which a cross-site page cannot choose.
    """
    headers = ctx.headers
    sites = headers.getall("Sec-Fetch-Site", ())
    site = sites[0].strip().lower() if len(sites) == 1 else None
    if len(sites) > 1 or (site is not None and site not in _SAME_ORIGIN_SITES):
        return Refusal(Reason.ORIGIN_MISMATCH, f"Sec-Fetch-Site: {', '.join(sites)[:40]}")
    origins = headers.getall("Origin", ())
    if not origins:
        return None
    if len(origins) > 1:
        return Refusal(Reason.ORIGIN_MISMATCH, "more than one Origin header")
    origin = origins[0].strip().lower()
    if origin == "null":
        # Fetch §3.1: a request whose referrer policy is no-referrer serialises its origin as
        # "null"; the browser still says it is same-origin in Sec-Fetch-Site.
        if site == "same-origin":
            return None
        return Refusal(Reason.ORIGIN_MISMATCH, "Origin: null without Sec-Fetch-Site: same-origin")
    allowed = {o for o in (_host_origin(ctx), public_origin(public_url)) if o}
    if origin in allowed:
        return None
    return Refusal(Reason.ORIGIN_MISMATCH, f"Origin {origin[:80]!r} is not this gateway")


def _host_origin(ctx: RequestContext) -> str | None:
    hosts = ctx.headers.getall("Host", ())
    if len(hosts) != 1 or not hosts[0].strip():
        return None
    return own_origin(hosts[0])


def require_type(ctx: RequestContext, *accepted: str) -> Refusal | None:
    kind = media_type(ctx.headers)
    if kind in accepted:
        return None
    shown = kind[:60] or "none"
    return Refusal(
        Reason.MEDIA_TYPE_UNSUPPORTED, f"Content-Type {shown}; expected {' or '.join(accepted)}"
    )


async def read_body(request: Request, limit: int) -> bytes | None:
    """At most `limit` bytes of the body, or None when it is longer (the one place that reads
    a body for the gateway's own endpoints)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    raw = await request.content.read(limit + 1)
    return None if len(raw) > limit else raw


def parse_form(raw: bytes) -> dict[str, str] | None:
    """The fields of an urlencoded form, each at most once; None for anything else."""
    try:
        text = raw.decode("utf-8")
        pairs = parse_qsl(
            text, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FORM_FIELDS
        )
    except (UnicodeDecodeError, ValueError):
        return None
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            return None  # a field twice: which one would a check have seen?
        fields[name] = value
    return fields


class CSRFTokens:
    """Per-form anti-CSRF tokens: `<issued>.<mac>`, the MAC over purpose, device certificate,
    browser session and issue time. Stateless, so any worker or replica holding the same key
    checks what another issued."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the CSRF key must be at least 32 bytes")
        self._key = key

    def _mac(self, purpose: str, binding: str, issued: int) -> str:
        message = f"ztgw-csrf-v2\x00{purpose}\x00{binding}\x00{issued}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]

    def issue(self, purpose: str, binding: str, now: float) -> str:
        issued = int(now)
        return f"{issued}.{self._mac(purpose, binding, issued)}"

    def valid(self, token: str, purpose: str, binding: str, now: float) -> bool:
        match = _CSRF_SHAPE.fullmatch(token)
        if match is None:
            return False
        issued = int(match.group(1))
        if not (now - CSRF_TTL <= issued <= now + CSRF_FUTURE_SKEW):
            return False
        expected = self._mac(purpose, binding, issued)
        return hmac.compare_digest(expected.encode("ascii"), match.group(2).encode("ascii"))


def csrf_binding(ctx: RequestContext, cookie_value: str | None) -> str:
    """What a form token is bound to: this device's certificate and this browser's session (a
    hash, so the token reveals nothing of the cookie)."""
    device = ctx.cert.fingerprint_sha256 if ctx.cert is not None else "-"
    session = hashlib.sha256(cookie_value.encode()).hexdigest()[:32] if cookie_value else "-"
    return f"{device}:{session}"


def issue_csrf(gw: Services, ctx: RequestContext, purpose: str, cookie_value: str | None) -> str:
    """A token for a form (or a page's script) of `purpose`, bound to this device and browser."""
    return gw.csrf.issue(purpose, csrf_binding(ctx, cookie_value), ctx.now)


def csrf_ok(
    gw: Services, ctx: RequestContext, token: object, purpose: str, cookie_value: str | None
) -> bool:
    """Whether `token` (as posted: anything) is one `issue_csrf` gave for this purpose, device
    and browser, within the hour."""
    return isinstance(token, str) and gw.csrf.valid(
        token, purpose, csrf_binding(ctx, cookie_value), ctx.now
    )


def json_object(raw: bytes) -> dict[str, Any] | None:
    """The JSON object a body holds; None when it is not JSON, not an object, or nested past
    what the parser takes."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def return_target(ctx: RequestContext) -> str:
    """Where a page sends the browser back to afterwards: its `rd` query parameter, held to
    `local_redirect`."""
    return local_redirect(parse_qs(ctx.query).get("rd", ["/"])[0])


# --- the checks as the endpoints run them: refusals audited, counted and rendered ------------


_SAID_TO_PEOPLE = frozenset({Reason.CSRF_INVALID, Reason.ORIGIN_MISMATCH})


def refuse(gw: Services, ctx: RequestContext, refusal: Refusal, *, stage: str) -> web.Response:
    """Audited and counted (the refusal stands even if the audit log cannot take it), then
    problem+json, or a page for a browser."""
    with contextlib.suppress(AuditUnavailable):
        gw.record_outcome(ctx, stage, Verdict.DENY, refusal.reason, refusal.detail)
    accept = ctx.headers.get("Accept", "")
    # A person reads what to do in words (portal/advice.py); a program gets the detail.
    for_people = wants_html(accept) and refusal.reason in _SAID_TO_PEOPLE
    return problem(
        refusal.reason,
        ctx.decision_id,
        accept=accept,
        detail=None if for_people else refusal.detail,
        look=ctx.look,
    )


async def read_checked_form(
    gw: Services,
    request: Request,
    ctx: RequestContext,
    purpose: str,
    cookie_value: str | None,
    *,
    stage: str = "portal",
) -> dict[str, str] | web.Response:
    """A portal form's fields once it passed every check above, or the refusal to send."""
    refusal = cross_site(ctx, gw.config.server.public_url) or require_type(ctx, FORM_TYPE)
    if refusal is None:
        raw = await read_body(request, MAX_FORM_BYTES)
        if raw is None:
            refusal = Refusal(Reason.BODY_TOO_LARGE, f"a form is at most {MAX_FORM_BYTES} bytes")
        else:
            fields = parse_form(raw)
            if fields is None:
                refusal = Refusal(Reason.REQUEST_INVALID, "not a form of this gateway")
            elif not csrf_ok(gw, ctx, fields.get("csrf"), purpose, cookie_value):
                refusal = Refusal(Reason.CSRF_INVALID, f"{purpose}: missing or invalid token")
            else:
                return fields
    return refuse(gw, ctx, refusal, stage=stage)


async def read_checked_body(
    gw: Services,
    request: Request,
    ctx: RequestContext,
    *types: str,
    limit: int,
    stage: str,
) -> bytes | web.Response:
    """The body of a JSON (or JOSE) API request from a client that is not another site."""
    refusal = cross_site(ctx, gw.config.server.public_url) or require_type(ctx, *types)
    if refusal is None:
        raw = await read_body(request, limit)
        if raw is not None:
            return raw
        refusal = Refusal(Reason.BODY_TOO_LARGE, f"at most {limit} bytes")
    return refuse(gw, ctx, refusal, stage=stage)
