"""Windows posture through PowerShell's documented cmdlets, each asked for JSON.

| field          | query                                                                      |
|----------------|----------------------------------------------------------------------------|
| os_version     | `Get-CimInstance Win32_OperatingSystem` (Version, Caption)                 |
| disk_encrypted | `Get-BitLockerVolume -MountPoint $env:SystemDrive` (ProtectionStatus)      |
| firewall       | `Get-NetFirewallProfile` (every profile Enabled)                          |
| antivirus      | `root/SecurityCenter2 AntiVirusProduct` (productState), else Defender's    |
|                | `Get-MpComputerStatus` (Windows Server has no Security Center)             |
| screen_lock    | machine inactivity limit (InactivityTimeoutSecs), else the secure screen saver |
| last_patch     | `Get-HotFix` (newest InstalledOn)                                          |
| mdm_enrolled   | HKLM:\\SOFTWARE\\Microsoft\\Enrollments (EnrollmentState 1, ProviderID)   |

PowerShell 5.1 and 7 serialise enums and dates differently; the parsers read both.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from .probe import Collected, Finding, Probe, describe_failure

POWERSHELL = "powershell"
QUERIES: dict[str, str] = {
    "os": "Get-CimInstance Win32_OperatingSystem | Select-Object Caption,Version,BuildNumber "
    "| ConvertTo-Json",
    "bitlocker": "Get-BitLockerVolume -MountPoint $env:SystemDrive | Select-Object "
    "MountPoint,ProtectionStatus,VolumeStatus,EncryptionPercentage | ConvertTo-Json",
    "firewall": "Get-NetFirewallProfile | Select-Object Name,Enabled | ConvertTo-Json",
    "antivirus": "Get-CimInstance -Namespace root/SecurityCenter2 -ClassName AntiVirusProduct "
    "| Select-Object displayName,productState | ConvertTo-Json",
    "defender": "Get-MpComputerStatus | Select-Object AntivirusEnabled,"
    "RealTimeProtectionEnabled | ConvertTo-Json",
    "screenlock": "$m = Get-ItemProperty 'HKLM:\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion"
    "\\Policies\\System' -ErrorAction SilentlyContinue; $u = Get-ItemProperty "
    "'HKCU:\\Control Panel\\Desktop' -ErrorAction SilentlyContinue; [pscustomobject]@{"
    "InactivityTimeoutSecs=$m.InactivityTimeoutSecs; ScreenSaveActive=$u.ScreenSaveActive; "
    "ScreenSaverIsSecure=$u.ScreenSaverIsSecure; ScreenSaveTimeOut=$u.ScreenSaveTimeOut} "
    "| ConvertTo-Json",
    "hotfix": "Get-HotFix | Where-Object InstalledOn | Sort-Object InstalledOn -Descending "
    "| Select-Object -First 1 HotFixID,InstalledOn | ConvertTo-Json",
    "mdm": "Get-ChildItem HKLM:\\SOFTWARE\\Microsoft\\Enrollments | Get-ItemProperty "
    "| Where-Object { $_.ProviderID } | Select-Object ProviderID,EnrollmentState,UPN "
    "| ConvertTo-Json",
}


def powershell(script: str) -> list[str]:
    return [POWERSHELL, "-NoProfile", "-NonInteractive", "-Command", script]


def _items(text: str) -> list[dict[str, Any]]:
    """ConvertTo-Json prints one object bare and several as an array."""
    try:
        doc = json.loads(text) if text.strip() else []
    except ValueError:
        return []
    items = doc if isinstance(doc, list) else [doc]
    return [i for i in items if isinstance(i, dict)]


def _true(value: Any) -> bool:
    """A boolean from PowerShell: true, 1 (GpoBoolean / enum as number), "True"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value == 1
    return str(value).strip().lower() in ("true", "1", "on")


def parse_os(text: str) -> tuple[str, str]:
    items = _items(text)
    if not items:
        return "Windows", "0"
    return str(items[0].get("Caption") or "Windows"), str(items[0].get("Version") or "0")


def parse_bitlocker(text: str) -> Finding:
    items = _items(text)
    if not items:
        return Finding(False, "Get-BitLockerVolume: no volume (BitLocker not available?)")
    vol = items[0]
    status = vol.get("ProtectionStatus")
    # BitLocker's ProtectionStatus: 0 Off, 1 On, 2 Unknown (as numbers, or names in PS 7).
    on = status == 1 or str(status).lower() == "on"
    mount = vol.get("MountPoint", "C:")
    if on:
        return Finding(True, f"BitLocker protection on for {mount}")
    pct = vol.get("EncryptionPercentage")
    return Finding(False, f"BitLocker protection off for {mount} ({pct}% encrypted)")


def parse_firewall(text: str) -> Finding:
    profiles = _items(text)
    if not profiles:
        return Finding(False, "Get-NetFirewallProfile: no profiles")
    off = [str(p.get("Name")) for p in profiles if not _true(p.get("Enabled"))]
    if off:
        return Finding(False, f"firewall off for the {', '.join(off)} profile(s)")
    return Finding(True, "firewall on for " + ", ".join(str(p.get("Name")) for p in profiles))


def parse_security_center(text: str) -> Finding | None:
    """productState: the second byte's 0x10 bit is "real-time protection on"; the low byte
    0x10 means out-of-date signatures (as Security Center itself reads it)."""
    products = _items(text)
    if not products:
        return None
    on: list[str] = []
    off: list[str] = []
    for p in products:
        state = int(p.get("productState") or 0)
        name = str(p.get("displayName") or "antivirus")
        enabled = bool((state >> 8) & 0x10)
        current = (state & 0xFF) == 0
        (on if enabled and current else off).append(
            f"{name} ({'on' if enabled else 'off'}, "
            f"{'signatures current' if current else 'signatures out of date'})"
        )
    if on:
        return Finding(True, "; ".join(on + off))
    return Finding(False, "; ".join(off))


def parse_defender(text: str) -> Finding:
    items = _items(text)
    if not items:
        return Finding(False, "no antivirus reported (Security Center and Defender)")
    d = items[0]
    ok = _true(d.get("AntivirusEnabled")) and _true(d.get("RealTimeProtectionEnabled"))
    return Finding(ok, f"Microsoft Defender: real-time protection {'on' if ok else 'off'}")


def parse_screenlock(text: str) -> Finding:
    items = _items(text)
    data = items[0] if items else {}
    limit = data.get("InactivityTimeoutSecs")
    if isinstance(limit, int) and limit > 0:
        return Finding(True, f"machine inactivity limit {limit} s (locks the session)")
    active = str(data.get("ScreenSaveActive") or "0") == "1"
    secure = str(data.get("ScreenSaverIsSecure") or "0") == "1"
    timeout = str(data.get("ScreenSaveTimeOut") or "0")
    if active and secure and timeout.isdigit() and int(timeout) > 0:
        return Finding(True, f"password-protected screen saver after {timeout} s")
    return Finding(False, "no inactivity limit and no password-protected screen saver")


_MS_DATE = re.compile(r"/Date\((-?\d+)")


def parse_hotfix(text: str) -> Finding:
    items = _items(text)
    if not items:
        return Finding("1970-01-01", "Get-HotFix: no installed update with a date")
    fix = items[0]
    raw = fix.get("InstalledOn")
    if isinstance(raw, dict):  # PowerShell 5.1: {"value": "/Date(ms)/", "DateTime": "…"}
        raw = raw.get("value")
    text_value = str(raw or "")
    m = _MS_DATE.search(text_value)
    if m:
        date = dt.datetime.fromtimestamp(int(m.group(1)) / 1000, dt.UTC).date()
    else:
        try:
            date = dt.date.fromisoformat(text_value[:10])
        except ValueError:
            return Finding("1970-01-01", f"Get-HotFix: unreadable date {text_value[:40]!r}")
    return Finding(date.isoformat(), f"{fix.get('HotFixID', 'update')} installed {date}")


def parse_mdm(text: str) -> Finding:
    enrolled = [e for e in _items(text) if e.get("EnrollmentState") == 1 and e.get("ProviderID")]
    if enrolled:
        names = ", ".join(sorted({str(e["ProviderID"]) for e in enrolled}))
        return Finding(True, f"MDM enrolment active ({names})")
    return Finding(False, "no active MDM enrolment")


def collect(probe: Probe) -> Collected:
    result = Collected()
    os_out = probe.run(powershell(QUERIES["os"]))
    result.os_name, version = parse_os(os_out.stdout) if os_out.ok else ("Windows", "0")
    result.kernel = f"NT {version}"
    result.set("os_version", Finding(version, f"Win32_OperatingSystem: {result.os_name}"))
    result.set(
        "disk_encrypted", probe.check(powershell(QUERIES["bitlocker"]), parse_bitlocker, False)
    )
    result.set("firewall", probe.check(powershell(QUERIES["firewall"]), parse_firewall, False))
    center = probe.run(powershell(QUERIES["antivirus"]))
    found = parse_security_center(center.stdout) if center.ok else None
    if found is None:
        found = probe.check(powershell(QUERIES["defender"]), parse_defender, False)
    result.set("antivirus", found)
    result.set(
        "screen_lock", probe.check(powershell(QUERIES["screenlock"]), parse_screenlock, False)
    )
    hotfix = probe.run(powershell(QUERIES["hotfix"]))
    result.set(
        "last_patch",
        parse_hotfix(hotfix.stdout)
        if hotfix.ok
        else Finding("1970-01-01", describe_failure(hotfix, "Get-HotFix")),
    )
    result.set("mdm_enrolled", probe.check(powershell(QUERIES["mdm"]), parse_mdm, False))
    result.set("jailbroken", Finding(False, "not applicable to Windows"))
    return result
