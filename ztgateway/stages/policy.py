"""The policy stage: the only stage that may ALLOW, and only when every rule of the route holds.

Default deny. Every failed rule becomes its own finding, so `policy explain` and the audit event
list all the reasons a request was refused, not just the first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from ..context import RequestContext
from ..decision import Finding, Reason, Verdict
from ..request.paths import route_key

if TYPE_CHECKING:
    from ..config import Network, TimeWindow
    from ..runtime import Runtime

NAME = "policy"


def _deny(reason: Reason, detail: str = "") -> Finding:
    return Finding(NAME, reason, Verdict.DENY, detail=detail)


def in_window(window: TimeWindow, now: float) -> bool:
    local = datetime.fromtimestamp(now, window.tz)
    t = local.timetz().replace(tzinfo=None)
    if window.start <= window.end:
        return local.weekday() in window.days and window.start <= t <= window.end
    # Spans midnight: the day named is the day the window starts.
    if t >= window.start:
        return local.weekday() in window.days
    return (local.weekday() - 1) % 7 in window.days and t <= window.end


def _claim_matches(value: Any, allowed: tuple[str, ...]) -> bool:
    if isinstance(value, str):
        return value in allowed
    if isinstance(value, list):
        return any(isinstance(v, str) and v in allowed for v in value)
    if isinstance(value, bool | int | float):
        return str(value).lower() in allowed
    return False


class PolicyStage:
    name = NAME

    def __init__(self, runtime: Runtime) -> None:
        self.zones: dict[str, tuple[Network, ...]] = runtime.config.zones

    async def check(self, ctx: RequestContext) -> Sequence[Finding]:
        route = ctx.route
        assert route is not None
        policy = route.policy
        ident = ctx.identity
        out: list[Finding] = []
        if policy.methods:
            method = "GET" if ctx.method == "HEAD" else ctx.method
            if method not in policy.methods and ctx.method not in policy.methods:
                out.append(_deny(Reason.METHOD_NOT_ALLOWED, ctx.method))
        if policy.paths and ctx.path is not None:
            # Matched on the path as the upstream reads it (parameters stripped, case folded
            # for a case-insensitive upstream), like the route itself.
            folds = route.upstream.case_insensitive
            key = route_key(ctx.path, case_insensitive=folds)
            if not any(fnmatchcase(key, p.lower() if folds else p) for p in policy.paths):
                out.append(_deny(Reason.PATH_DENIED, ctx.path))
        if policy.zones:
            try:
                addr = ipaddress.ip_address(ctx.client_ip)
                ok = any(addr in net for z in policy.zones for net in self.zones[z])
            except ValueError:
                ok = False
            if not ok:
                out.append(
                    _deny(
                        Reason.NETWORK_ZONE_DENIED,
                        f"{ctx.client_ip} not in {', '.join(policy.zones)}",
                    )
                )
        if policy.time_windows and not any(in_window(w, ctx.now) for w in policy.time_windows):
            out.append(
                _deny(
                    Reason.TIME_WINDOW_DENIED,
                    "outside " + "; ".join(w.text for w in policy.time_windows),
                )
            )
        cert = ctx.cert
        if policy.cert_subjects or policy.cert_san_patterns:
            allowed = cert is not None and (
                cert.common_name in policy.cert_subjects
                or cert.device_id in policy.cert_subjects
                or any(fnmatchcase(san, p) for san in cert.sans for p in policy.cert_san_patterns)
            )
            if not allowed:
                out.append(
                    _deny(
                        Reason.CLIENT_CERT_NOT_ALLOWED, cert.subject if cert else "no certificate"
                    )
                )

        user = ident.user if ident else None
        needs_user = bool(
            policy.users
            or policy.groups
            or policy.roles
            or policy.scopes
            or policy.claims
            or policy.login == "always"
            or (policy.login == "browsers" and ctx.browser)
        )
        if user is None and (needs_user or cert is None):
            # Nobody claimed the request: 401, not 403.
            out.append(_deny(Reason.IDENTITY_UNAUTHENTICATED))
        elif ident is not None and user is not None:
            if policy.users and user not in policy.users:
                out.append(_deny(Reason.USER_NOT_ALLOWED, user))
            if policy.groups and not (ident.groups & policy.groups):
                out.append(
                    _deny(Reason.GROUP_REQUIRED, "needs one of " + ", ".join(sorted(policy.groups)))
                )
            if policy.roles and not (ident.roles & policy.roles):
                out.append(
                    _deny(Reason.ROLE_REQUIRED, "needs one of " + ", ".join(sorted(policy.roles)))
                )
            if policy.scopes and not policy.scopes <= ident.scopes:
                missing = sorted(policy.scopes - ident.scopes)
                out.append(_deny(Reason.SCOPE_INSUFFICIENT, "missing " + " ".join(missing)))
            for name, values in policy.claims:
                if not _claim_matches(ident.claims.get(name), values):
                    out.append(_deny(Reason.CLAIM_MISMATCH, name))
        if not out:
            out.append(Finding(NAME, Reason.POLICY_ALLOWED, Verdict.ALLOW))
        return out
