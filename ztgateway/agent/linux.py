"""Linux posture, read from the system itself.

- OS: /etc/os-release (os-release(5)) names the distribution; `os_version` is the kernel
  release, which is what `[posture.min_os_version] linux` compares (distribution versions do
  not compare across distributions, kernels do).
- Disk encryption: `lsblk --json` gives the block-device tree; a mounted filesystem or swap is
  encrypted when a dm-crypt device (`TYPE crypt`: LUKS, plain dm-crypt, with or without LVM
  around it) lies between it and the disk. Every local mount counts except /boot and the EFI
  partition, which cannot be encrypted for the firmware to boot; loop devices (snaps, images)
  are read-only copies of packages and are skipped.
- Firewall: ufw, firewalld, the nftables ruleset (`nft -j`), then iptables: on when an input
  filter refuses traffic (a drop policy or a drop/reject rule on the input hook).
- Screen lock: only where a desktop exists. GNOME (gsettings lock-enabled and idle-delay) and
  KDE Plasma (kscreenlockerrc) are read for each graphical session's user; a machine without
  an installed desktop has no screen to lock.
- Last patch: the newest upgrade or install in dpkg's and apt's logs, dnf's rpm log, or the
  rpm database's install times.
- Antivirus / EDR and MDM: a known agent's process is running (/proc/*/comm).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from .probe import Collected, Finding, Output, Probe, describe_failure, first_line

# /boot and the EFI system partition must stay readable by the firmware and boot loader.
UNENCRYPTABLE_MOUNTS = ("/boot", "/boot/efi", "/efi")

# Process names (as /proc/*/comm shows them: at most 15 characters) of security agents.
ANTIVIRUS_PROCESSES = {
    "clamd": "ClamAV",
    "falcon-sensor": "CrowdStrike Falcon",
    "wdavdaemon": "Microsoft Defender for Endpoint",
    "sentinelone-age": "SentinelOne",
    "s1-agent": "SentinelOne",
    "sophos_threat_d": "Sophos",
    "soph_thr_detect": "Sophos",
    "ds_agent": "Trend Micro Deep Security",
    "cbagentd": "VMware Carbon Black",
    "elastic-endpoin": "Elastic Defend",
    "eset_daemon": "ESET",
    "esets_daemon": "ESET",
}
MDM_PROCESSES = {
    "intune-daemon": "Microsoft Intune",
    "intune-agent": "Microsoft Intune",
    "microsoft-ident": "Microsoft Intune (identity broker)",
    "landscape-clien": "Canonical Landscape",
    "landscape-monit": "Canonical Landscape",
    "jamf-agent": "Jamf Protect",
    "kandji-agent": "Kandji",
    "fleet-desktop": "Fleet",
    "orbit": "Fleet (orbit)",
    "osqueryd": "osquery (fleet management)",
}


# -- OS ------------------------------------------------------------------------------------


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5): KEY=value lines, values optionally quoted with shell-style escapes."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
            value = re.sub(r"\\(.)", r"\1", value)
        out[key.strip()] = value
    return out


def os_names(probe: Probe) -> tuple[str, str]:
    """(PRETTY_NAME, kernel release)."""
    text = probe.read("/etc/os-release") or probe.read("/usr/lib/os-release") or ""
    info = parse_os_release(text)
    name = info.get("PRETTY_NAME") or " ".join(
        x for x in (info.get("NAME", ""), info.get("VERSION", "")) if x
    )
    kernel = (probe.read("/proc/sys/kernel/osrelease") or "").strip()
    if not kernel:
        out = probe.run(["uname", "-r"])
        kernel = out.stdout.strip() if out.ok else ""
    return name or "Linux", kernel


def kernel_version(kernel: str) -> str:
    """`6.1.0-13-amd64` as the report's os_version (a version, then an optional suffix)."""
    m = re.match(r"(\d+(?:\.\d+){0,5})(.*)", kernel)
    if not m:
        return "0"
    suffix = m.group(2)
    if suffix and suffix[0] not in "-+~ ":
        suffix = "-" + suffix
    return (m.group(1) + suffix)[:64]


# -- disk encryption -----------------------------------------------------------------------


def _mountpoints(node: dict[str, Any]) -> list[str]:
    points = node.get("mountpoints")
    if points is None:
        single = node.get("mountpoint")
        points = [single] if single else []
    return [p for p in points if isinstance(p, str) and p]


def _walk(
    nodes: list[Any], chain: tuple[dict[str, Any], ...]
) -> Iterator[tuple[str, tuple[dict[str, Any], ...]]]:
    for node in nodes:
        if not isinstance(node, dict):
            continue
        here = (*chain, node)
        for point in _mountpoints(node):
            yield point, here
        yield from _walk(node.get("children") or [], here)


def parse_lsblk(text: str, root_fs: str = "") -> Finding:
    """`lsblk --json --output NAME,TYPE,FSTYPE,MOUNTPOINTS` -> whether every local mount and
    swap sits on dm-crypt. `root_fs` (from /proc/self/mounts) explains a / that is not on a
    block device (overlay, NFS)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return Finding(False, "lsblk: output is not JSON")
    devices = doc.get("blockdevices") if isinstance(doc, dict) else None
    if not isinstance(devices, list):
        return Finding(False, "lsblk: no blockdevices")
    encrypted: list[str] = []
    plain: list[str] = []
    seen_root = False
    for point, chain in _walk(devices, ()):
        if point in UNENCRYPTABLE_MOUNTS or point.startswith("/snap/"):
            continue
        if any(n.get("type") in ("loop", "rom") for n in chain):
            continue
        seen_root = seen_root or point == "/"
        crypt = next((n for n in chain if n.get("type") == "crypt"), None)
        if crypt is not None:
            encrypted.append(f"{point} on dm-crypt {crypt.get('name')}")
        else:
            plain.append(f"{point} on {chain[-1].get('name')} ({chain[-1].get('type')})")
    if not seen_root:
        how = f" ({root_fs})" if root_fs else ""
        return Finding(False, f"/ is not on a local block device{how}: cannot be shown encrypted")
    if plain:
        return Finding(False, "not encrypted: " + "; ".join(plain))
    return Finding(True, "; ".join(encrypted))


def root_filesystem(probe: Probe) -> str:
    for line in (probe.read("/proc/self/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "/":
            return f"{parts[2]} from {parts[0]}"
    return ""


def disk_encryption(probe: Probe) -> Finding:
    out = probe.run(["lsblk", "--json", "--output", "NAME,TYPE,FSTYPE,MOUNTPOINTS"])
    if not out.ok and not out.missing:
        # util-linux before 2.37 knows only the singular MOUNTPOINT column.
        out = probe.run(["lsblk", "--json", "--output", "NAME,TYPE,FSTYPE,MOUNTPOINT"])
    if not out.ok:
        return Finding(False, describe_failure(out, "lsblk"))
    return parse_lsblk(out.stdout, root_filesystem(probe))


# -- firewall ------------------------------------------------------------------------------


def parse_ufw(text: str) -> Finding | None:
    if first_line(text).lower() == "status: active":
        return Finding(True, "ufw: active")
    return None


def parse_firewalld(text: str) -> Finding | None:
    if text.strip() == "running":
        return Finding(True, "firewalld: running")
    return None


def _refuses(expr: Any) -> bool:
    return isinstance(expr, list) and any(
        isinstance(e, dict) and ("drop" in e or "reject" in e) for e in expr
    )


def parse_nft(text: str) -> Finding | None:
    """`nft -j list ruleset`: an input-hook filter chain that drops by policy or by rule."""
    try:
        items = json.loads(text).get("nftables", [])
    except (ValueError, AttributeError):
        return None
    input_chains: dict[tuple[str, str, str], str] = {}
    for item in items:
        chain = item.get("chain") if isinstance(item, dict) else None
        if isinstance(chain, dict) and chain.get("hook") == "input":
            key = (str(chain.get("family")), str(chain.get("table")), str(chain.get("name")))
            input_chains[key] = str(chain.get("policy", "accept"))
    for (family, table, name), policy in input_chains.items():
        if policy == "drop":
            return Finding(True, f"nftables: {family} {table} {name}: input policy drop")
    refusing = 0
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        key = (str(rule.get("family")), str(rule.get("table")), str(rule.get("chain")))
        if key in input_chains and _refuses(rule.get("expr")):
            refusing += 1
    if refusing:
        return Finding(True, f"nftables: {refusing} drop/reject rules on the input hook")
    return None


def parse_iptables(text: str) -> Finding | None:
    """`iptables -S INPUT`: a DROP/REJECT policy, or rules that drop, reject or jump elsewhere
    (ufw, firewalld and most tools hang their own chains off INPUT)."""
    rules = [line.split() for line in text.splitlines() if line.strip()]
    for r in rules:
        if r[:2] == ["-P", "INPUT"] and len(r) > 2 and r[2] in ("DROP", "REJECT"):
            return Finding(True, f"iptables: INPUT policy {r[2]}")
    filtering = []
    for r in rules:
        if r[:2] == ["-A", "INPUT"] and "-j" in r[:-1]:
            target = r[r.index("-j") + 1]
            if target not in ("ACCEPT", "RETURN", "LOG"):
                filtering.append(r)
    if filtering:
        return Finding(True, f"iptables: {len(filtering)} filtering rules on INPUT")
    return None


# Each tool that can filter input, in the order asked: its command, its reader, and what an
# answer without a filter means.
FIREWALL_TOOLS: tuple[tuple[tuple[str, ...], Callable[[str], Finding | None], str, str], ...] = (
    (("ufw", "status"), parse_ufw, "ufw", "ufw: inactive"),
    (("firewall-cmd", "--state"), parse_firewalld, "firewalld", "firewalld: not running"),
    (("nft", "-j", "list", "ruleset"), parse_nft, "nft", "nftables: no input filter"),
    (("iptables", "-S", "INPUT"), parse_iptables, "iptables", "iptables: INPUT accepts everything"),
)


def firewall(probe: Probe) -> Finding:
    seen: list[str] = []
    for argv, parse, what, unfiltered in FIREWALL_TOOLS:
        out = probe.run(list(argv))
        if not out.ok:
            seen.append(describe_failure(out, what))
            continue
        found = parse(out.stdout)
        if found:
            return found
        seen.append(unfiltered)
    return Finding(False, "; ".join(seen))


# -- screen lock ---------------------------------------------------------------------------


def graphical_sessions(probe: Probe) -> list[tuple[str, str]] | None:
    """(user, desktop) of each local graphical session, from logind; None without logind."""
    listing = probe.run(["loginctl", "list-sessions", "--no-legend"])
    if not listing.ok:
        return None
    out: list[tuple[str, str]] = []
    for line in listing.stdout.splitlines():
        parts = line.split()
        if not parts:
            continue
        show = probe.run(
            ["loginctl", "show-session", parts[0], "-p", "Type", "-p", "Name", "-p", "Desktop"]
        )
        props = dict(line.split("=", 1) for line in show.stdout.splitlines() if "=" in line)
        if props.get("Type") in ("x11", "wayland", "mir"):
            out.append((props.get("Name", ""), props.get("Desktop", "")))
    return out


def desktop_installed(probe: Probe) -> bool:
    return bool(
        probe.glob("/usr/share/xsessions", "*.desktop")
        or probe.glob("/usr/share/wayland-sessions", "*.desktop")
    )


def parse_gsettings(lock_enabled: str, idle_delay: str) -> Finding:
    """`gsettings get org.gnome.desktop.screensaver lock-enabled` and
    `… org.gnome.desktop.session idle-delay` (`uint32 300`; 0 never blanks, so never locks)."""
    enabled = lock_enabled.strip() == "true"
    m = re.search(r"(\d+)\s*$", idle_delay.strip())
    delay = int(m.group(1)) if m else 0
    if not enabled:
        return Finding(False, "GNOME: screen lock is off")
    if delay == 0:
        return Finding(False, "GNOME: the screen never blanks (idle-delay 0), so it never locks")
    return Finding(True, f"GNOME: locks after {delay} s idle")


def parse_kscreenlocker(text: str | None) -> Finding:
    """~/.config/kscreenlockerrc: [Daemon] Autolock (default true), Timeout minutes (default 5)."""
    autolock, timeout, section = True, 5, ""
    for raw in (text or "").splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Daemon]" and "=" in line:
            key, _, value = line.partition("=")
            if key.strip() == "Autolock":
                autolock = value.strip().lower() != "false"
            elif key.strip() == "Timeout" and value.strip().isdigit():
                timeout = int(value.strip())
    if not autolock or timeout == 0:
        return Finding(False, "KDE Plasma: automatic screen lock is off")
    return Finding(True, f"KDE Plasma: locks after {timeout} min idle")


def _home(probe: Probe, user: str) -> str | None:
    for line in (probe.read("/etc/passwd") or "").splitlines():
        parts = line.split(":")
        if len(parts) >= 6 and parts[0] == user:
            return parts[5]
    return None


def _gsettings(probe: Probe, user: str, schema: str, key: str) -> Output:
    argv = ["gsettings", "get", schema, key]
    if probe.uid == 0 and user != "root":
        # As the session's user, on its D-Bus session bus (the settings live in its dconf).
        uid_line = probe.run(["id", "-u", user])
        uid = uid_line.stdout.strip()
        bus = f"DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/{uid}/bus"
        argv = ["runuser", "-u", user, "--", "env", bus, *argv]
    return probe.run(argv)


def screen_lock(probe: Probe) -> Finding:
    sessions = graphical_sessions(probe)
    if not sessions:
        if not desktop_installed(probe):
            return Finding(True, "no graphical desktop installed: no screen to lock")
        if sessions is None:
            return Finding(False, "a desktop is installed but logind cannot be asked (loginctl)")
        return Finding(
            True, "a desktop is installed but nobody is signed in to it (checked again next run)"
        )
    results: list[Finding] = []
    for user, desktop in sessions:
        name = desktop.lower()
        if "kde" in name or "plasma" in name:
            home = _home(probe, user)
            text = probe.read(f"{home}/.config/kscreenlockerrc") if home else None
            results.append(parse_kscreenlocker(text))
            continue
        enabled = _gsettings(probe, user, "org.gnome.desktop.screensaver", "lock-enabled")
        delay = _gsettings(probe, user, "org.gnome.desktop.session", "idle-delay")
        if enabled.ok and delay.ok:
            results.append(parse_gsettings(enabled.stdout, delay.stdout))
        else:
            results.append(
                Finding(
                    False,
                    f"{user}: cannot read the lock setting of {desktop or 'this desktop'} "
                    f"({describe_failure(enabled, 'gsettings')})",
                )
            )
    ok = all(r.value is True for r in results)
    return Finding(ok, "; ".join(r.evidence for r in results))


# -- last patch ----------------------------------------------------------------------------

_DPKG_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2}) \d{2}:\d{2}:\d{2} (upgrade|install) (\S+)", re.M)
_APT_START = re.compile(r"^Start-Date: (\d{4}-\d{2}-\d{2})", re.M)
_DNF_LINE = re.compile(
    r"^(\d{4}-\d{2}-\d{2})T\S+ \S+ (?:Upgrade|Upgraded|Install|Installed): (\S+)", re.M
)


def parse_dpkg_log(text: str) -> tuple[str, str] | None:
    """The newest (date, package) upgraded or installed in a dpkg.log."""
    found = _DPKG_LINE.findall(text)
    if not found:
        return None
    date, _, package = max(found, key=lambda f: f[0])
    return date, package


def parse_apt_history(text: str) -> str | None:
    """The newest Start-Date of an apt run that upgraded or installed something."""
    dates = []
    for block in text.split("\n\n"):
        m = _APT_START.search(block)
        if m and re.search(r"^(Upgrade|Install):", block, re.M):
            dates.append(m.group(1))
    return max(dates) if dates else None


def parse_dnf_log(text: str) -> tuple[str, str] | None:
    found = _DNF_LINE.findall(text)
    return max(found, key=lambda f: f[0]) if found else None


def parse_rpm_install_times(text: str) -> str | None:
    """`rpm -qa --queryformat '%{INSTALLTIME}\\n'`: the newest install, as a UTC date."""
    times = [int(t) for t in text.split() if t.isdigit()]
    if not times:
        return None
    return dt.datetime.fromtimestamp(max(times), dt.UTC).date().isoformat()


def last_patch(probe: Probe) -> Finding:
    candidates: list[tuple[str, str]] = []
    for log in probe.glob("/var/log", "dpkg.log*"):
        found = parse_dpkg_log(probe.read(log) or "")
        if found:
            candidates.append((found[0], f"{log}: {found[1]}"))
    for log in probe.glob("/var/log/apt", "history.log*"):
        date = parse_apt_history(probe.read(log) or "")
        if date:
            candidates.append((date, f"{log}: apt run"))
    for log in probe.glob("/var/log", "dnf.rpm.log*"):
        found = parse_dnf_log(probe.read(log) or "")
        if found:
            candidates.append((found[0], f"{log}: {found[1]}"))
    if not candidates:
        rpm = probe.run(["rpm", "-qa", "--queryformat", "%{INSTALLTIME}\\n"])
        date = parse_rpm_install_times(rpm.stdout) if rpm.ok else None
        if date:
            candidates.append((date, "rpm database: newest install time"))
    if not candidates:
        # Unknown is reported as never patched: the gateway's patch_age check then fails,
        # which is the safe reading of "cannot tell".
        return Finding("1970-01-01", "no package manager log found (dpkg, apt, dnf, rpm)")
    date, source = max(candidates)
    return Finding(date, f"last upgrade or install {date} ({source})")


# -- security agents -----------------------------------------------------------------------


def running_processes(probe: Probe) -> set[str]:
    names = set()
    for comm in probe.glob("/proc", "[0-9]*/comm"):
        text = probe.read(comm)
        if text:
            names.add(text.strip())
    return names


def known_agent(processes: set[str], table: dict[str, str], what: str) -> Finding:
    found = sorted({label for name, label in table.items() if name in processes})
    if found:
        return Finding(True, f"running: {', '.join(found)}")
    return Finding(
        False, f"no {what} running (looked for {', '.join(sorted(set(table.values())))})"
    )


# -- the report ----------------------------------------------------------------------------


def collect(probe: Probe) -> Collected:
    result = Collected()
    result.os_name, result.kernel = os_names(probe)
    result.set(
        "os_version", Finding(kernel_version(result.kernel), f"kernel {result.kernel or '?'}")
    )
    result.set("disk_encrypted", disk_encryption(probe))
    result.set("firewall", firewall(probe))
    result.set("screen_lock", screen_lock(probe))
    result.set("last_patch", last_patch(probe))
    processes = running_processes(probe)
    result.set("antivirus", known_agent(processes, ANTIVIRUS_PROCESSES, "antivirus or EDR agent"))
    result.set("mdm_enrolled", known_agent(processes, MDM_PROCESSES, "device management agent"))
    result.set("jailbroken", Finding(False, "not applicable to Linux"))
    return result
