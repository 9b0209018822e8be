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
