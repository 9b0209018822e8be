"""`policy explain`, `policy test`, `token issue` and `audit` on the command line."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from tests.conftest import base_config
from tests.support import Certs, to_toml
from ztgateway.cli import main


@pytest.fixture
def config(certs: Certs, tmp_path: Path) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(to_toml(base_config(certs, 9, tmp_path)))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_token_issue_prints_only_a_token_the_demo_issuer_trusts(
    certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        "token",
        "issue",
        "--sub",
        "alice",
        "--groups",
        "admins,eng",
        "--scope",
        "read write",
        "--key",
        str(certs.issuer_key),
    )
    assert code == 0
    token = out.strip()
    assert "\n" not in token and token.count(".") == 2
    jwks = jwt.PyJWKSet.from_json(certs.issuer_jwks.read_text())
    claims = jwt.decode(token, jwks.keys[0], algorithms=["ES256"], audience="ztgateway")
    assert (
        claims["sub"] == "alice"
        and claims["groups"] == ["admins", "eng"]
        and claims["scope"] == "read write"
    )


def test_policy_explain_prints_every_finding(
    certs: Certs, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, token, _ = run(capsys, "token", "issue", "--sub", "alice", "--key", str(certs.issuer_key))
    code, out, _ = run(
        capsys, "policy", "explain", "-c", str(config), "--path", "/admin/x", "--token", token.strip(),
        "--cert", str(certs.client("alice-laptop")[0]),
    )  # fmt: skip
    assert code == 0
    assert "decision: DENY  reason: group-required  status: 403" in out
    assert "route: admin (enforce)" in out
    assert "[policy] deny      group-required — needs one of admins" in out
    assert "identity: user=alice source=token" in out


def test_policy_explain_json_for_a_path_attack(
    certs: Certs, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "policy", "explain", "-c", str(config), "--path", "/%2e%2e/etc/passwd", "--json"
    )
    assert code == 0
    assert '"reason": "path-invalid"' in out


def test_policy_test_passes_and_fails_on_mismatch(
    certs: Certs, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = certs.client("alice-laptop")[0]
    cases = tmp_path / "policy-tests.toml"
    cases.write_text(
        f'''config = "{config}"
issuer_key = "{certs.issuer_key}"

[[case]]
name = "alice reaches the app with her certificate"
path = "/echo"
cert = "{alice}"
verdict = "allow"

[[case]]
name = "admin needs the admins group"
path = "/admin/echo"
cert = "{alice}"
verdict = "deny"
reason = "group-required"
[case.token_claims]
sub = "alice"

[[case]]
name = "an admin gets in"
path = "/admin/echo"
cert = "{alice}"
verdict = "allow"
[case.token_claims]
sub = "alice"
groups = ["admins"]
'''
    )
    code, out, _ = run(capsys, "policy", "test", str(cases))
    assert code == 0, out
    assert "3 passed, 0 failed" in out
    cases.write_text(cases.read_text().replace('groups = ["admins"]', 'groups = ["eng"]'))
    code, out, _ = run(capsys, "policy", "test", str(cases))
    assert code == 1
    assert "FAIL an admin gets in: got deny (group-required), expected allow" in out
    assert "2 passed, 1 failed" in out


def test_policy_test_file_errors_name_the_key(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "t.toml"
    cases.write_text(f'config = "{config}"\n[[case]]\nname = "x"\nverdit = "allow"\n')
    code, _, err = run(capsys, "policy", "test", str(cases))
    assert code == 2
    assert "case[0].verdit: unknown key" in err


def test_audit_cli_tail_verify_and_detect_tampering(
    certs: Certs, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import sqlite3

    from ztgateway.audit import AuditLog

    async def write() -> None:
        log = AuditLog(tmp_path / "audit.db", jsonl_path=tmp_path / "audit.jsonl")
        await log.start()
        for i in range(3):
            log.record(
                {
                    "decision_id": f"d{i}",
                    "route": "app",
                    "input": {"user": "alice", "path": f"/p{i}"},
                    "result": {"verdict": "allow", "reason": "policy-allowed"},
                }
            )
        await log.close()

    asyncio.run(write())
    code, out, _ = run(capsys, "audit", "tail", "-c", str(config), "-n", "2")
    assert code == 0 and "d1" in out and "d2" in out and "d0" not in out
    assert run(capsys, "audit", "verify", "-c", str(config))[0] == 0
    code, out, _ = run(capsys, "audit", "search", "-c", str(config), "--decision-id", "d1")
    assert code == 0 and "d1" in out and "/p1" in out and "alice" in out
    code, out, _ = run(
        capsys, "audit", "search", "-c", str(config), "--decision-id", "d1", "--json"
    )
    assert code == 0 and '"d1"' in out
    db = sqlite3.connect(tmp_path / "audit.db")
    db.execute(
        "UPDATE audit_events SET event = replace(event, '/p1', '/px') WHERE decision_id = 'd1'"
    )
    db.commit()
    db.close()
    code, _, err = run(capsys, "audit", "verify", "-c", str(config))
    assert code == 1
    assert "decision_id=d1" in err


@pytest.fixture
def mfa_config(certs: Certs, tmp_path: Path) -> Path:
    """The admin route with a second factor within 15 minutes; /secure/ needs a compliant
    device (a passing posture report)."""
    cfg = base_config(certs, 9, tmp_path)
    cfg["routes"][2]["session"] = {"mfa_max_age": 900}
    cfg["routes"].append(
        {"name": "secure", "prefix": "/secure/", "upstream": "demo",
         "policy": {"require_token": True, "min_trust": "compliant"}}
    )  # fmt: skip
    path = tmp_path / "mfa.toml"
    path.write_text(to_toml(cfg))
    return path


def _cases(tmp_path: Path, config: Path, certs: Certs, body: str) -> Path:
    alice = certs.client("alice-laptop")[0]
    cases = tmp_path / "cases.toml"
    cases.write_text(
        f'config = "{config}"\nissuer_key = "{certs.issuer_key}"\n'
        + body.replace("ALICE", str(alice))
    )
    return cases


POSTURE = """[case.posture]
platform = "macos"
os_version = "15.1"
patch_age_days = 2
disk_encrypted = DISK
firewall = true
antivirus = true
screen_lock = true
mdm_enrolled = true
jailbroken = false
"""


def test_a_policy_case_states_how_long_ago_the_second_factor_was_given(
    certs: Certs, mfa_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A case could not say "MFA done", so no route with mfa_max_age could be tested as allow
    (the UX review's F6): these fail on the old code with "case[0].mfa_age: unknown key"."""
    case = """
[[case]]
name = "{name}"
path = "/admin/echo"
cert = "ALICE"
mfa_age = "{age}"
verdict = "{verdict}"
{reason}
[case.token_claims]
sub = "alice"
groups = ["admins"]
"""
    body = case.format(name="a minute ago", age="1m", verdict="allow", reason="")
    body += case.format(
        name="an hour ago", age="1h", verdict="step_up", reason='reason = "mfa-required"'
    )
    code, out, err = run(capsys, "policy", "test", str(_cases(tmp_path, mfa_config, certs, body)))
    assert code == 0, out + err
    assert "2 passed, 0 failed" in out
    # Nothing stated: the store knows no session for this token, so a step-up is due.
    body = case.format(name="unstated", age="1m", verdict="allow", reason="")
    body = body.replace('mfa_age = "1m"\n', "")
    code, out, _ = run(capsys, "policy", "test", str(_cases(tmp_path, mfa_config, certs, body)))
    assert code == 1 and "got step_up (mfa-required)" in out


def test_a_policy_case_states_the_devices_posture(
    certs: Certs, mfa_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = """
[[case]]
name = "{name}"
path = "/secure/echo"
cert = "ALICE"
verdict = "{verdict}"
{reason}
[case.token_claims]
sub = "alice"
"""
    body = case.format(name="compliant", verdict="allow", reason="") + POSTURE.replace(
        "DISK", "true"
    )
    body += case.format(
        name="no disk encryption", verdict="deny", reason='reason = "device-noncompliant"'
    ) + POSTURE.replace("DISK", "false")
    body += case.format(
        name="a stale report", verdict="deny", reason='reason = "posture-stale"'
    ) + POSTURE.replace("DISK", "true").replace(
        "jailbroken = false", 'jailbroken = false\nreport_age = "3d"'
    )
    code, out, err = run(capsys, "policy", "test", str(_cases(tmp_path, mfa_config, certs, body)))
    assert code == 0, out + err
    assert "3 passed, 0 failed" in out


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ('[[case]]\nname = "x"\nmfa_age = "1m"\n', "case[0].mfa_age", "needs token or token_claims"),
        ('[[case]]\nname = "x"\nmfa_age = "soon"\ncert = "ALICE"\n[case.token_claims]\nsub = "a"\n',
         "case[0].mfa_age", ""),
        ('[[case]]\nname = "x"\n' + POSTURE.replace("DISK", "true"), "case[0].posture",
         "needs cert"),
        ('[[case]]\nname = "x"\ncert = "ALICE"\n' + POSTURE.replace("DISK", '"yes"'),
         "case[0].posture.disk_encrypted", ""),
        ('[[case]]\nname = "x"\ncert = "ALICE"\n' + POSTURE.replace("DISK", "true")
         + "colour = 1\n", "case[0].posture.colour", "unknown field"),
    ],
)  # fmt: skip
def test_policy_case_facts_are_checked_and_named(
    certs: Certs,
    mfa_config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    body: str,
    key: str,
    message: str,
) -> None:
    code, _, err = run(capsys, "policy", "test", str(_cases(tmp_path, mfa_config, certs, body)))
    assert code == 2
    assert f"{key}:" in err and message in err


def test_an_id_that_starts_with_a_dash_is_told_to_go_after_double_dash(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A base64url credential id starts with "-" one time in 64; argparse then reads it as an
    unknown option and reports the id as missing, which says nothing useful on its own."""
    with pytest.raises(SystemExit) as exc:
        main(["users", "webauthn", "remove", "alice", "-AbCdEf", "-c", str(config)])
    assert exc.value.code == 2
    assert "a value that starts with '-' goes after `--`" in capsys.readouterr().err
    # Only known options on the line: the plain message, no hint.
    with pytest.raises(SystemExit):
        main(["users", "webauthn", "remove", "alice", "-c", str(config)])
    assert "goes after" not in capsys.readouterr().err
    # After `--` the id reaches the command, which looks it up (there is no such key).
    code, _out, err = run(
        capsys, "users", "webauthn", "remove", "alice", "-c", str(config), "--", "-AbCdEf"
    )
    assert code == 1 and "-AbCdEf" in err


def test_an_option_value_that_starts_with_a_dash_is_told_to_use_equals(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Audit files from before time-ordered ids hold base64url ids, one in 64 starting with "-"."""
    import asyncio

    from ztgateway.audit import AuditLog

    async def write() -> None:
        async with AuditLog(tmp_path / "audit.db") as log:
            log.record({"decision_id": "-Ab3", "route": "app", "input": {"user": "bob"}})

    asyncio.run(write())
    with pytest.raises(SystemExit) as exc:
        main(["audit", "search", "-c", str(config), "--decision-id", "-Ab3"])
    assert exc.value.code == 2
    assert "as --option=VALUE" in capsys.readouterr().err
    code, out, _err = run(capsys, "audit", "search", "-c", str(config), "--decision-id=-Ab3")
    assert code == 0 and "-Ab3" in out and "bob" in out
