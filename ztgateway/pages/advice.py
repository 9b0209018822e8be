"""What a person can do about a refusal, said to them (not to a program: problem+json carries
the reason code for those). Reasons without an entry get the generic line and the support
contact."""

from __future__ import annotations

from ..decision import Reason

_TRY_AGAIN = "Try again in a moment; if it persists, tell the application owner."

ADVICE: dict[Reason, str] = {
    Reason.CLIENT_CERT_REQUIRED: "Connect from a device with its device certificate installed. "
    "If you do not have one, ask IT for one.",
    Reason.CLIENT_CERT_REVOKED: "This device's certificate was revoked. Ask IT for a new one.",
    Reason.CLIENT_CERT_INVALID: "Your device certificate is expired or not valid for sign-in. "
    "Ask IT to renew it.",
    Reason.CLIENT_CERT_STATUS_UNKNOWN: "Your device certificate is not known to the authority "
    "that issued it. Ask IT for a new one.",
    Reason.CLIENT_CERT_STATUS_UNAVAILABLE: "The gateway cannot check your device certificate "
    "right now. Try again in a moment.",
    Reason.ROUTE_NOT_FOUND: "Check the address you followed.",
    Reason.IDENTITY_UNAUTHENTICATED: "Sign in and try again.",
    Reason.TOKEN_REQUIRED: "This address is for programs that send an access token, not for "
    "browsing. Go back to the application's start page.",
    Reason.TOKEN_INVALID: "This address is for programs that send an access token, and the token "
    "sent was not accepted.",
    Reason.TOKEN_EXPIRED: "The program's access token has expired: it needs a new one.",
    Reason.GROUP_REQUIRED: "Your account is not in a group that may use this page. Ask the "
    "application owner for access if you need it.",
    Reason.USER_NOT_ALLOWED: "Your account may not use this page. Ask the application owner "
    "for access if you need it.",
    Reason.ROLE_REQUIRED: "Your account lacks a role this page needs. Ask the application owner "
    "for access if you need it.",
    Reason.NETWORK_ZONE_DENIED: "This page is only available from the organisation's network. "
    "Connect from the office or the VPN.",
    Reason.TIME_WINDOW_DENIED: "This page is only available during working hours.",
    Reason.DEVICE_UNKNOWN: "This device is not registered yet. Ask IT to register it.",
    Reason.DEVICE_PENDING: "This device waits for IT to approve it. Ask IT to approve it, "
    "quoting the reference below.",
    Reason.DEVICE_REVOKED: "This device may no longer be used here. Contact IT.",
    Reason.DEVICE_OWNER_MISMATCH: "This device is registered to someone else. Use your own "
    "device, or ask IT to change the device's owner.",
    Reason.ACCOUNT_LOCKED: "Your account is locked for now, and every session of it has ended.",
    Reason.RISK_DENIED: "This request looked too risky to allow (for example an unusual place "
    "or device). Try again from your usual device and network.",
    Reason.RATE_LIMITED: "Too many requests in a short time. Wait a moment and try again.",
    Reason.MFA_LOCKED: "Too many wrong codes were entered for your account.",
    Reason.ORIGIN_MISMATCH: "This form was sent from another site. If you meant to do this, open "
    "the gateway's page yourself and try again.",
    Reason.ORIGIN_DENIED: "A page of another site sent your browser here with your device's "
    "certificate. If you meant to open this page, continue from here.",
    Reason.PROVIDER_NOT_ALLOWED: "You are signed in with an identity provider this application "
    "does not accept. Sign in with one it accepts to continue (this ends your current sign-in).",
    Reason.CSRF_INVALID: "The form expired or did not come from this site. Go back, reload the "
    "page and try again.",
    Reason.UPSTREAM_UNAVAILABLE: _TRY_AGAIN,
    Reason.UPSTREAM_TIMEOUT: _TRY_AGAIN,
    Reason.SERVICE_UNAVAILABLE: "The gateway cannot check requests right now. Try again in a "
    "minute.",
    Reason.STAGE_ERROR: "The gateway could not check this request. Try again in a minute.",
}
GENERIC = "If you think this is wrong, contact support and quote the reference below."


def advice_for(reason: Reason) -> tuple[str, bool]:
    """The sentence for `reason`, and whether to point at support as well."""
    text = ADVICE.get(reason)
    return (text, False) if text else (GENERIC, True)
