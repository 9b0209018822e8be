"""`[zones]`, `[devices]`, `[posture]` and `[risk]`: what the device, the network and the
request's circumstances add to a decision."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..configreader import Table
from ..risk.posture import PLATFORMS, PosturePolicy, parse_version
from ..risk.scoring import BlocklistError, RiskWeights
from .listener import Network
from .routes import TRUST_LEVELS, TrustLevel, read_time_window


@dataclass(frozen=True, slots=True)
class DevicesConfig:
    auto_approve: bool = False
    owner_mismatch: Literal["deny", "risk"] = "deny"
    default_min_trust: TrustLevel = "approved"
    """The trust a route without `min_trust` needs of a presented device: a pending device
    (auto_approve = false) is refused until approved (security review I1)."""


@dataclass(frozen=True, slots=True)
class RiskConfig:
    trusted_zones: tuple[str, ...] = ()
    blocked_zones: tuple[str, ...] = ()
    blocklist: Path | None = None
    geoip_db: Path | None = None
    max_travel_speed_kmh: float = 900.0
    failed_attempts_window: float = 600.0
    failed_attempts_threshold: int = 5
    large_request_bytes: int = 10 * 1024 * 1024
    default_timezone: str = "UTC"
    default_working_hours: str = ""
    weights: RiskWeights = field(default_factory=RiskWeights)


def parse_zones(t: Table) -> dict[str, tuple[Network, ...]]:
    zones = {name: t.cidrs(name) for name in list(t.data)}
    t.done()
    return zones


def parse_devices(t: Table) -> DevicesConfig:
    cfg = DevicesConfig(
        auto_approve=t.flag("auto_approve", False),
        owner_mismatch=t.choice("owner_mismatch", ("deny", "risk"), "deny"),  # type: ignore[arg-type]
        default_min_trust=t.choice("default_min_trust", TRUST_LEVELS, "approved"),  # type: ignore[arg-type]
    )
    t.done()
    return cfg


def parse_posture(t: Table) -> PosturePolicy:
    d = PosturePolicy()
    checks = t.str_list("required_checks", d.required_checks)
    allowed = {
        "disk_encrypted",
        "firewall",
        "antivirus",
        "screen_lock",
        "mdm_enrolled",
        "not_jailbroken",
    }
    for i, c in enumerate(checks):
        if c not in allowed:
            t.fail(
                f"required_checks[{i}]",
                f"unknown check {c!r} (one of {', '.join(sorted(allowed))})",
            )
    versions = t.table("min_os_version")
    pairs = []
    for platform in list(versions.data):
        if platform not in PLATFORMS:
            versions.fail(platform, f"unknown platform (one of {', '.join(PLATFORMS)})")
        value = versions.text(platform)
        try:
            parse_version(value)
        except ValueError:
            versions.fail(platform, f"not a version: {value!r}")
        pairs.append((platform, value))
    versions.done()
    platforms = t.str_list("platforms", PLATFORMS)
    for i, p in enumerate(platforms):
        if p not in PLATFORMS:
            t.fail(f"platforms[{i}]", f"unknown platform {p!r}")
    max_patch = t.integer("max_patch_age_days", 30, min=0)
    cfg = PosturePolicy(
        required_checks=checks,
        min_os_version=tuple(pairs),
        max_patch_age_days=max_patch,
        max_report_age=t.duration("max_report_age", 86400.0, min=1.0),
        platforms=platforms,
    )
    t.done()
    return cfg


RISK_SIGNALS = tuple(f.name for f in fields(RiskWeights))


def parse_risk(t: Table, zones: dict[str, tuple[Network, ...]]) -> RiskConfig:
    trusted = t.str_list("trusted_zones")
    blocked = t.str_list("blocked_zones")
    for key, names in (("trusted_zones", trusted), ("blocked_zones", blocked)):
        for i, z in enumerate(names):
            if z not in zones:
                t.fail(f"{key}[{i}]", f"unknown zone {z!r} (define it under [zones])")
    wt = t.table("weights")
    values = {}
    for name in list(wt.data):
        if name not in RISK_SIGNALS:
            wt.fail(name, f"unknown signal (one of {', '.join(RISK_SIGNALS)})")
        values[name] = wt.number(name, 0.0, min=0.0, max=1.0)
    wt.done()
    try:
        weights = RiskWeights.from_mapping(values)
    except ValueError as exc:
        t.fail("weights", str(exc))
    tz = t.text("default_timezone", "UTC")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        t.fail("default_timezone", f"unknown time zone {tz!r}")
    hours = t.text("default_working_hours", "")
    if hours:
        read_time_window(hours, ZoneInfo(tz), t, "default_working_hours")
    blocklist = t.path("blocklist")
    if blocklist is not None:
        from ..risk.scoring import read_blocklist

        try:
            read_blocklist(blocklist)
        except BlocklistError as exc:
            t.fail("blocklist", str(exc))
    cfg = RiskConfig(
        trusted_zones=trusted,
        blocked_zones=blocked,
        blocklist=blocklist,
        geoip_db=t.path("geoip_db", must_exist=False),
        max_travel_speed_kmh=t.number("max_travel_speed_kmh", 900.0, min=1.0),
        failed_attempts_window=t.duration("failed_attempts_window", 600.0, min=1.0),
        failed_attempts_threshold=t.integer("failed_attempts_threshold", 5, min=1),
        large_request_bytes=t.integer("large_request_bytes", 10 * 1024 * 1024, min=1),
        default_timezone=tz,
        default_working_hours=hours,
        weights=weights,
    )
    t.done()
    return cfg
