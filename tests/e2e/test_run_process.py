"""The operator's first hour, as processes: `ztgateway run` (uvloop) in front of the demo app,
curl with and without a client certificate, and a graceful SIGTERM that flushes the audit."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Certs, accepting, free_ports
from ztgateway.dev.tokens import issue_token

REPO = Path(__file__).resolve().parents[2]
CURL = shutil.which("curl")
RUNNING_DECISIONS: list[tuple[Path, str]] = []


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        if accepting(port, timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(port)


@pytest.fixture
def running(certs: Certs, tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    app_port, gw_port, ops_port = free_ports(3)
    text = (REPO / "config" / "gateway.toml").read_text()
    text = text.replace("../certs/", f"{certs.dir}/").replace("../var/", f"{tmp_path}/")
    text = text.replace("port = 8443", f"port = {gw_port}").replace(
        "port = 9100", f"port = {ops_port}"
    )
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{app_port}")
    text = text.replace('"demo-logo.svg"', f'"{REPO}/config/demo-logo.svg"')
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(text)
    app = subprocess.Popen(
        [sys.executable, "-m", "ztgateway.dev.demo_app", "--port", str(app_port)],
        stdout=subprocess.DEVNULL,
    )
    gw = subprocess.Popen(
        [sys.executable, "-m", "ztgateway", "run", "-c", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(app_port, app)
        wait_port(gw_port, gw)
        yield gw_port, ops_port, tmp_path
        gw.send_signal(signal.SIGTERM)
        code = gw.wait(timeout=30)
        output = gw.stdout.read().decode() if gw.stdout else ""
        assert code == 0, output
        # Every decision acknowledged before SIGTERM is in the audit file after it.
        events = (tmp_path / "audit.jsonl").read_text()
        for tmp, decision_id in RUNNING_DECISIONS:
            if tmp == tmp_path:
                assert decision_id in events
    finally:
        for p in (gw, app):
            if p.poll() is None:
                p.kill()
                p.wait()
        if gw.stdout:
            gw.stdout.close()


def test_curl_with_alices_certificate_gets_the_echo_and_without_is_refused(
    running: tuple[int, int, Path], certs: Certs
) -> None:
    gw_port, ops_port, _ = running
    pem, key = certs.client("alice-laptop")
    assert CURL is not None, "curl is required (installed by .ci/run)"
    # The people's app asks alice for TOTP once a working day: a client holding only her
    # certificate (a script, malware) is challenged like her browser, not let through.
    challenged = subprocess.run(
        [CURL, "-sS", "-i", "--cert", str(pem), "--key", str(key), "--cacert", str(certs.ca),
         f"https://127.0.0.1:{gw_port}/echo"],
        capture_output=True, check=False, timeout=20,
    )  # fmt: skip
    assert challenged.returncode == 0, challenged.stderr
    assert challenged.stdout.startswith(b"HTTP/1.1 401"), challenged.stdout[:200]
    assert b"insufficient_user_authentication" in challenged.stdout
    # A program uses the API with her certificate and a token.
    token = issue_token(certs.issuer_key, sub="alice")
    ok = subprocess.run(
        [CURL, "-sS", "--cert", str(pem), "--key", str(key), "--cacert", str(certs.ca),
         "-H", f"Authorization: Bearer {token}", f"https://127.0.0.1:{gw_port}/api/echo"],
        capture_output=True, check=False, timeout=20,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    echo = json.loads(ok.stdout)
    assert echo["headers_map"]["x-forwarded-user"] == "alice"
    refused = subprocess.run(
        [CURL, "-sS", "--cacert", str(certs.ca), f"https://127.0.0.1:{gw_port}/echo"],
        capture_output=True, check=False, timeout=20,
    )  # fmt: skip
    assert refused.returncode != 0, "no certificate must mean no HTTP response at all"
    assert refused.stdout == b""
    metrics = subprocess.run(
        [CURL, "-sS", f"http://127.0.0.1:{ops_port}/metrics"],
        capture_output=True,
        check=True,
        timeout=20,
    ).stdout.decode()
    assert 'ztgw_tls_handshake_failures_total{reason="no_certificate"} 1.0' in metrics
    assert 'ztgw_requests_total{reason="policy-allowed",route="api",verdict="allow"} 1.0' in metrics
    assert 'ztgw_requests_total{reason="mfa-required",route="app",verdict="step_up"} 1.0' in metrics


def test_sigterm_finishes_and_flushes_the_audit_log(
    running: tuple[int, int, Path], certs: Certs
) -> None:
    import ssl
    import urllib.request

    gw_port, _, tmp = running
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(*map(str, certs.client("alice-laptop")))
    token = issue_token(certs.issuer_key, sub="alice")
    request = urllib.request.Request(
        f"https://127.0.0.1:{gw_port}/api/echo", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, context=ctx, timeout=10) as r:
        assert r.status == 200
        RUNNING_DECISIONS.append((tmp, r.headers["X-ZT-Decision-Id"]))
