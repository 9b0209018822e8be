"""Each posture check said to a person: what it is, what it means, and what the result is.

A check's name says what is *required* in one case and what is *forbidden* in another
(`jailbroken` passes when the device is not): the page used to print the name beside a tick,
so a healthy phone read "✓ jailbroken". Here every check has its own words for passing and
failing, and a test holds every check `posture.evaluate` can produce to having them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..risk.posture import CheckResult


@dataclass(frozen=True, slots=True)
class CheckText:
    title: str
    meaning: str
    passed: str
    failed: str


CHECKS: dict[str, CheckText] = {
    "disk_encrypted": CheckText(
        "Disk encryption",
        "Checks that the disk is encrypted, so a lost or stolen device does not give away its "
        "data.",
        "the disk is encrypted",
        "the disk is not encrypted",
    ),
    "firewall": CheckText(
        "Firewall",
        "Checks that the device's firewall is on and blocks connections nobody asked for.",
        "the firewall is on",
        "the firewall is off",
    ),
    "antivirus": CheckText(
        "Malware protection",
        "Checks that antivirus or endpoint protection is installed and running.",
        "protection is running",
        "no protection is running",
    ),
    "screen_lock": CheckText(
        "Screen lock",
        "Checks that the screen locks by itself after a few idle minutes and needs a "
        "password or PIN.",
        "the screen lock is set",
        "no screen lock is set",
    ),
    "mdm_enrolled": CheckText(
        "Device management",
        "Checks that the device is enrolled in the organisation's device management (MDM).",
        "the device is managed",
        "the device is not managed",
    ),
    "jailbroken": CheckText(
        "System integrity",
        "Checks that the operating system is the maker's, not jailbroken or rooted (which "
        "disables its protections).",
        "not jailbroken or rooted",
        "the device is jailbroken or rooted",
    ),
    "os_version": CheckText(
        "Operating system version",
        "Checks that the operating system is at least the version this organisation requires.",
        "recent enough",
        "too old",
    ),
    "patch_age": CheckText(
        "System updates",
        "Checks that the latest system updates were installed recently.",
        "up to date",
        "updates are overdue",
    ),
    "report_fresh": CheckText(
        "Recent report",
        "Checks that the device agent reported the device's state recently.",
        "reported recently",
        "the last report is too old",
    ),
    "report_missing": CheckText(
        "Device report",
        "Checks that the device agent reports the device's security state to the gateway.",
        "received",
        "no report has been received from this device",
    ),
    "report_unsigned": CheckText(
        "Signed report",
        "Checks that the device agent signs its reports with the device's key.",
        "signed",
        "the report was not signed",
    ),
    "platform": CheckText(
        "Platform",
        "Checks that the device runs an operating system this application supports.",
        "supported",
        "not supported",
    ),
}


@dataclass(frozen=True, slots=True)
class CheckView:
    """One check as the device page lists it."""

    name: str
    title: str
    meaning: str
    result: str
    passed: bool
    detail: str
    remediation: str


def check_text(check: CheckResult) -> CheckView:
    words = CHECKS.get(check.name)
    if words is None:  # a check added without words: said plainly, never with a bare tick
        title = check.name.replace("_", " ").capitalize()
        words = CheckText(title, "", "passed", "failed")
    return CheckView(
        name=check.name,
        title=words.title,
        meaning=words.meaning,
        result=words.passed if check.passed else words.failed,
        passed=check.passed,
        detail=check.detail,
        remediation=check.remediation,
    )
