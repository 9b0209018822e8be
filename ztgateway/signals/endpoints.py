"""The receiving endpoints on the mTLS port: SET push (RFC 8935) and back-channel logout.

- `POST /.ztgw/ssf/events`, `Content-Type: application/secevent+jwt`, the SET as the body:
  202 Accepted, or 400 with `{"err": <RFC 8935 §2.4 code>, "description": ...}` (and the
  RFC 9457 members `reason` and `decision_id` beside them, so support finds the audit event);
  401 `authentication_failed` when the transmitter's `push_token` is configured and missing or
  wrong; 503 when the transmitter's keys, the store or the audit log are unavailable, so the
  transmitter retries (RFC 8935 §2.3: it may retry on a 5xx, never on a 400).
- `POST /.ztgw/oidc/backchannel-logout`, a form with `logout_token` (Back-Channel Logout §2.5):
  200, or 400 `{"error": "invalid_request", ...}` (§2.8), both `Cache-Control: no-store`.

Both are machine-to-machine: a request a browser says another site started is refused
(forms.cross_site), since the client certificate is ambient and the form type is CORS-safelisted.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from .. import SERVER_BANNER
from ..audit import AuditUnavailable
from ..context import RequestContext
from ..decision import Reason
from ..edge.http1 import Request
from ..forms import Refusal, cross_site, parse_form, read_body, require_type
from ..responses import DECISION_HEADER, PROBLEM_BASE
from ..store.base import StoreUnavailable
from .metrics import UNKNOWN
from .receiver import REPLAYED, Receipt
from .tokens import (
    AUTHENTICATION_FAILED,
    INVALID_REQUEST,
    KEYS_UNAVAILABLE,
    MAX_TOKEN_BYTES,
    SignalTokenError,
)

if TYPE_CHECKING:
    from ..app import Gateway

SET_MEDIA_TYPE: Final = "application/secevent+jwt"
FORM_TYPE: Final = "application/x-www-form-urlencoded"
RETRY_AFTER: Final = "30"


def _json(
    ctx: RequestContext, status: int, body: dict[str, Any] | None, **headers: str
) -> web.Response:
    resp = (
        web.json_response(body, status=status) if body is not None else web.Response(status=status)
    )
    resp.headers[DECISION_HEADER] = ctx.decision_id
    resp.headers["Server"] = SERVER_BANNER
    resp.headers["Cache-Control"] = "no-store"
    for name, value in headers.items():
        resp.headers[name.replace("_", "-")] = value
    return resp


def _set_error(
    ctx: RequestContext, status: int, err: str, description: str, **headers: str
) -> web.Response:
    reason = Reason.SIGNAL_REPLAYED if err == REPLAYED else Reason.SIGNAL_INVALID
    if status == 503:
        reason = Reason.SERVICE_UNAVAILABLE
    return _json(
        ctx,
        status,
        {
            # RFC 8935 §2.3: the error, as the transmitter reads it.
            "err": INVALID_REQUEST if err == REPLAYED else err,
            "description": description[:300],
            # RFC 9457, for people reading it.
            "type": PROBLEM_BASE + reason.value,
            "title": reason.summary,
            "status": status,
            "reason": reason.value,
            "decision_id": ctx.decision_id,
        },
        **headers,
    )


def _refusal(
    gw: Gateway, ctx: RequestContext, refusal: Refusal | None, *, source: str, via: str
) -> Receipt | None:
    if refusal is None:
        return None
    return gw.signals.refuse(
        ctx, INVALID_REQUEST, refusal.detail, source=source, name=UNKNOWN, via=via
    )


async def push_events(gw: Gateway, request: Request, ctx: RequestContext) -> web.StreamResponse:
    """POST /.ztgw/ssf/events: one pushed SET (RFC 8935 §2)."""
    signals = gw.signals
    early = _refusal(
        gw,
        ctx,
        cross_site(ctx, gw.config.server.public_url) or require_type(ctx, SET_MEDIA_TYPE),
        source="ssf",
        via="push",
    )
    if early is not None:
        return _set_error(ctx, 400, early.result, early.description)
    raw = await read_body(request, MAX_TOKEN_BYTES)
    try:
        token = (raw or b"").decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if raw is None or not token:
        receipt = signals.refuse(
            ctx, INVALID_REQUEST, "the body is not one SET", source="ssf", name=UNKNOWN, via="push"
        )
        return _set_error(ctx, 400, receipt.result, receipt.description)
    try:
        transmitter = signals.transmitter_for(token)
    except SignalTokenError as exc:
        receipt = signals.refuse(ctx, exc.code, exc.detail, source="ssf", name=UNKNOWN, via="push")
        return _set_error(ctx, 400, receipt.result, receipt.description)
    cfg = transmitter.cfg
    if cfg.delivery != "push":
        receipt = signals.refuse(
            ctx, "access_denied", "this transmitter is polled, not pushed to",
            source="ssf", name=cfg.name, via="push",
        )  # fmt: skip
        return _set_error(ctx, 400, receipt.result, receipt.description)
    if cfg.push_token is not None:
        scheme, _, presented = ctx.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), cfg.push_token.encode()
        ):
            receipt = signals.refuse(
                ctx, AUTHENTICATION_FAILED, "missing or wrong bearer token",
                source="ssf", name=cfg.name, via="push",
            )  # fmt: skip
            return _set_error(
                ctx, 401, receipt.result, receipt.description,
                WWW_Authenticate='Bearer realm="ztgateway-ssf", error="invalid_token"',
            )  # fmt: skip
    try:
        receipt = await signals.receive(token, ctx, via="push", transmitter=transmitter)
    except (AuditUnavailable, StoreUnavailable) as exc:
        if isinstance(exc, StoreUnavailable):
            gw.metrics.store_errors.inc()
        return _set_error(ctx, 503, "temporarily_unavailable", str(exc), Retry_After=RETRY_AFTER)
    if receipt.ok:
        return _json(ctx, 202, None)
    if receipt.result == KEYS_UNAVAILABLE:
        return _set_error(ctx, 503, receipt.result, receipt.description, Retry_After=RETRY_AFTER)
    return _set_error(ctx, 400, receipt.result, receipt.description)


def _logout_error(ctx: RequestContext, status: int, description: str) -> web.Response:
    return _json(
        ctx,
        status,
        {
            # Back-Channel Logout §2.8: OAuth 2.0's error response members.
            "error": "invalid_request" if status == 400 else "temporarily_unavailable",
            "error_description": description[:300],
            "reason": (
                Reason.SIGNAL_INVALID if status == 400 else Reason.SERVICE_UNAVAILABLE
            ).value,
            "decision_id": ctx.decision_id,
        },
        **({"Retry_After": RETRY_AFTER} if status == 503 else {}),
    )


async def backchannel_logout(
    gw: Gateway, request: Request, ctx: RequestContext
) -> web.StreamResponse:
    """POST /.ztgw/oidc/backchannel-logout (Back-Channel Logout 1.0 §2.5)."""
    logout = gw.backchannel
    source = "backchannel_logout"
    if not logout.enabled:
        gw.signals.refuse(
            ctx, INVALID_REQUEST, "back-channel logout is not enabled", source=source, name="-",
            via="backchannel",
        )  # fmt: skip
        # §2.8: 501 when the RP does not implement what was asked.
        return _json(ctx, 501, {"error": "invalid_request", "decision_id": ctx.decision_id})
    refusal = cross_site(ctx, gw.config.server.public_url) or require_type(ctx, FORM_TYPE)
    early = _refusal(gw, ctx, refusal, source=source, via="backchannel")
    if early is not None:
        return _logout_error(ctx, 400, early.description)
    raw = await read_body(request, MAX_TOKEN_BYTES)
    fields = parse_form(raw) if raw is not None else None
    token = fields.get("logout_token", "") if fields is not None else ""
    if not token:
        receipt = gw.signals.refuse(
            ctx, INVALID_REQUEST, "no single logout_token form field", source=source, name="-",
            via="backchannel",
        )  # fmt: skip
        return _logout_error(ctx, 400, receipt.description)
    try:
        receipt = await logout.receive(token, ctx)
    except (AuditUnavailable, StoreUnavailable) as exc:
        return _logout_error(ctx, 503, str(exc))
    if receipt.ok:
        return _json(ctx, 200, None)
    if receipt.result == KEYS_UNAVAILABLE:
        return _logout_error(ctx, 503, receipt.description)
    return _logout_error(ctx, 400, receipt.description)
