"""macOS posture through Apple's documented commands (each parser is tested on recorded output).

| field          | command                                                          |
|----------------|------------------------------------------------------------------|
| os_version     | `sw_vers` (ProductVersion), `uname -r` (Darwin kernel)           |
| disk_encrypted | `fdesetup status` ("FileVault is On.")                           |
| firewall       | `/usr/libexec/ApplicationFirewall/socketfilterfw --getglobalstate` |
| screen_lock    | `sysadminctl -screenLock status` (writes to stderr)              |
| last_patch     | `system_profiler SPInstallHistoryDataType -json`                 |
| antivirus      | `spctl --status` (Gatekeeper with XProtect, built in)            |
| mdm_enrolled   | `profiles status -type enrollment`                               |
| jailbroken     | `csrutil status`: System Integrity Protection turned off         |
"""

from __future__ import annotations

import json
import re

from .probe import Collected, Finding, Probe, describe_failure, first_line

SOCKETFILTERFW = "/usr/libexec/ApplicationFirewall/socketfilterfw"
# Background data updates (malware signatures, compatibility lists) arrive daily and say
# nothing about whether the system itself is patched.
_DATA_UPDATES = ("XProtect", "MRT", "Gatekeeper", "ConfigData", "Bridge OS")


def parse_sw_vers(text: str) -> tuple[str, str]:
    """(ProductName ProductVersion, ProductVersion) from `sw_vers`."""
    info = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    version = info.get("ProductVersion", "")
    return f"{info.get('ProductName', 'macOS')} {version}".strip(), version


def parse_fdesetup(text: str) -> Finding:
    line = first_line(text)
    if line.startswith("FileVault is On"):
        return Finding(True, "FileVault is on")
    if "Encryption in progress" in text:
        return Finding(False, f"FileVault is still encrypting: {line}")
    return Finding(False, line or "fdesetup said nothing")


def parse_socketfilterfw(text: str) -> Finding:
    m = re.search(r"State = (\d)", text)
    if m and int(m.group(1)) >= 1:
        block_all = " (blocking all incoming)" if m.group(1) == "2" else ""
        return Finding(True, f"application firewall enabled{block_all}")
    return Finding(False, first_line(text) or "application firewall state unknown")


def parse_screenlock(text: str) -> Finding:
    """`sysadminctl -screenLock status`: "screenLock delay is 300 seconds", "… is immediate",
    or "screenLock is off" (after a log prefix)."""
    if re.search(r"screenLock is off", text):
        return Finding(False, "screen lock is off")
    if re.search(r"screenLock delay is immediate", text):
        return Finding(True, "password required immediately after sleep or screen saver")
    m = re.search(r"screenLock delay is (\d+) seconds", text)
    if m:
        return Finding(True, f"password required {m.group(1)} s after sleep or screen saver")
    return Finding(False, f"unrecognised sysadminctl output: {first_line(text)[:80]}")


def parse_install_history(text: str) -> Finding:
    try:
        items = json.loads(text).get("SPInstallHistoryDataType", [])
    except (ValueError, AttributeError):
        return Finding("1970-01-01", "system_profiler: output is not JSON")
    best: tuple[str, str] | None = None
    for item in items:
        if not isinstance(item, dict):
            continue
        name = str(item.get("_name", ""))
        date = str(item.get("install_date", ""))[:10]
        if item.get("package_source") != "package_source_apple" or not re.fullmatch(
            r"\d{4}-\d{2}-\d{2}", date
        ):
            continue
        if any(word in name for word in _DATA_UPDATES):
            continue
        if best is None or date > best[0]:
            best = (date, name)
    if best is None:
        return Finding("1970-01-01", "no Apple software update in the install history")
    return Finding(best[0], f"{best[1]} installed {best[0]}")


def parse_spctl(text: str) -> Finding:
    if "assessments enabled" in text:
        return Finding(True, "Gatekeeper and XProtect enabled")
    return Finding(False, f"Gatekeeper: {first_line(text) or 'unknown'}")


def parse_profiles(text: str) -> Finding:
    m = re.search(r"MDM enrollment:\s*(Yes[^\n]*|No)", text)
    if m and m.group(1).startswith("Yes"):
        dep = re.search(r"Enrolled via DEP:\s*(Yes|No)", text)
        via = " via Automated Device Enrollment" if dep and dep.group(1) == "Yes" else ""
        return Finding(True, f"MDM enrolled{via}: {m.group(1)}")
    return Finding(False, "not enrolled in an MDM")


def parse_csrutil(text: str) -> Finding:
    if re.search(r"System Integrity Protection status: enabled", text):
        return Finding(False, "System Integrity Protection enabled")
    return Finding(True, f"System Integrity Protection is not fully on: {first_line(text)}")


def collect(probe: Probe) -> Collected:
    result = Collected()
    sw = probe.run(["sw_vers"])
    result.os_name, version = parse_sw_vers(sw.stdout) if sw.ok else ("macOS", "0")
    kernel = probe.run(["uname", "-r"])
    result.kernel = f"Darwin {kernel.stdout.strip()}" if kernel.ok else ""
    result.set("os_version", Finding(version or "0", f"sw_vers: {result.os_name}"))

    result.set("disk_encrypted", probe.check(["fdesetup", "status"], parse_fdesetup, False))
    result.set(
        "firewall", probe.check([SOCKETFILTERFW, "--getglobalstate"], parse_socketfilterfw, False)
    )
    result.set(
        "screen_lock",
        probe.check(["sysadminctl", "-screenLock", "status"], parse_screenlock, False),
    )
    history = probe.run(["system_profiler", "SPInstallHistoryDataType", "-json"])
    result.set(
        "last_patch",
        parse_install_history(history.stdout)
        if history.ok
        else Finding("1970-01-01", describe_failure(history, "system_profiler")),
    )
    result.set("antivirus", probe.check(["spctl", "--status"], parse_spctl, False))
    result.set(
        "mdm_enrolled",
        probe.check(["profiles", "status", "-type", "enrollment"], parse_profiles, False),
    )
    # Cannot tell whether SIP is on: reported as off, the safe reading.
    result.set("jailbroken", probe.check(["csrutil", "status"], parse_csrutil, True))
    return result
