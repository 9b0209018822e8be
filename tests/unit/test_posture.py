"""Posture reports: versions compared as versions, strict validation, explained evaluation."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from ztgateway.risk.posture import (
    PostureError,
    PosturePolicy,
    evaluate,
    parse_version,
    validate_report,
    version_at_least,
)

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC).timestamp()
GOOD: dict[str, Any] = {
    "platform": "macos",
    "os_version": "15.1",
    "last_patch": "2026-11-20",
    "disk_encrypted": True,
    "firewall": True,
    "antivirus": True,
    "screen_lock": True,
    "mdm_enrolled": True,
    "jailbroken": False,
}
POLICY = PosturePolicy(
    min_os_version=(("macos", "14.0"), ("windows", "10.0.19045")), max_patch_age_days=30
)


@pytest.mark.parametrize(
    ("actual", "minimum", "ok"),
    [
        ("15.1", "14.0", True),
        ("14", "14.0", True),
        ("14.0.0", "14", True),
        ("13.9.9", "14.0", False),
        ("10.0.19045", "10.0.19045", True),
        ("10.0.9999", "10.0.19045", False),  # as strings "10.0.9999" > "10.0.19045"
        ("6.10", "6.9", True),  # as strings "6.10" < "6.9"
        ("6.1.0-13-amd64", "6.1", True),
    ],
)
def test_versions_compare_as_versions_not_strings(actual: str, minimum: str, ok: bool) -> None:
    assert version_at_least(actual, minimum) is ok


@pytest.mark.parametrize("bad", ["", "abc", "1..2", ".1", "v15", "15.x", "1.2.3.4.5.6.7", "9" * 20])
def test_a_version_that_is_not_a_version_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a version"):
        parse_version(bad)


def test_the_documented_example_report_is_valid_and_compliant() -> None:
    report = validate_report(GOOD)
    result = evaluate(report, NOW - 60, POLICY, now=NOW)
    assert result.compliant and not result.stale
    assert result.failed == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"extra": 1}, "extra"),
        ({"platform": "beos"}, "platform"),
        ({"os_version": 15}, "os_version"),
        ({"os_version": "fifteen"}, "os_version"),
        ({"last_patch": "20/11/2026"}, "last_patch"),
        ({"disk_encrypted": "yes"}, "disk_encrypted"),
        ({"jailbroken": 0}, "jailbroken"),
        ({"collected_at": "yesterday"}, "collected_at"),
        ({"collected_at": "2026-11-22T10:00:00"}, "collected_at"),
        ({"hostname": "x" * 300}, "hostname"),
    ],
)
def test_invalid_reports_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(PostureError) as info:
        validate_report({**GOOD, **change})
    assert info.value.field == field


def test_missing_field_is_named() -> None:
    doc = dict(GOOD)
    del doc["firewall"]
    with pytest.raises(PostureError) as info:
        validate_report(doc)
    assert (info.value.field, info.value.message) == ("firewall", "is required")


def test_each_failed_check_has_its_remediation() -> None:
    report = validate_report(
        {**GOOD, "disk_encrypted": False, "os_version": "13.6", "last_patch": "2026-01-01"}
    )
    result = evaluate(report, NOW, POLICY, now=NOW)
    assert not result.compliant
    assert result.failed == ["disk_encrypted", "os_version", "patch_age"]
    fixes = {c.name: c.remediation for c in result.checks if not c.passed}
    assert "disk encryption" in fixes["disk_encrypted"]
    assert "14.0" in fixes["os_version"]


def test_jailbroken_device_fails() -> None:
    result = evaluate(validate_report({**GOOD, "jailbroken": True}), NOW, POLICY, now=NOW)
    assert result.failed == ["jailbroken"]


def test_a_stale_report_counts_as_non_compliant() -> None:
    policy = PosturePolicy(max_report_age=3600)
    result = evaluate(validate_report(GOOD), NOW - 7200, policy, now=NOW)
    assert not result.compliant and result.stale and result.failed == ["report_fresh"]
    fresh = evaluate(validate_report(GOOD), NOW - 60, policy, now=NOW)
    assert fresh.compliant


def test_no_report_at_all_is_not_compliant() -> None:
    result = evaluate(None, None, POLICY, now=NOW)
    assert not result.compliant and result.failed == ["report_missing"]


def test_unsigned_report_fails_where_signed_ones_are_required() -> None:
    result = evaluate(
        validate_report(GOOD), NOW, POLICY, now=NOW, signed=False, require_signed=True
    )
    assert result.failed == ["report_unsigned"]
