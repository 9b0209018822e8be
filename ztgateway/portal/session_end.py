"""Why a browser's session ended, in words, on the sign-in page it is sent to.

The reason travels as `ended=<code>` from a closed vocabulary: the page shows a fixed sentence
for a known code and nothing for anything else, so the parameter cannot carry another site's
text onto the page. An operator's free-text reason ("laptop reported stolen") is for the audit
and `sessions list`, never shown: it becomes "revoked".
"""

from __future__ import annotations

from ..decision import Reason

ENDED: dict[str, str] = {
    "signed-out": "You signed out. Sign in again to continue.",
    "expired": "Your session expired: it was idle for too long or reached its maximum length. "
    "Sign in again to continue.",
    "ip-drift": "Your session was ended because your network address changed, which this "
    "application does not allow. Sign in again from where you are now.",
    "anomaly": "Your session was ended because its activity looked unusual (for example many "
    "refused requests in a short time). Sign in again to continue.",
    "revoked": "An administrator ended your session. Sign in again to continue; if you did not "
    "expect this, contact support.",
    "locked": "Your session ended when your account was locked.",
    "replaced": "You signed in again, which ended your earlier session.",
    "too-many": "You had too many sessions on this device, so the oldest one was ended.",
    "invalid": "Your session is no longer valid here (it is unknown to the gateway or belongs to "
    "another device). Sign in again to continue.",
}

_BY_STORED_REASON = {
    "signed out": "signed-out",
    "replaced by sign-in": "replaced",
    "rotated after step-up": "replaced",
    "too many sessions on this device": "too-many",
    "account locked": "locked",
    Reason.IP_DRIFT.value: "ip-drift",
    Reason.SESSION_TERMINATED.value: "anomaly",
}


def ended_code(reason: Reason, detail: str) -> str | None:
    """The `ended` code for a refusal that sends a browser to sign in (None: first visit)."""
    if reason is Reason.SESSION_EXPIRED:
        return "expired"
    if reason is Reason.SESSION_INVALID:
        return "invalid"
    if reason is Reason.IP_DRIFT:
        return "ip-drift"
    if reason is Reason.SESSION_TERMINATED:
        if detail.startswith("anomaly"):
            return "anomaly"
        return _BY_STORED_REASON.get(detail, "revoked")
    return None


def ended_text(code: str | None) -> str | None:
    return ENDED.get(code or "")
