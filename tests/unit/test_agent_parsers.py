"""The agent's readers, each on output recorded from a real system of its kind.

Linux is also read for real on this machine (tests/e2e/test_agent.py); macOS and Windows only
here, through the same collectors with their commands answered from recordings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from ztgateway.agent import linux, macos, windows
from ztgateway.agent.probe import Output, Probe, Runner
from ztgateway.agent.report import build_report, sign_report
from ztgateway.clock import ManualClock
from ztgateway.risk.posture import validate_report, verify_signed_report


def recorded(answers: Mapping[tuple[str, ...], Output | str]) -> Runner:
    """A runner answering from recordings; a command not recorded is not installed."""

    def run(argv: Sequence[str]) -> Output:
        answer = answers.get(tuple(argv))
        if answer is None:
            return Output(127, "", f"{argv[0]}: not installed")
        return Output(0, answer) if isinstance(answer, str) else answer

    return run


# -- Linux: disk encryption ------------------------------------------------------------------

LSBLK_LUKS_LVM = json.dumps(
    {
        "blockdevices": [
            {
                "name": "nvme0n1",
                "type": "disk",
                "fstype": None,
                "mountpoints": [None],
                "children": [
                    {
                        "name": "nvme0n1p1",
                        "type": "part",
                        "fstype": "vfat",
                        "mountpoints": ["/boot/efi"],
                    },
                    {
                        "name": "nvme0n1p2",
                        "type": "part",
                        "fstype": "ext4",
                        "mountpoints": ["/boot"],
                    },
                    {
                        "name": "nvme0n1p3",
                        "type": "part",
                        "fstype": "crypto_LUKS",
                        "mountpoints": [None],
                        "children": [
                            {
                                "name": "nvme0n1p3_crypt",
                                "type": "crypt",
                                "fstype": "LVM2_member",
                                "mountpoints": [None],
                                "children": [
                                    {
                                        "name": "vg-root",
                                        "type": "lvm",
                                        "fstype": "ext4",
                                        "mountpoints": ["/"],
                                    },
                                    {
                                        "name": "vg-swap",
                                        "type": "lvm",
                                        "fstype": "swap",
                                        "mountpoints": ["[SWAP]"],
                                    },
                                ],
                            }
                        ],
                    },
                ],
            },
            {
                "name": "loop0",
                "type": "loop",
                "fstype": "squashfs",
                "mountpoints": ["/snap/core22/1380"],
            },
        ]
    }
)

LSBLK_HOME_ONLY = """{
   "blockdevices": [
      {"name":"sda", "type":"disk", "fstype":null, "mountpoint":null,
         "children": [
            {"name":"sda1", "type":"part", "fstype":"ext4", "mountpoint":"/"},
            {"name":"sda2", "type":"part", "fstype":"crypto_LUKS", "mountpoint":null,
               "children": [
                  {"name":"home", "type":"crypt", "fstype":"ext4", "mountpoint":"/home"}
               ]
            }
         ]
      }
   ]
}"""


def test_root_and_swap_on_luks_under_lvm_count_as_encrypted() -> None:
    found = linux.parse_lsblk(LSBLK_LUKS_LVM)
    assert found.value is True
    assert found.evidence == ("/ on dm-crypt nvme0n1p3_crypt; [SWAP] on dm-crypt nvme0n1p3_crypt")


def test_an_encrypted_home_does_not_make_a_plain_root_encrypted() -> None:
    # Older util-linux: the singular "mountpoint" column.
    found = linux.parse_lsblk(LSBLK_HOME_ONLY)
    assert found.value is False
    assert found.evidence == "not encrypted: / on sda1 (part)"


def test_a_root_that_is_not_a_block_device_is_not_shown_encrypted() -> None:
    found = linux.parse_lsblk('{"blockdevices": []}', "overlay from overlay")
    assert found.value is False
    assert "(overlay from overlay)" in found.evidence


# -- Linux: firewall ---------------------------------------------------------------------------

NFT_DROP_POLICY = json.dumps(
    {
        "nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "filter", "handle": 1}},
            {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1,
                       "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
            {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 4,
                      "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                          "right": ["established", "related"]}}, {"accept": None}]}},
        ]
    }
)  # fmt: skip
NFT_REJECT_RULE = json.dumps(
    {
        "nftables": [
            {"chain": {"family": "ip", "table": "fw", "name": "in", "hook": "input", "policy": "accept"}},
            {"rule": {"family": "ip", "table": "fw", "chain": "in",
                      "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                          "right": 22}}, {"reject": None}]}},
        ]
    }
)  # fmt: skip
NFT_NAT_ONLY = json.dumps(
    {
        "nftables": [
            {"chain": {"family": "ip", "table": "nat", "name": "post", "hook": "postrouting", "policy": "accept"}},
            {"rule": {"family": "ip", "table": "nat", "chain": "post", "expr": [{"masquerade": None}]}},
        ]
    }
)  # fmt: skip
IPTABLES_UFW = """-P INPUT DROP
-A INPUT -j ufw-before-logging-input
-A INPUT -j ufw-before-input
"""


def test_nftables_input_filters_are_read() -> None:
    drop = linux.parse_nft(NFT_DROP_POLICY)
    assert drop is not None and drop.evidence == "nftables: inet filter input: input policy drop"
    reject = linux.parse_nft(NFT_REJECT_RULE)
    assert (
        reject is not None and reject.evidence == "nftables: 1 drop/reject rules on the input hook"
    )
    assert linux.parse_nft(NFT_NAT_ONLY) is None


def test_iptables_policy_and_rules_are_read() -> None:
    found = linux.parse_iptables(IPTABLES_UFW)
    assert found is not None and found.evidence == "iptables: INPUT policy DROP"
    jumps = linux.parse_iptables("-P INPUT ACCEPT\n-A INPUT -p tcp --dport 22 -j REJECT\n")
    assert jumps is not None and jumps.evidence == "iptables: 1 filtering rules on INPUT"
    assert linux.parse_iptables("-P INPUT ACCEPT\n-A INPUT -i lo -j ACCEPT\n") is None


def test_firewall_tries_each_tool_and_says_what_it_saw() -> None:
    ufw_active = "Status: active\n\nTo                         Action      From\n--                         ------      ----\n22/tcp                     ALLOW       Anywhere\n"
    probe = Probe(run=recorded({("ufw", "status"): ufw_active}))
    assert linux.firewall(probe).evidence == "ufw: active"
    denied = Output(1, "", "Error: Operation not permitted\n")
    probe = Probe(
        run=recorded(
            {
                ("ufw", "status"): "Status: inactive\n",
                ("nft", "-j", "list", "ruleset"): denied,
                ("iptables", "-S", "INPUT"): "-P INPUT ACCEPT\n",
            }
        )
    )
    found = linux.firewall(probe)
    assert found.value is False
    assert found.evidence == (
        "ufw: inactive; firewalld: not installed; nft: not allowed (run the agent as root or "
        "with the capability it needs); iptables: INPUT accepts everything"
    )


# -- Linux: screen lock --------------------------------------------------------------------


def _desktop_tree(root: Path, *, sessions: bool = True) -> None:
    (root / "usr/share/xsessions").mkdir(parents=True)
    (root / "usr/share/xsessions/gnome.desktop").write_text("[Desktop Entry]\n")
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000:Alice:/home/alice:/bin/bash\n"
    )


LOGINCTL = "      2 1000 alice seat0 tty2\n      c1  120 gdm   seat0 tty1\n"


def _gnome(lock: str, delay: str) -> dict[tuple[str, ...], Output | str]:
    bus = "DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/1000/bus"
    return {
        ("loginctl", "list-sessions", "--no-legend"): LOGINCTL,
        ("loginctl", "show-session", "2", "-p", "Type", "-p", "Name", "-p", "Desktop"): "Type=wayland\nName=alice\nDesktop=GNOME\n",
        ("loginctl", "show-session", "c1", "-p", "Type", "-p", "Name", "-p", "Desktop"): "Type=tty\nName=gdm\nDesktop=\n",
        ("id", "-u", "alice"): "1000\n",
        ("runuser", "-u", "alice", "--", "env", bus, "gsettings", "get", "org.gnome.desktop.screensaver", "lock-enabled"): lock,
        ("runuser", "-u", "alice", "--", "env", bus, "gsettings", "get", "org.gnome.desktop.session", "idle-delay"): delay,
    }  # fmt: skip


def test_gnome_lock_setting_is_read_as_the_sessions_user(tmp_path: Path) -> None:
    _desktop_tree(tmp_path)
    probe = Probe(run=recorded(_gnome("true\n", "uint32 300\n")), root=tmp_path, uid=0)
    found = linux.screen_lock(probe)
    assert (found.value, found.evidence) == (True, "GNOME: locks after 300 s idle")
    probe = Probe(run=recorded(_gnome("true\n", "uint32 0\n")), root=tmp_path, uid=0)
    assert linux.screen_lock(probe).value is False
    probe = Probe(run=recorded(_gnome("false\n", "uint32 300\n")), root=tmp_path, uid=0)
    assert linux.screen_lock(probe).evidence == "GNOME: screen lock is off"


def test_kde_lock_setting_is_read_from_the_users_file(tmp_path: Path) -> None:
    _desktop_tree(tmp_path)
    answers = _gnome("", "")
    answers[("loginctl", "show-session", "2", "-p", "Type", "-p", "Name", "-p", "Desktop")] = (
        "Type=x11\nName=alice\nDesktop=KDE\n"
    )
    (tmp_path / "home/alice/.config").mkdir(parents=True)
    rc = tmp_path / "home/alice/.config/kscreenlockerrc"
    rc.write_text("[Daemon]\nAutolock=false\nTimeout=10\n")
    probe = Probe(run=recorded(answers), root=tmp_path, uid=0)
    assert linux.screen_lock(probe).evidence == "KDE Plasma: automatic screen lock is off"
    rc.write_text("[Greeter]\nTheme=x\n[Daemon]\nTimeout=10\n")
    assert linux.screen_lock(probe).evidence == "KDE Plasma: locks after 10 min idle"


def test_a_machine_without_a_desktop_has_no_screen_to_lock(tmp_path: Path) -> None:
    probe = Probe(run=recorded({("loginctl", "list-sessions", "--no-legend"): ""}), root=tmp_path)
    found = linux.screen_lock(probe)
    assert (found.value, found.evidence) == (
        True,
        "no graphical desktop installed: no screen to lock",
    )


# -- Linux: patches, OS, agents ----------------------------------------------------------------

DPKG_LOG = """2026-11-02 09:14:01 startup archives unpack
2026-11-02 09:14:02 upgrade openssl:amd64 3.0.15-1~deb12u1 3.0.17-1~deb12u2
2026-11-02 09:14:02 status half-configured openssl:amd64 3.0.17-1~deb12u2
2026-11-02 09:14:03 status installed openssl:amd64 3.0.17-1~deb12u2
2026-10-20 10:00:00 install curl:amd64 <none> 7.88.1-10+deb12u8
2026-11-05 08:00:00 remove cowsay:all 3.03+dfsg2-8 <none>
"""
APT_HISTORY = """
Start-Date: 2026-11-03  07:30:12
Commandline: /usr/bin/unattended-upgrade
Upgrade: libssl3:amd64 (3.0.15-1~deb12u1, 3.0.17-1~deb12u2)
End-Date: 2026-11-03  07:30:20

Start-Date: 2026-11-09  12:00:00
Commandline: apt-get remove cowsay
Remove: cowsay:all (3.03+dfsg2-8)
End-Date: 2026-11-09  12:00:01
"""
DNF_LOG = """2026-10-30T06:12:01+0000 SUBDEBUG Upgrade: kernel-core-6.11.4-201.fc40.x86_64
2026-10-30T06:12:03+0000 SUBDEBUG Upgraded: kernel-core-6.10.12-200.fc40.x86_64
2026-11-01T07:00:00+0000 INFO --- logging initialized ---
"""


def test_last_patch_is_the_newest_upgrade_in_the_package_logs(tmp_path: Path) -> None:
    assert linux.parse_dpkg_log(DPKG_LOG) == ("2026-11-02", "openssl:amd64")
    assert linux.parse_apt_history(APT_HISTORY) == "2026-11-03"
    assert linux.parse_dnf_log(DNF_LOG) == ("2026-10-30", "kernel-core-6.11.4-201.fc40.x86_64")
    assert linux.parse_rpm_install_times("1730000000\n1762000000\n1700000000\n") == "2025-11-01"
    (tmp_path / "var/log/apt").mkdir(parents=True)
    (tmp_path / "var/log/dpkg.log").write_text(DPKG_LOG)
    import gzip

    with gzip.open(tmp_path / "var/log/apt/history.log.1.gz", "wt") as f:
        f.write(APT_HISTORY)
    found = linux.last_patch(Probe(run=recorded({}), root=tmp_path))
    assert found.value == "2026-11-03"
    assert (
        found.evidence
        == "last upgrade or install 2026-11-03 (/var/log/apt/history.log.1.gz: apt run)"
    )


def test_no_package_log_reads_as_never_patched(tmp_path: Path) -> None:
    found = linux.last_patch(Probe(run=recorded({}), root=tmp_path))
    assert found.value == "1970-01-01"


def test_os_release_and_kernel() -> None:
    info = linux.parse_os_release(
        'PRETTY_NAME="Fedora Linux 40 (Workstation Edition)"\nNAME="Fedora Linux"\nID=fedora\n'
        "# comment\nVERSION_ID=40\n"
    )
    assert info["PRETTY_NAME"] == "Fedora Linux 40 (Workstation Edition)" and info["ID"] == "fedora"
    assert linux.kernel_version("6.11.4-201.fc40.x86_64") == "6.11.4-201.fc40.x86_64"
    assert linux.kernel_version("6.1.0+rpt-rpi-v8") == "6.1.0+rpt-rpi-v8"
    assert linux.kernel_version("5.15.0") == "5.15.0"


def test_a_whole_linux_laptop_from_recordings(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text('PRETTY_NAME="Ubuntu 24.04.1 LTS"\n')
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text("6.8.0-49-generic\n")
    for pid, comm in (("812", "falcon-sensor"), ("901", "landscape-clien"), ("1", "systemd")):
        (tmp_path / "proc" / pid).mkdir()
        (tmp_path / "proc" / pid / "comm").write_text(comm + "\n")
    (tmp_path / "var/log").mkdir(parents=True)
    (tmp_path / "var/log/dpkg.log").write_text(DPKG_LOG)
    probe = Probe(
        run=recorded(
            {
                ("lsblk", "--json", "--output", "NAME,TYPE,FSTYPE,MOUNTPOINTS"): LSBLK_LUKS_LVM,
                ("ufw", "status"): "Status: active\n",
                ("loginctl", "list-sessions", "--no-legend"): "",
            }
        ),
        root=tmp_path,
    )
    collected = linux.collect(probe)
    report = build_report(collected, "linux", clock=ManualClock(1_795_000_000.0), hostname="lap")
    validate_report(report)
    assert {k: report[k] for k in collected.fields} == {
        "os_version": "6.8.0-49-generic",
        "disk_encrypted": True,
        "firewall": True,
        "screen_lock": True,
        "last_patch": "2026-11-02",
        "antivirus": True,
        "mdm_enrolled": True,
        "jailbroken": False,
    }
    assert (
        report["os_name"] == "Ubuntu 24.04.1 LTS"
        and report["collected_at"] == "2026-11-18T11:06:40.000Z"
    )
    assert report["evidence"]["antivirus"] == "running: CrowdStrike Falcon"
    assert report["evidence"]["mdm_enrolled"] == "running: Canonical Landscape"


# -- macOS ---------------------------------------------------------------------------------------

SW_VERS = "ProductName:\t\tmacOS\nProductVersion:\t\t14.6.1\nBuildVersion:\t\t23G93\n"
INSTALL_HISTORY = json.dumps(
    {
        "SPInstallHistoryDataType": [
            {"_name": "macOS Sonoma 14.6.1", "install_date": "2024-08-08T17:11:03Z",
             "install_version": "14.6.1", "package_source": "package_source_apple"},
            {"_name": "XProtectPlistConfigData", "install_date": "2024-09-03T08:00:00Z",
             "install_version": "5272", "package_source": "package_source_apple"},
            {"_name": "Background Security Improvement", "install_date": "2024-08-20T09:00:00Z",
             "install_version": "1.0", "package_source": "package_source_apple"},
            {"_name": "Slack", "install_date": "2024-09-10T09:00:00Z",
             "install_version": "4.39", "package_source": "package_source_other"},
        ]
    }
)  # fmt: skip
MACOS_GOOD: dict[tuple[str, ...], Output | str] = {
    ("sw_vers",): SW_VERS,
    ("uname", "-r"): "23.6.0\n",
    ("fdesetup", "status"): "FileVault is On.\n",
    (macos.SOCKETFILTERFW, "--getglobalstate"): "Firewall is enabled. (State = 1)\n",
    ("sysadminctl", "-screenLock", "status"): Output(
        0, "", "2024-09-12 10:21:07.532 sysadminctl[4312:93121] screenLock delay is 300 seconds\n"
    ),
    ("system_profiler", "SPInstallHistoryDataType", "-json"): INSTALL_HISTORY,
    ("spctl", "--status"): "assessments enabled\n",
    (
        "profiles",
        "status",
        "-type",
        "enrollment",
    ): "Enrolled via DEP: Yes\nMDM enrollment: Yes (User Approved)\n",
    ("csrutil", "status"): "System Integrity Protection status: enabled.\n",
}


def test_a_compliant_mac_from_recordings() -> None:
    collected = macos.collect(Probe(run=recorded(MACOS_GOOD)))
    report = build_report(collected, "macos", clock=ManualClock(1_726_000_000.0), hostname="mac")
    validate_report(report)
    assert {k: report[k] for k in collected.fields} == {
        "os_version": "14.6.1",
        "disk_encrypted": True,
        "firewall": True,
        "screen_lock": True,
        "last_patch": "2024-08-20",
        "antivirus": True,
        "mdm_enrolled": True,
        "jailbroken": False,
    }
    assert report["os_name"] == "macOS 14.6.1" and report["kernel"] == "Darwin 23.6.0"
    assert report["evidence"]["mdm_enrolled"] == (
        "MDM enrolled via Automated Device Enrollment: Yes (User Approved)"
    )
    assert (
        report["evidence"]["last_patch"] == "Background Security Improvement installed 2024-08-20"
    )


def test_a_neglected_mac_from_recordings() -> None:
    answers = {
        **MACOS_GOOD,
        ("fdesetup", "status"): "FileVault is Off.\n",
        (macos.SOCKETFILTERFW, "--getglobalstate"): "Firewall is disabled. (State = 0)\n",
        ("sysadminctl", "-screenLock", "status"): Output(
            0, "", "2024-09-12 10:21:07.532 sysadminctl[4312:93121] screenLock is off\n"
        ),
        ("profiles", "status", "-type", "enrollment"): "Enrolled via DEP: No\nMDM enrollment: No\n",
        ("csrutil", "status"): "System Integrity Protection status: disabled.\n",
        ("spctl", "--status"): "assessments disabled\n",
    }
    fields = macos.collect(Probe(run=recorded(answers))).fields
    assert fields["disk_encrypted"] is False and fields["firewall"] is False
    assert fields["screen_lock"] is False and fields["mdm_enrolled"] is False
    assert fields["antivirus"] is False and fields["jailbroken"] is True
    encrypting = macos.parse_fdesetup("Encryption in progress: Percent completed = 35.1\n")
    assert encrypting.value is False and "still encrypting" in encrypting.evidence
    assert macos.parse_screenlock("… screenLock delay is immediate\n").value is True


def test_a_mac_that_cannot_be_read_fails_safe() -> None:
    fields = macos.collect(Probe(run=recorded({("sw_vers",): SW_VERS}))).fields
    assert fields["disk_encrypted"] is False and fields["jailbroken"] is True
    assert fields["last_patch"] == "1970-01-01"


# -- Windows -----------------------------------------------------------------------------------

WIN_OS = '{\r\n    "Caption":  "Microsoft Windows 11 Enterprise",\r\n    "Version":  "10.0.22631",\r\n    "BuildNumber":  "22631"\r\n}\r\n'
WIN_BITLOCKER = '{\r\n    "MountPoint":  "C:",\r\n    "ProtectionStatus":  1,\r\n    "VolumeStatus":  1,\r\n    "EncryptionPercentage":  100\r\n}\r\n'
WIN_FIREWALL = """[
    {"Name":  "Domain", "Enabled":  1},
    {"Name":  "Private", "Enabled":  1},
    {"Name":  "Public", "Enabled":  1}
]"""
WIN_AV = '{\r\n    "displayName":  "Windows Defender",\r\n    "productState":  397568\r\n}\r\n'
WIN_LOCK = '{"InactivityTimeoutSecs": 900, "ScreenSaveActive": "1", "ScreenSaverIsSecure": "0", "ScreenSaveTimeOut": "600"}'
WIN_HOTFIX_PS51 = '{\r\n    "HotFixID":  "KB5041585",\r\n    "InstalledOn":  {\r\n                        "value":  "\\/Date(1723593600000)\\/",\r\n                        "DateTime":  "Wednesday, August 14, 2024 12:00:00 AM"\r\n                    }\r\n}\r\n'
WIN_MDM = '[{"ProviderID": "MS DM Server", "EnrollmentState": 1, "UPN": "alice@corp.example"}, {"ProviderID": "WindowsTenant", "EnrollmentState": 6, "UPN": null}]'


def _windows(**over: Output | str) -> dict[tuple[str, ...], Output | str]:
    texts = {
        "os": WIN_OS,
        "bitlocker": WIN_BITLOCKER,
        "firewall": WIN_FIREWALL,
        "antivirus": WIN_AV,
        "screenlock": WIN_LOCK,
        "hotfix": WIN_HOTFIX_PS51,
        "mdm": WIN_MDM,
        **over,
    }
    return {tuple(windows.powershell(windows.QUERIES[k])): v for k, v in texts.items()}


def test_a_compliant_windows_pc_from_recordings() -> None:
    collected = windows.collect(Probe(run=recorded(_windows())))
    report = build_report(collected, "windows", clock=ManualClock(1_726_000_000.0), hostname="pc")
    validate_report(report)
    assert {k: report[k] for k in collected.fields} == {
        "os_version": "10.0.22631",
        "disk_encrypted": True,
        "firewall": True,
        "antivirus": True,
        "screen_lock": True,
        "last_patch": "2024-08-14",
        "mdm_enrolled": True,
        "jailbroken": False,
    }
    assert report["evidence"]["antivirus"] == "Windows Defender (on, signatures current)"
    assert report["evidence"]["mdm_enrolled"] == "MDM enrolment active (MS DM Server)"
    assert report["evidence"]["screen_lock"] == "machine inactivity limit 900 s (locks the session)"


def test_a_neglected_windows_pc_from_recordings() -> None:
    answers = _windows(
        bitlocker='{"MountPoint": "C:", "ProtectionStatus": 0, "VolumeStatus": 0, "EncryptionPercentage": 0}',
        firewall='[{"Name": "Domain", "Enabled": true}, {"Name": "Public", "Enabled": false}]',
        antivirus='{"displayName": "Windows Defender", "productState": 393472}',
        screenlock='{"InactivityTimeoutSecs": null, "ScreenSaveActive": "1", "ScreenSaverIsSecure": "0", "ScreenSaveTimeOut": "600"}',
        # PowerShell 7 writes dates as ISO 8601.
        hotfix='{"HotFixID": "KB5031356", "InstalledOn": "2023-10-11T00:00:00"}',
        mdm="",
    )
    collected = windows.collect(Probe(run=recorded(answers)))
    assert collected.fields == {
        "os_version": "10.0.22631",
        "disk_encrypted": False,
        "firewall": False,
        "antivirus": False,
        "screen_lock": False,
        "last_patch": "2023-10-11",
        "mdm_enrolled": False,
        "jailbroken": False,
    }
    assert collected.evidence["firewall"] == "firewall off for the Public profile(s)"
    assert collected.evidence["antivirus"] == "Windows Defender (off, signatures current)"


def test_windows_server_without_security_center_asks_defender() -> None:
    answers = _windows(antivirus=Output(1, "", "Get-CimInstance : Invalid namespace"))
    answers[tuple(windows.powershell(windows.QUERIES["defender"]))] = (
        '{"AntivirusEnabled": true, "RealTimeProtectionEnabled": true}'
    )
    found = windows.collect(Probe(run=recorded(answers)))
    assert found.fields["antivirus"] is True
    assert found.evidence["antivirus"] == "Microsoft Defender: real-time protection on"


# -- signing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ec", "rsa", "ed25519"])
def test_a_signed_report_verifies_with_the_device_certificate(kind: str, tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import NameOID

    key = {
        "ec": lambda: ec.generate_private_key(ec.SECP256R1()),
        "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
    }[kind]()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev")])
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .sign(key, None if kind == "ed25519" else hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    collected = macos.collect(Probe(run=recorded(MACOS_GOOD)))
    report = build_report(collected, "macos", clock=ManualClock(1_726_000_000.0), hostname="m")
    token = sign_report(report, pem)
    assert verify_signed_report(token, cert.public_bytes(serialization.Encoding.DER)) == report
