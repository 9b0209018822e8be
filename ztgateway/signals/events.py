"""The event types the gateway acts on, and what each one means for access.

CAEP (OpenID Continuous Access Evaluation Profile 1.0 §3) and RISC (OpenID RISC Profile 1.0 §2)
define the events; SSF 1.0 §8 the stream's own (verification, stream-updated). Labels are the
last path segment of the type URI, a closed set (Prometheus labels stay bounded): anything else
counts as `other`.
"""

from __future__ import annotations

import enum
from typing import Final

CAEP: Final = "https://schemas.openid.net/secevent/caep/event-type/"
RISC: Final = "https://schemas.openid.net/secevent/risc/event-type/"
SSF: Final = "https://schemas.openid.net/secevent/ssf/event-type/"
BACKCHANNEL_LOGOUT: Final = "http://schemas.openid.net/event/backchannel-logout"


class Action(enum.StrEnum):
    TERMINATE = "terminate"  # end the subject's sessions; open WebSockets close with 1008
    STEP_UP = "step-up"  # the subject's sessions must give a fresh second factor
    DEVICE_POSTURE = "device-posture"  # the transmitter's compliance verdict on a device
    ENABLE = "enable"  # lifts the lock an account-disabled event of this transmitter set
    STREAM = "stream"  # about the stream itself (verification, updates): nothing to enforce
    NONE = "none"  # understood but nothing to enforce at a gateway


EVENTS: Final[dict[str, tuple[str, Action]]] = {
    CAEP + "session-revoked": ("session-revoked", Action.TERMINATE),
    CAEP + "credential-change": ("credential-change", Action.STEP_UP),
    CAEP + "assurance-level-change": ("assurance-level-change", Action.STEP_UP),
    CAEP + "device-compliance-change": ("device-compliance-change", Action.DEVICE_POSTURE),
    CAEP + "token-claims-change": ("token-claims-change", Action.NONE),
    RISC + "account-disabled": ("account-disabled", Action.TERMINATE),
    RISC + "credential-compromise": ("credential-compromise", Action.TERMINATE),
    RISC + "account-purged": ("account-purged", Action.TERMINATE),
    # Deprecated by RISC 1.0 in favour of CAEP session-revoked; transmitters still send it.
    RISC + "sessions-revoked": ("sessions-revoked", Action.TERMINATE),
    RISC + "account-enabled": ("account-enabled", Action.ENABLE),
    RISC + "account-credential-change-required": (
        "account-credential-change-required",
        Action.STEP_UP,
    ),
    SSF + "verification": ("verification", Action.STREAM),
    SSF + "stream-updated": ("stream-updated", Action.STREAM),
}
LOCKING: Final = frozenset({"account-disabled", "account-purged"})
"""Besides ending sessions, these lock the account at the gateway until `account-enabled`:
a token minted before the account was disabled and not presented yet would otherwise start a
new session (RISC 1.0 §2.3: the account "should not be used")."""
EVENT_LABELS: Final = (*sorted({label for label, _ in EVENTS.values()}), "other")
COMPLIANCE_STATES: Final = ("compliant", "not-compliant")


def classify(event_type: str) -> tuple[str, Action]:
    return EVENTS.get(event_type, ("other", Action.NONE))


def step_up_applies(label: str, payload: dict[str, object]) -> bool:
    """An assurance level that went up asks nothing of anyone (CAEP §3.4 `change_direction`)."""
    if label == "assurance-level-change":
        return payload.get("change_direction") != "increase"
    return True
