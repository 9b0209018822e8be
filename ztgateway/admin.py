"""The admin API on the ops listener: sessions, devices, users, audit search, explain, reload.

Every call needs the admin token (`[ops] admin_token_file` or the `ZTGW_ADMIN_TOKEN`
environment variable) as a bearer token — even on localhost, where the ops listener binds by
default — and every call, refused or not, is an audit event. The operations themselves are the
store's, the same the `ztgateway devices|users|sessions` commands use.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .audit import AuditUnavailable, search
from .context import RequestContext
from .decision import Decision, Finding, Reason, Verdict
from .edge.certverify import CertRefused, ClientCertVerifier
from .risk.posture import MAX_CLOCK_SKEW, PostureError, digest, evaluate, validate_report
from .store.base import REBIND_NEXT, Device, PostureRecord, Store, UserRecord

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

if TYPE_CHECKING:
    from .app import Gateway
    from .config import OpsConfig

ADMIN_ENV = "ZTGW_ADMIN_TOKEN"


def load_admin_token(cfg: OpsConfig) -> str | None:
    env = os.environ.get(ADMIN_ENV)
    if env:
        return env.strip()
    if cfg.admin_token_file is not None and cfg.admin_token_file.exists():
        return cfg.admin_token_file.read_text().strip() or None
    return None


def _audit(
    gw: Gateway,
    request: web.Request,
    verdict: Verdict,
    reason: Reason,
    detail: str,
    *,
    device: str | None = None,
) -> str:
    ctx = RequestContext.synthetic(
        method=request.method,
        path=request.path,
        client_ip=request.remote or "",
        headers={},
        clock=gw.clock,
    )
    finding = Finding("admin", reason, verdict, detail=detail)
    event = gw.audit_event(ctx, Decision(ctx.decision_id, verdict, reason, (finding,)), None)
    event["type"] = "ztgw.admin"
    if device is not None:
        # So `audit search --device X` finds what an operator's system said about X.
        event["input"]["device"] = device
    try:
        gw.audit.record(event)
    except AuditUnavailable:
        gw.metrics.audit_unavailable.inc()
        raise
    return ctx.decision_id


ADMIN_PATHS = ("/admin/", "/decide")
"""Need the admin token. `/decide` answers with the identity, groups and finding details of
whatever cookie, token or certificate it is given (security review L10): it is policy explain
for operators, not a public oracle. /healthz, /readyz, /metrics and /forward-auth stay open
(forward-auth checks its caller's address)."""


@web.middleware
async def require_admin(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not (request.path.startswith(ADMIN_PATHS[0]) or request.path == ADMIN_PATHS[1]):
        return await handler(request)
    from .ops import GATEWAY_KEY

    gw = request.app[GATEWAY_KEY]
    expected = load_admin_token(gw.config.ops)
    auth = request.headers.get("Authorization", "")
    scheme, _, given = auth.partition(" ")
    ok = (
        expected is not None
        and scheme.lower() == "bearer"
        and hmac.compare_digest(given.strip().encode(), expected.encode())
    )
    if not ok:
        try:
            decision_id = _audit(
                gw,
                request,
                Verdict.DENY,
                Reason.IDENTITY_UNAUTHENTICATED,
                "admin API without admin credentials",
            )
        except AuditUnavailable:
            return web.json_response({"reason": "service-unavailable"}, status=503)
        gw.metrics.admin_calls.labels("refused").inc()
        return web.json_response(
            {
                "type": "https://ztgateway.dev/problems/identity-unauthenticated",
                "title": "Admin credentials required",
                "status": 401,
                "reason": "identity-unauthenticated",
                "decision_id": decision_id,
            },
            status=401,
            content_type="application/problem+json",
            headers={"WWW-Authenticate": 'Bearer realm="ztgateway-admin"'},
        )
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        decision_id = _audit(
            gw,
            request,
            Verdict.DENY,
            Reason.REQUEST_INVALID,
            f"admin {request.method} {request.path}: {exc.status}",
        )
        return web.json_response(
            {
                "type": "about:blank",
                "title": exc.reason,
                "status": exc.status,
                "detail": exc.text or exc.reason,
                "decision_id": decision_id,
            },
            status=exc.status,
            content_type="application/problem+json",
        )
    _audit(
        gw, request, Verdict.ALLOW, Reason.POLICY_ALLOWED, f"admin {request.method} {request.path}"
    )
    gw.metrics.admin_calls.labels("ok").inc()
    return response


async def rebind_device(
    store: Store, device_id: str, pem: bytes | None, verifier: ClientCertVerifier, now: float
) -> Device | None:
    """Pin a device to the key of `pem` (verified like a handshake, naming this device), or,
    without one, to the key of the next certificate it presents (security review L9).
    Raises ValueError for a certificate that may not be this device's."""
    device = store.device(device_id)
    if device is None:
        return None
    if pem is None:
        return await store.bind_device_key(
            device_id, REBIND_NEXT, device.fingerprint, device.subject
        )
    try:
        cert = verifier.verify_pem(pem, now)
    except CertRefused as exc:
        raise ValueError(f"certificate refused: {exc.detail}") from exc
    if cert.device_id != device_id:
        raise ValueError(f"the certificate is device {cert.device_id!r}, not {device_id!r}")
    return await store.bind_device_key(
        device_id, cert.spki_sha256, cert.fingerprint_sha256, cert.subject
    )


def _gw(request: web.Request) -> Gateway:
    from .ops import GATEWAY_KEY

    gw: Gateway = request.app[GATEWAY_KEY]
    return gw


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(text="body must be JSON") from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


async def list_sessions(request: web.Request) -> web.Response:
    gw = _gw(request)
    user = request.query.get("user")
    return web.json_response(
        [s.to_json() | {"session_id": s.session_id} for s in gw.store.sessions(user)]
    )


async def terminate_sessions(request: web.Request) -> web.Response:
    """POST {"user": "alice"} or {"session_id": "…"}: refused at once, WebSockets closed."""
    gw = _gw(request)
    body = await _json_body(request)
    now = gw.clock.time()
    reason = str(body.get("reason") or "terminated by an operator")
    if "user" in body:
        targets = [s.session_id for s in gw.store.sessions(str(body["user"])) if not s.revoked]
    elif "session_id" in body:
        targets = [str(body["session_id"])]
    else:
        raise web.HTTPBadRequest(text='give "user" or "session_id"')
    ended = sum([await gw.store.revoke_session(sid, reason, now) for sid in targets])
    return web.json_response({"terminated": ended})


async def list_devices(request: web.Request) -> web.Response:
    return web.json_response([d.to_json() for d in _gw(request).store.devices()])


async def device_action(request: web.Request) -> web.Response:
    gw = _gw(request)
    device_id = request.match_info["device"]
    action = request.match_info["action"]
    if action == "approve":
        device = await gw.store.set_device_state(device_id, "approved")
    elif action == "revoke":
        device = await gw.store.set_device_state(device_id, "revoked")
    elif action == "owner":
        body = await _json_body(request)
        owner = body.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise web.HTTPBadRequest(text="owner must be a string or null")
        device = await gw.store.set_device_owner(device_id, owner)
    elif action == "rebind":
        body = await _json_body(request)
        pem = body.get("cert_pem")
        if pem is not None and not isinstance(pem, str):
            raise web.HTTPBadRequest(text="cert_pem must be a PEM string")
        try:
            device = await rebind_device(
                gw.store,
                device_id,
                pem.encode() if pem else None,
                gw.tls.current.verifier,
                gw.clock.time(),
            )
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
    else:
        raise web.HTTPNotFound()
    if device is None:
        raise web.HTTPNotFound(text=f"no device {device_id}")
    return web.json_response(device.to_json())


async def list_users(request: web.Request) -> web.Response:
    gw = _gw(request)
    now = gw.clock.time()
    return web.json_response(
        [
            {
                "user": u.user,
                "mfa_enrolled": bool(u.mfa_secret),
                "locked": u.locked(now),
                "locked_until": u.locked_until,
                "timezone": u.timezone,
                "working_hours": u.working_hours,
            }
            for u in gw.store.users()
        ]
    )


async def user_action(request: web.Request) -> web.Response:
    gw = _gw(request)
    user = request.match_info["user"]
    action = request.match_info["action"]
    store = gw.store
    now = gw.clock.time()
    account = store.user(user) or UserRecord(user=user)
    if action == "lock":
        body = await _json_body(request)
        minutes = body.get("minutes", 0)
        if not isinstance(minutes, int | float) or minutes < 0:
            raise web.HTTPBadRequest(text="minutes must be a non-negative number")
        until = now + minutes * 60 if minutes else 4102444800.0
        await store.save_user(
            replace(
                account,
                locked_until=until,
                lock_reason=str(body.get("reason") or "locked by an operator"),
            )
        )
        ended = sum(
            [
                await store.revoke_session(s.session_id, "account locked", now)
                for s in store.sessions(user)
            ]
        )
        return web.json_response(
            {"user": user, "locked_until": until, "sessions_terminated": ended}
        )
    if action == "unlock":
        await store.save_user(
            replace(account, locked_until=None, lock_reason=None, mfa_locked_until=None)
        )
        await store.reset_failures_async(f"mfa:{user}")
        return web.json_response({"user": user, "locked": False})
    if action == "mfa-reset":
        return web.json_response({"user": user, "reset": await gw.mfa.reset(user)})
    raise web.HTTPNotFound()


async def list_webauthn(request: web.Request) -> web.Response:
    """GET /admin/users/{user}/webauthn: the user's security keys and passkeys (no keys)."""
    gw = _gw(request)
    user = request.match_info["user"]
    return web.json_response([c.summary() for c in await gw.store.webauthn_credentials(user)])


async def remove_webauthn(request: web.Request) -> web.Response:
    """DELETE /admin/users/{user}/webauthn/{credential}: a lost or compromised key removed;
    audited by the middleware with the user and credential id in the path (404 if unknown)."""
    gw = _gw(request)
    user, credential = request.match_info["user"], request.match_info["credential"]
    if not await gw.store.remove_webauthn_credential(user, credential):
        raise web.HTTPNotFound(text=f"no credential {credential} of {user}")
    return web.json_response({"user": user, "credential_id": credential, "removed": True})


async def audit_search(request: web.Request) -> web.Response:
    gw = _gw(request)
    q = request.query

    def when(name: str) -> datetime | None:
        value = q.get(name)
        if not value:
            return None
        try:
            return datetime.fromisoformat(value)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{name}: not an ISO 8601 time") from exc

    try:
        limit = min(1000, int(q.get("limit", "100")))
    except ValueError as exc:
        raise web.HTTPBadRequest(text="limit must be a number") from exc
    await gw.audit.flush()
    events = await search(
        gw.config.audit.db,
        user=q.get("user"),
        device=q.get("device"),
        route=q.get("route"),
        reason=q.get("reason"),
        decision_id=q.get("decision_id"),
        session=q.get("session"),
        since=when("since"),
        until=when("until"),
        limit=limit,
    )
    return web.json_response(events)


MAX_BULK_REPORTS = 1000
_SOURCE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _bulk_report(gw: Gateway, doc: Any, now: float) -> tuple[str, dict[str, Any], float]:
    """One management-system report, held to the agent's rules plus two of its own: it names
    its device, and it says when the data was collected (which makes replays detectable)."""
    if not isinstance(doc, dict):
        raise PostureError("(report)", "must be a JSON object")
    device_id = doc.get("device_id")
    if not isinstance(device_id, str) or not device_id:
        raise PostureError("device_id", "is required: which device this report describes")
    report = validate_report(doc)
    collected = report.get("collected_at")
    if collected is None:
        raise PostureError("collected_at", "is required in a management system's report")
    if collected > now + MAX_CLOCK_SKEW:
        raise PostureError("collected_at", "is in the future")
    previous = gw.store.posture(device_id)
    last = previous.collected_at if previous is not None else None
    if last is not None and collected <= last:
        raise PostureError("collected_at", "is not newer than the last report", replay=True)
    return device_id, report, float(collected)


async def post_posture(request: web.Request) -> web.Response:
    """POST {"source": "intune", "reports": [{"device_id": …, …}]}: posture for many devices
    from a management system (MDM, inventory, EDR console).

    Each report is judged on its own (one bad device never refuses the others) and is one
    audit event naming its device; the call itself is audited by `require_admin`. Reports
    posted here count as unsigned: routes with `require_signed_posture` still need the device's
    own agent, whose signature proves the device key's holder made them.
    """
    gw = _gw(request)
    body = await _json_body(request)
    source = body.get("source")
    if not isinstance(source, str) or _SOURCE.fullmatch(source) is None:
        raise web.HTTPBadRequest(
            text='"source" must name the reporting system: lower-case letters, digits, . _ -'
        )
    reports = body.get("reports")
    if not isinstance(reports, list) or not reports:
        raise web.HTTPBadRequest(text='"reports" must be a non-empty list')
    if len(reports) > MAX_BULK_REPORTS:
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_BULK_REPORTS,
            actual_size=len(reports),
            text=f"at most {MAX_BULK_REPORTS} reports per call",
        )
    now = gw.clock.time()
    results: list[dict[str, Any]] = []
    for doc in reports:
        named = doc.get("device_id") if isinstance(doc, dict) else None
        shown = named if isinstance(named, str) and len(named) <= 255 else None
        try:
            device_id, report, collected = _bulk_report(gw, doc, now)
        except PostureError as exc:
            reason = Reason.POSTURE_REPLAYED if exc.replay else Reason.POSTURE_INVALID
            gw.metrics.posture_reports.labels("refused").inc()
            _audit(
                gw,
                request,
                Verdict.DENY,
                reason,
                f"posture from {source}: {exc.field}: {exc.message}",
                device=shown,
            )
            results.append(
                {
                    "device_id": shown,
                    "accepted": False,
                    "reason": reason.value,
                    "field": exc.field,
                    "detail": exc.message,
                }
            )
            continue
        report["source"] = f"operator:{source}"
        canonical = json.dumps(report, sort_keys=True, separators=(",", ":")).encode()
        await gw.store.put_posture(
            PostureRecord(
                device_id=device_id,
                report=report,
                received_at=now,
                collected_at=collected,
                signed=False,
                digest=digest(canonical),
            )
        )
        evaluation = evaluate(report, now, gw.config.posture, now=now, signed=False)
        gw.metrics.posture_reports.labels(
            "compliant" if evaluation.compliant else "noncompliant"
        ).inc()
        for name in evaluation.failed:
            gw.metrics.posture_failed_checks.labels(name).inc()
        _audit(
            gw,
            request,
            Verdict.ALLOW,
            Reason.POLICY_ALLOWED,
            f"posture from {source} accepted",
            device=device_id,
        )
        results.append(
            {
                "device_id": device_id,
                "accepted": True,
                "known_device": gw.store.device(device_id) is not None,
                "compliant": evaluation.compliant,
                "failed_checks": evaluation.failed,
            }
        )
    accepted = sum(1 for r in results if r["accepted"])
    return web.json_response(
        {
            "source": source,
            "accepted": accepted,
            "refused": len(results) - accepted,
            "results": results,
        }
    )


async def reload(request: web.Request) -> web.Response:
    gw = _gw(request)
    ok = gw.reload()
    status = 200 if ok else 409
    # What was applied, and what only a restart applies (reloading.py).
    body = {"revision": gw.config.revision, **gw.last_reload, "reloaded": ok}
    return web.json_response(body, status=status)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/admin/sessions", list_sessions)
    app.router.add_post("/admin/sessions/terminate", terminate_sessions)
    app.router.add_get("/admin/devices", list_devices)
    app.router.add_post("/admin/devices/{device}/{action}", device_action)
    app.router.add_post("/admin/posture", post_posture)
    app.router.add_get("/admin/users", list_users)
    app.router.add_post("/admin/users/{user}/{action}", user_action)
    app.router.add_get("/admin/users/{user}/webauthn", list_webauthn)
    app.router.add_delete("/admin/users/{user}/webauthn/{credential}", remove_webauthn)
    app.router.add_get("/admin/audit", audit_search)
    app.router.add_post("/admin/reload", reload)
