"""Events the gateway records besides the decision itself.

The decision event is written before the request is forwarded (durability: the journal), so it
cannot say what the upstream then did; issue 19 found requests answered 502 and 504 audited
only as `allow/policy-allowed`. A second event, linked to the decision by its id, records the
outcome once it is known:

    {"type": "ztgw.upstream", "decision_id": "<decision id>/upstream", "decision": "<decision id>",
     "route": "api", "timestamp": ...,
     "input": {"user": ..., "device": ..., "client_ip": ...},
     "result": {"reason": null | "upstream-unavailable" | "upstream-timeout" | "body-too-large"},
     "upstream": {"name": "demo", "outcome": "responded" | "websocket" | "connect" | "timeout" |
                  "reset" | "tls" | "body-too-large", "status": 200 | null, "answered": 200,
                  "head_seconds": 0.0042 | null, "seconds": 0.0051}}

`status` is what the upstream answered (null when it did not), `answered` what the client got;
`head_seconds` is the time to the upstream's response head, `seconds` the whole exchange.
`ztgateway audit search --decision-id ID` lists both events, and `--reason upstream-timeout`
finds the failures.
"""

from __future__ import annotations

from typing import Any, Final

UPSTREAM_TYPE: Final = "ztgw.upstream"
UPSTREAM_SUFFIX: Final = "/upstream"


def upstream_event(
    decision_id: str,
    *,
    route: str,
    upstream: str,
    outcome: str,
    status: int | None,
    answered: int,
    seconds: float,
    head_seconds: float | None,
    reason: str | None,
    user: str | None,
    device: str | None,
    client_ip: str,
) -> dict[str, Any]:
    return {
        "decision_id": decision_id + UPSTREAM_SUFFIX,
        "type": UPSTREAM_TYPE,
        "decision": decision_id,
        "route": route,
        "input": {"user": user, "device": device, "client_ip": client_ip},
        "result": {"reason": reason},
        "upstream": {
            "name": upstream,
            "outcome": outcome,
            "status": status,
            "answered": answered,
            "head_seconds": None if head_seconds is None else round(head_seconds, 6),
            "seconds": round(seconds, 6),
        },
    }
