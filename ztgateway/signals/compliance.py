"""A transmitter's verdict on a device's compliance (CAEP `device-compliance-change`).

The verdict is kept as a posture record of its own, under `ssf:<device id>`, beside the agent's
report (never instead of it): the store already replicates posture records to every worker and
replica (`ChangeKind.POSTURE`), and neither source may overwrite the other. An agent reporting
"all fine" does not clear an MDM's "not compliant", nor the reverse: the device is compliant
only when both say so (docs/decisions/0016-signals-receiver.md).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from ..risk.posture import CheckResult, PostureEvaluation
from ..store.base import PostureRecord

PREFIX: Final = "ssf:"
CHECK: Final = "transmitter_compliance"
REMEDIATION: Final = (
    "Your organisation's device management reports this device as not compliant: "
    "follow its instructions, then wait for it to report the device compliant again."
)


def record_key(device_id: str) -> str:
    return PREFIX + device_id


def apply_verdict(evaluation: PostureEvaluation, record: PostureRecord | None) -> PostureEvaluation:
    """The agent's evaluation with the transmitter's verdict added as one more check."""
    if record is None:
        return evaluation
    status = record.report.get("current_status")
    source = record.report.get("transmitter", "transmitter")
    ok = status == "compliant"
    check = CheckResult(CHECK, ok, f"{source}: {status}", "" if ok else REMEDIATION)
    return replace(
        evaluation,
        compliant=evaluation.compliant and ok,
        checks=(*evaluation.checks, check),
    )
