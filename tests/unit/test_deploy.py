"""The deployment artifacts as systemd reads them: the gateway's hardened unit and the device
agent's service and timer pass `systemd-analyze verify` without a word, their sandboxes score
low on `systemd-analyze security`, and every command they run exists with those flags."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ztgateway.agent import cli as agent_cli
from ztgateway.cli import build_parser
from ztgateway.commands.common import Parser

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
INSTALL_BIN = "/opt/ztgateway/bin/"


def installed_copy(tmp_path: Path, *names: str) -> list[Path]:
    """The units as an operator installs them, pointing at this checkout's console scripts
    (verify checks that each command is an executable file)."""
    bindir = Path(sys.executable).parent
    out = []
    for name in names:
        text = (UNITS / name).read_text().replace(INSTALL_BIN, f"{bindir}/")
        path = tmp_path / name
        path.write_text(text)
        out.append(path)
    return out


def analyze(*argv: str) -> subprocess.CompletedProcess[str]:
    assert Path(SYSTEMD_ANALYZE).exists(), "systemd-analyze comes with Debian's systemd package"
    return subprocess.run(
        [SYSTEMD_ANALYZE, *argv], capture_output=True, text=True, timeout=60, check=False
    )


ALL_UNITS = ("ztgateway.service", "ztgateway-agent.service", "ztgateway-agent.timer")


def test_the_units_verify_without_a_warning(tmp_path: Path) -> None:
    out = analyze("verify", *map(str, installed_copy(tmp_path, *ALL_UNITS)))
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("line", "replacement"),
    [
        ("ProtectSystem=strict", "ProtectSystem=bogus"),
        ("ExecReload=/bin/kill -HUP $MAINPID", "ExecReload=/bin/no-such-kill -HUP $MAINPID"),
        ("LimitNOFILE=65536", "LimitNOFILES=65536"),
    ],
)
def test_verify_would_catch_a_broken_unit(tmp_path: Path, line: str, replacement: str) -> None:
    (unit,) = installed_copy(tmp_path, "ztgateway.service")
    text = unit.read_text()
    assert line in text
    unit.write_text(text.replace(line, replacement))
    out = analyze("verify", str(unit))
    assert out.stderr.strip() != ""


@pytest.mark.parametrize(
    ("unit", "threshold"), [("ztgateway.service", 20), ("ztgateway-agent.service", 30)]
)
def test_the_sandboxes_expose_little(tmp_path: Path, unit: str, threshold: int) -> None:
    (path,) = installed_copy(tmp_path, unit)
    out = analyze("security", "--offline=true", f"--threshold={threshold}", str(path))
    assert out.returncode == 0, out.stdout[-2000:]
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
    assert level is not None and float(level.group(1)) * 10 <= threshold


def _commands(unit: str) -> list[list[str]]:
    out = []
    for line in (UNITS / unit).read_text().splitlines():
        key, _, value = line.partition("=")
        if key in ("ExecStart", "ExecStartPre") and value.startswith(INSTALL_BIN):
            out.append(shlex.split(value.replace("%d", "/run/credentials/x")))
    return out


def test_every_command_in_the_units_exists_with_those_flags() -> None:
    commands = _commands("ztgateway.service") + _commands("ztgateway-agent.service")
    assert len(commands) == 3
    for argv in commands:
        program = Path(argv[0]).name
        if program == "ztgateway":
            args = build_parser().parse_args(argv[1:])
        else:
            assert program == "ztgateway-agent"
            parser = Parser(prog=program)
            agent_cli._configure(parser)
            args = parser.parse_args(argv[1:])
        assert callable(args.func)


def test_the_timer_starts_the_agent_service() -> None:
    timer = (UNITS / "ztgateway-agent.timer").read_text()
    # Without Unit=, a timer starts the service of its own name.
    assert "Unit=" not in timer and (UNITS / "ztgateway-agent.service").exists()
    assert "Persistent=true" in timer
    assert shutil.which("systemd-analyze") or Path(SYSTEMD_ANALYZE).exists()


def _agent_args(argv: list[str]) -> object:
    parser = Parser(prog="ztgateway-agent")
    agent_cli._configure(parser)
    return parser.parse_args(argv)


def test_the_macos_launch_daemon_runs_the_agent_hourly_and_at_boot() -> None:
    import plistlib

    job = plistlib.loads((REPO / "deploy" / "macos" / "com.ztgateway.agent.plist").read_bytes())
    assert job["Label"] == "com.ztgateway.agent"
    program, *argv = job["ProgramArguments"]
    assert Path(program).name == "ztgateway-agent"
    assert callable(_agent_args(argv).func)  # type: ignore[attr-defined]
    assert job["RunAtLoad"] is True
    assert job["StartInterval"] == 3600
    assert job["Umask"] == 0o077  # the report and log stay root's
    assert "UserName" not in job  # a LaunchDaemon without one runs as root, as fdesetup needs


def test_the_windows_scheduled_task_runs_the_agent_hourly_at_start_up_as_system() -> None:
    from xml.etree import ElementTree

    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    task = ElementTree.parse(REPO / "deploy" / "windows" / "ztgateway-agent-task.xml").getroot()
    assert task.tag == f"{{{ns['t']}}}Task"
    command = task.findtext("t:Actions/t:Exec/t:Command", namespaces=ns)
    arguments = task.findtext("t:Actions/t:Exec/t:Arguments", namespaces=ns)
    assert command is not None and arguments is not None
    assert command.strip('"').endswith("\\ztgateway-agent.exe")
    argv = shlex.split(arguments.replace("\\", "/"))  # Windows quoting, POSIX-split for the test
    assert callable(_agent_args(argv).func)  # type: ignore[attr-defined]
    assert task.find("t:Triggers/t:BootTrigger", ns) is not None
    interval = task.findtext("t:Triggers/t:TimeTrigger/t:Repetition/t:Interval", namespaces=ns)
    assert interval == "PT1H"
    assert task.findtext("t:Principals/t:Principal/t:UserId", namespaces=ns) == "S-1-5-18"
    assert task.findtext("t:Settings/t:MultipleInstancesPolicy", namespaces=ns) == "IgnoreNew"
