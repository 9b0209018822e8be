"""Device posture: validate an agent's report, judge it against the posture policy, explain.

A report is a small JSON document the device agent POSTs to `/.ztgw/posture` over mTLS (the
device is the presented certificate). Validation is strict (unknown fields, wrong types and
oversized bodies are refused, naming the field) because the report decides access. A report
can be signed (compact JWS by the certificate's key) so that a stolen token plus a copied JSON
file cannot vouch for another machine; routes can require signed reports.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

PLATFORMS = ("windows", "macos", "linux", "ios", "android")
PLATFORM_NAMES = {
    "windows": "Windows",
    "macos": "macOS",
    "linux": "Linux",
    "ios": "iOS",
    "android": "Android",
}
BOOL_CHECKS = ("disk_encrypted", "firewall", "antivirus", "screen_lock", "mdm_enrolled")
REQUIRED_FIELDS = ("platform", "os_version", "last_patch", *BOOL_CHECKS, "jailbroken")
OPTIONAL_FIELDS = (
    "collected_at",
    "device_id",
    "agent_version",
    "hostname",
    "os_name",
    "kernel",
    "evidence",
)
EVIDENCE_KEYS = (*REQUIRED_FIELDS,)
"""`evidence` explains a field (what the agent saw: "/ on dm-crypt nvme0n1p3_crypt"), for the
operator and the device page; it never changes a verdict."""
MAX_EVIDENCE_CHARS = 512
MAX_REPORT_BYTES = 16 * 1024
MAX_CLOCK_SKEW = 300.0
"""How far in the future a report's collected_at may lie (the device's clock may run ahead)."""
_VERSION = re.compile(r"^(\d{1,9}(?:\.\d{1,9}){0,5})(?:[-+~ ].{0,64})?$")

REMEDIATION: dict[str, str] = {
    "disk_encrypted": "Turn on disk encryption (FileVault on macOS, BitLocker on Windows, LUKS on Linux, "
    "device encryption on phones).",
    "firewall": "Turn on the firewall.",
    "antivirus": "Install or turn on antivirus protection.",
    "screen_lock": "Set a screen lock that engages after a few minutes.",
    "mdm_enrolled": "Enrol this device in the organisation's device management (MDM).",
    "jailbroken": "This device is jailbroken or rooted: restore it to a supported system image.",
    "os_version": "Update the operating system.",
    "patch_age": "Install the latest system updates.",
    "report_stale": "Run the device agent so it reports this device's posture again.",
    "report_missing": "Install and run the device agent so it reports this device's posture.",
    "report_unsigned": "Update the device agent: this application needs signed posture reports.",
    "platform": "This platform is not supported for this application.",
}


class PostureError(ValueError):
    """A report that cannot be accepted; `field` names what is wrong (for the 400 answer)."""

    def __init__(self, field: str, message: str, *, replay: bool = False) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.replay = replay


def parse_version(text: str) -> tuple[int, ...]:
    """`15.1`, `10.0.19045`, `6.1.0-13-amd64` (suffix ignored): numeric, compared as versions."""
    m = _VERSION.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"not a version: {text!r}")
    parts = tuple(int(p) for p in m.group(1).split("."))
    while len(parts) > 1 and parts[-1] == 0:
        parts = parts[:-1]
    return parts


def version_at_least(actual: str, minimum: str) -> bool:
    a, b = parse_version(actual), parse_version(minimum)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


@dataclass(frozen=True, slots=True)
class PosturePolicy:
    required_checks: tuple[str, ...] = (*BOOL_CHECKS, "not_jailbroken")
    min_os_version: tuple[tuple[str, str], ...] = ()
    max_patch_age_days: int | None = 30
    max_report_age: float = 86400.0
    platforms: tuple[str, ...] = PLATFORMS


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    passed: bool
    detail: str = ""
    remediation: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"check": self.name, "passed": self.passed}
        if self.detail:
            out["detail"] = self.detail
        if not self.passed:
            out["remediation"] = self.remediation
        return out


@dataclass(frozen=True, slots=True)
class PostureEvaluation:
    compliant: bool
    stale: bool
    checks: tuple[CheckResult, ...]
    reported_at: float | None

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {
            "compliant": self.compliant,
            "stale": self.stale,
            "failed_checks": self.failed,
            "checks": [c.to_json() for c in self.checks],
            "reported_at": self.reported_at,
        }


def _parse_time(value: Any, field: str) -> float:
    if not isinstance(value, str) or len(value) > 40:
        raise PostureError(field, "must be an RFC 3339 timestamp")
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise PostureError(field, "must be an RFC 3339 timestamp") from exc
    if t.tzinfo is None:
        raise PostureError(field, "needs a time zone offset")
    return t.timestamp()


def validate_report(doc: Any) -> dict[str, Any]:
    """The normalised report, or PostureError naming the first bad field."""
    if not isinstance(doc, dict):
        raise PostureError("(body)", "must be a JSON object")
    for key in doc:
        if key not in REQUIRED_FIELDS and key not in OPTIONAL_FIELDS:
            raise PostureError(str(key)[:64], "unknown field")
    for key in REQUIRED_FIELDS:
        if key not in doc:
            raise PostureError(key, "is required")
    platform = doc["platform"]
    if platform not in PLATFORMS:
        raise PostureError("platform", f"must be one of {', '.join(PLATFORMS)}")
    if not isinstance(doc["os_version"], str):
        raise PostureError("os_version", "must be a string")
    try:
        parse_version(doc["os_version"])
    except ValueError as exc:
        raise PostureError("os_version", "is not a version (like 15.1 or 10.0.19045)") from exc
    last_patch = doc["last_patch"]
    if not isinstance(last_patch, str):
        raise PostureError("last_patch", "must be a date (YYYY-MM-DD)")
    try:
        dt.date.fromisoformat(last_patch)
    except ValueError as exc:
        raise PostureError("last_patch", "must be a date (YYYY-MM-DD)") from exc
    for key in (*BOOL_CHECKS, "jailbroken"):
        if not isinstance(doc[key], bool):
            raise PostureError(key, "must be true or false")
    out = dict(doc)
    if "collected_at" in doc:
        out["collected_at"] = _parse_time(doc["collected_at"], "collected_at")
    for key in ("device_id", "agent_version", "hostname", "os_name", "kernel"):
        if key in doc and (not isinstance(doc[key], str) or len(doc[key]) > 255):
            raise PostureError(key, "must be a string of at most 255 characters")
    if "evidence" in doc:
        evidence = doc["evidence"]
        if not isinstance(evidence, dict):
            raise PostureError("evidence", "must be an object of field name to text")
        for key, text in evidence.items():
            if key not in EVIDENCE_KEYS:
                raise PostureError(f"evidence.{str(key)[:64]}", "names no report field")
            if not isinstance(text, str) or len(text) > MAX_EVIDENCE_CHARS:
                raise PostureError(
                    f"evidence.{key}",
                    f"must be a string of at most {MAX_EVIDENCE_CHARS} characters",
                )
    return out


def evaluate(
    report: dict[str, Any] | None,
    received_at: float | None,
    policy: PosturePolicy,
    *,
    now: float,
    signed: bool = True,
    require_signed: bool = False,
) -> PostureEvaluation:
    if report is None or received_at is None:
        check = CheckResult(
            "report_missing", False, "no posture report", REMEDIATION["report_missing"]
        )
        return PostureEvaluation(False, False, (check,), None)
    checks: list[CheckResult] = []
    platform = report.get("platform", "")
    if platform not in policy.platforms:
        checks.append(CheckResult("platform", False, str(platform), REMEDIATION["platform"]))
    for name in policy.required_checks:
        if name == "not_jailbroken":
            ok = report.get("jailbroken") is False
            checks.append(CheckResult("jailbroken", ok, "", REMEDIATION["jailbroken"]))
        else:
            ok = report.get(name) is True
            checks.append(CheckResult(name, ok, "", REMEDIATION.get(name, "")))
    minimum = dict(policy.min_os_version).get(platform)
    if minimum:
        ok = version_at_least(str(report.get("os_version", "0")), minimum)
        checks.append(
            CheckResult(
                "os_version",
                ok,
                f"{report.get('os_version')} (minimum {minimum})",
                f"Update {PLATFORM_NAMES.get(platform, platform)} to version {minimum} or later.",
            )
        )
    if policy.max_patch_age_days is not None:
        patched = dt.date.fromisoformat(str(report.get("last_patch")))
        today = dt.datetime.fromtimestamp(now, dt.UTC).date()
        age = (today - patched).days
        ok = age <= policy.max_patch_age_days
        checks.append(
            CheckResult(
                "patch_age",
                ok,
                f"last patch {patched.isoformat()} ({age} days ago, maximum {policy.max_patch_age_days})",
                REMEDIATION["patch_age"],
            )
        )
    if require_signed and not signed:
        checks.append(CheckResult("report_unsigned", False, "", REMEDIATION["report_unsigned"]))
    reported = float(report.get("collected_at") or received_at)
    stale = now - reported > policy.max_report_age
    checks.append(
        CheckResult(
            "report_fresh",
            not stale,
            f"reported {int(now - reported)} s ago (maximum {int(policy.max_report_age)} s)",
            REMEDIATION["report_stale"],
        )
    )
    compliant = all(c.passed for c in checks)
    return PostureEvaluation(compliant, stale, tuple(checks), reported)


def digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def verify_signed_report(token: str, cert_der: bytes) -> dict[str, Any]:
    """A compact JWS over the report, signed by the device certificate's own key."""
    key = x509.load_der_x509_certificate(cert_der).public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithms = {"secp256r1": ["ES256"], "secp384r1": ["ES384"]}.get(key.curve.name, [])
    elif isinstance(key, rsa.RSAPublicKey):
        algorithms = ["RS256", "PS256"]
    elif isinstance(key, ed25519.Ed25519PublicKey):
        algorithms = ["EdDSA"]
    else:
        algorithms = []
    if not algorithms:
        raise PostureError("(signature)", "the certificate's key type cannot sign reports")
    try:
        payload = jwt.api_jws.decode(token, key=key, algorithms=algorithms)  # type: ignore[arg-type]
    except jwt.PyJWTError as exc:
        raise PostureError("(signature)", "the report's signature does not verify") from exc
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise PostureError("(body)", "signed payload is not JSON") from exc
    if not isinstance(doc, dict) or "collected_at" not in doc:
        raise PostureError("collected_at", "is required in a signed report")
    return doc
