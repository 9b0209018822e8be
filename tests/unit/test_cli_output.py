"""The command line as a person and a script meet it: help on every flag, durations, tables
and times by default, --json for machines, and a one-line error instead of a traceback."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import base_config
from tests.support import Certs, to_toml
from ztgateway.audit import AuditLog
from ztgateway.cli import build_parser, main
from ztgateway.commands.common import parse_instant, table
from ztgateway.durations import fmt_duration, parse_duration


def _parsers(
    parser: argparse.ArgumentParser, path: str = "ztgateway"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_flag_and_argument_of_every_command_has_help() -> None:
    missing = []
    commands = 0
    for path, parser in _parsers(build_parser()):
        commands += 1
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            if not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert commands > 30
    assert missing == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400), ("7d", 604800), ("2w", 1209600),
     ("250ms", 0.25), ("1.5h", 5400), ("45", 45), (" 10M ", 600)],
)  # fmt: skip
def test_durations_as_people_write_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-5", "1x", "h", "1h-", "nan", "inf", "yesterday", "1 h"])
def test_nonsense_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_a_bare_number_keeps_the_flags_old_unit() -> None:
    assert parse_duration("5", default_unit="m") == 300
    assert parse_duration("90", default_unit="d") == 90 * 86400
    assert fmt_duration(5400) == "1h30m" and fmt_duration(45) == "45s"
    assert fmt_duration(90061) == "1d01h"


def test_since_takes_a_duration_ago_or_an_iso_time() -> None:
    now = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_instant("1h", now=now) == dt.datetime(2026, 5, 1, 11, 0, tzinfo=dt.UTC)
    assert parse_instant("2026-04-30", now=now) == dt.datetime(2026, 4, 30, tzinfo=dt.UTC)
    assert parse_instant("2026-04-30T09:30Z", now=now).hour == 9
    off = parse_instant("2026-04-30T09:30+02:00", now=now)
    assert off.astimezone(dt.UTC).hour == 7
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_instant("yesterday", now=now)


def test_tables_fit_their_widest_cell() -> None:
    text = table(("A", "VERDICT", "Z"), [("x", "step_up", "end"), ("longer", "allow", "")])
    assert text.splitlines() == ["A       VERDICT  Z", "x       step_up  end", "longer  allow"]
    assert table(("A",), [], empty="nothing") == "nothing"


@pytest.fixture
def config(certs: Certs, tmp_path: Path) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(to_toml(base_config(certs, 9, tmp_path)))

    async def write() -> None:
        log = AuditLog(tmp_path / "audit.db")
        await log.start()
        for i in range(400):
            log.record(
                {
                    "decision_id": f"d{i:04d}",
                    "route": "admin",
                    "input": {"user": "alice", "path": f"/admin/{i}", "method": "GET"},
                    "result": {"verdict": "deny", "reason": "group-required"},
                }
            )
        await log.close()

    asyncio.run(write())
    return path


def cli(*argv: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ztgateway", *argv],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )


def test_audit_search_since_a_duration_prints_a_table(config: Path) -> None:
    out = cli("audit", "search", "-c", str(config), "--since", "1h", "--limit", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "TIME",
        "VERDICT",
        "REASON",
        "ROUTE",
        "METHOD",
        "PATH",
        "USER",
        "DEVICE",
        "ID",
    ]
    assert len(lines) == 3 and "group-required" in lines[1] and lines[2].endswith("d0399")
    # Times are ISO 8601 in UTC, to the second.
    assert lines[1][:20].endswith("Z") and lines[1][10] == " "
    json_out = cli("audit", "search", "-c", str(config), "--since", "30m", "--limit", "2", "--json")
    assert [json.loads(x)["decision_id"] for x in json_out.stdout.splitlines()] == [
        "d0398",
        "d0399",
    ]
    none = cli("audit", "search", "-c", str(config), "--until", "7d")
    assert none.stdout.strip() == "no matching decisions"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["audit", "search", "--since", "yesterday"], "argument --since: expected a duration ago"),
        (["token", "issue", "--sub", "a", "--ttl", "5x"], "argument --ttl: expected a duration"),
        (["users", "lock", "alice", "--for", "soon"], "argument --for: expected a duration"),
        (["audit", "tail", "-n", "many"], "argument -n: invalid int value"),
        (["audit", "rotate"], "one of the arguments --older-than --days is required"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(
    config: Path, argv: list[str], message: str
) -> None:
    out = cli(*argv, "-c", str(config)) if argv[0] != "nonsense" else cli(*argv)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: ztgateway") and message in out.stderr


def test_a_missing_configuration_is_one_line(tmp_path: Path) -> None:
    out = cli("audit", "tail", "-c", str(tmp_path / "nope.toml"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("cannot read: No such file or directory")


def test_a_closed_pipe_ends_quietly(config: Path) -> None:
    # The reader goes away at once (`| head -c 0`): every write fails with EPIPE.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ztgateway",
            "audit",
            "tail",
            "-n",
            "400",
            "--json",
            "-c",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert err == ""
    # And through a shell pipe into head, as people type it.
    shell = subprocess.run(
        f"{sys.executable} -m ztgateway audit tail -n 400 -c {config} | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shell.stdout.startswith("TIME") and shell.stderr == ""


def test_users_lock_for_a_duration_and_list_as_json(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["users", "lock", "alice", "--for", "1h30m", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("alice: locked until ") and "Z (1h30m)" in out
    assert main(["users", "lock", "bob", "--minutes", "5", "-c", str(config)]) == 0
    assert "(5m00s)" in capsys.readouterr().out
    assert main(["users", "lock", "carol", "-c", str(config)]) == 0
    assert "carol: locked until unlocked" in capsys.readouterr().out
    assert main(["users", "list", "-c", str(config)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:3] == ["USER", "MFA", "LOCKED"]
    assert any(line.startswith("carol") and "until unlocked" in line for line in listing)
    assert main(["users", "list", "--json", "-c", str(config)]) == 0
    users = {u["user"]: u for u in json.loads(capsys.readouterr().out)}
    assert users["alice"]["locked"] is True and isinstance(users["alice"]["locked_until"], float)


def test_mfa_key_rotation_reseals_every_secret(
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from urllib.parse import parse_qs, urlsplit

    from ztgateway.credentials.totp import SecretBox
    from ztgateway.store import store_from_url

    monkeypatch.delenv("ZTGW_MFA_KEY", raising=False)
    secrets = {}
    for user in ("alice", "bob"):
        assert main(["users", "mfa", "enroll", user, "--quiet", "-c", str(config)]) == 0
        uri = capsys.readouterr().out.strip()
        secrets[user] = parse_qs(urlsplit(uri).query)["secret"][0]
    new_key = tmp_path / "mfa-new.key"
    assert (
        main(["users", "mfa", "rotate-key", "--new-key-file", str(new_key), "-c", str(config)]) == 0
    )
    out = capsys.readouterr().out
    assert "created a new key" in out and "re-sealed 2 TOTP secrets" in out
    assert new_key.stat().st_mode & 0o777 == 0o600
    old_box = SecretBox.from_b64((tmp_path / "mfa.key").read_text())
    new_box = SecretBox.from_b64(new_key.read_text())

    async def check() -> None:
        store = store_from_url(f"sqlite:///{tmp_path}/state.db", base=tmp_path)
        await store.open()
        try:
            for user, secret in secrets.items():
                record = store.user(user)
                assert record is not None and record.mfa_secret
                assert new_box.open(record.mfa_secret, user=user) == secret
                with pytest.raises(ValueError, match="does not open"):
                    old_box.open(record.mfa_secret, user=user)
        finally:
            await store.close()

    asyncio.run(check())
