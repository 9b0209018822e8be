"""`make run` as processes: ports moved from one place reach every part and every hint,
"running" only once all three answer, a taken port or a failed start is named, and SIGTERM or
SIGINT to the runner stops all of them."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import Certs, free_port
from ztgateway.dev.run import _answers, free_port_offset, moved_idp_users, set_keys
from ztgateway.dev.tokens import issue_token

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            joined = "".join(self.lines)
            if text in joined:
                return joined
            if self.proc.poll() is not None:
                time.sleep(0.2)
                return "".join(self.lines)
            time.sleep(0.1)
        raise TimeoutError(f"{text!r} not printed; got:\n{''.join(self.lines)}")


@pytest.fixture
def demo_dir(certs: Certs, tmp_path: Path) -> Path:
    """A checkout's layout: config/ and certs/ side by side, as `make run` expects."""
    (tmp_path / "config").mkdir()
    for name in ("gateway.toml", "dev-idp-users.toml", "demo-logo.svg"):
        shutil.copy(REPO / "config" / name, tmp_path / "config" / name)
    shutil.copytree(certs.dir, tmp_path / "certs")
    return tmp_path


def start(cwd: Path, *argv: str) -> Run:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztgateway.dev.run", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return Run(proc)


def nobody_listens(ports: list[int], timeout: float = 30.0) -> bool:
    """No process accepts on any of `ports` (a refused connection; a bind could still fail on
    the server side's TIME_WAIT entries from the test's own requests)."""

    def refused(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(refused(p) for p in ports):
            return True
        time.sleep(0.1)
    return False


def free_offset() -> int:
    return free_port_offset()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.close()


def _get(url: str, certs: Certs, cwd: Path, **headers: str) -> tuple[int, dict[str, str], str]:
    ctx = ssl.create_default_context(cafile=str(cwd / "certs" / "ca.pem"))
    ctx.load_cert_chain(
        str(cwd / "certs/clients/alice-laptop.pem"), str(cwd / "certs/clients/alice-laptop.key")
    )

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: object, **k: object) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def _sign_in_url(origin: str, certs: Certs, cwd: Path) -> str:
    """Where the gateway sends a browser to sign in: its redirects, then the sign-in link."""
    url = origin + "/"
    for _ in range(5):
        status, headers, body = _get(url, certs, cwd, Accept="text/html")
        if status in (302, 303):
            url = urllib.parse.urljoin(url, headers["Location"])
            if not url.startswith(origin):
                return url
            continue
        link = re.search(r'href="(/[^"]*start[^"]*)"', body)
        assert link is not None, body
        url = origin + link.group(1).replace("&amp;", "&")
    raise AssertionError("no redirect to the identity provider")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_one_offset_moves_every_port_and_a_signal_stops_all_three(
    demo_dir: Path, certs: Certs, runs: list[Run], how: signal.Signals
) -> None:
    offset = free_offset()
    gw, ops, app, idp = (p + offset for p in (8443, 9100, 8080, 9200))
    run = start(demo_dir, "--port-offset", str(offset))
    runs.append(run)
    out = run.wait_for("Ctrl-C stops all three")
    assert "ztgateway is running" in out
    # The hints name the ports that were bound, nothing else.
    assert f"https://127.0.0.1:{gw}/echo" in out and f"http://127.0.0.1:{ops}/metrics" in out
    assert ":8443" not in out and ":9100" not in out
    # Every part answers on its moved port: the gateway forwards to the moved demo app (its
    # API: alice's certificate alone no longer skips the demo app's daily TOTP)...
    token = issue_token(demo_dir / "certs" / "issuer.key", sub="alice")
    status, _, body = _get(
        f"https://127.0.0.1:{gw}/api/echo", certs, demo_dir, Authorization=f"Bearer {token}"
    )
    assert status == 200 and "alice" in body
    # ...and sends a browser to the moved dev IdP with a redirect URI the IdP accepts.
    location = _sign_in_url(f"https://127.0.0.1:{gw}", certs, demo_dir)
    assert location.startswith(f"http://127.0.0.1:{idp}/authorize?")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
    assert query["redirect_uri"] == [f"https://127.0.0.1:{gw}/.ztgw/oidc/callback"]
    with urllib.request.urlopen(location, timeout=10) as r:  # the IdP's sign-in form, no error
        assert r.status == 200 and "password" in r.read().decode().lower()
    # The moved dev IdP is the gateway's Shared Signals transmitter: the demo's command pushes
    # a signed SET the moved gateway accepts (202), over mTLS with the IdP's own certificate.
    sent = subprocess.run(
        [
            sys.executable, "-m", "ztgateway", "dev-ssf", "send", "--idp",
            f"http://127.0.0.1:{idp}", "--event", "session-revoked", "--sub", "alice",
            "--control-token", "dev-ssf-control-token-not-for-production",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert '"receiver_status": 202' in sent.stdout
    run.proc.send_signal(how)
    assert run.proc.wait(timeout=40) == 0
    assert nobody_listens([gw, ops, app, idp])
    assert f"{how.name}: stopping the demo" in "".join(run.lines)


def test_explicit_ports_and_a_taken_port_is_named(demo_dir: Path, runs: list[Run]) -> None:
    gw, ops, app, idp = (free_port() for _ in range(4))
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", gw))
        blocker.listen()
        run = start(
            demo_dir, "--gateway-port", str(gw), "--ops-port", str(ops), "--app-port",
            str(app), "--idp-port", str(idp),
        )  # fmt: skip
        runs.append(run)
        assert run.proc.wait(timeout=30) == 1
    out = "".join(run.lines)
    assert f"error: port {gw} for the gateway is already in use" in out
    assert "make run GATEWAY_PORT=<port>" in out
    assert "running" not in out
    assert nobody_listens([ops, app, idp], timeout=5)


def test_a_gateway_that_fails_to_start_is_reported_and_the_others_stop(
    demo_dir: Path, runs: list[Run]
) -> None:
    config = demo_dir / "config" / "gateway.toml"
    # Loads (check-config passes) but cannot open its audit log at start.
    (demo_dir / "blocker").write_text("a file, not a directory\n")
    config.write_text(set_keys(config.read_text(), {("audit", "db"): "../blocker/audit.db"}))
    offset = free_offset()
    run = start(demo_dir, "--port-offset", str(offset))
    runs.append(run)
    assert run.proc.wait(timeout=60) == 1
    out = "".join(run.lines)
    assert "error: the gateway exited during start-up (exit 1)" in out
    assert "ztgateway is running" not in out
    assert nobody_listens([p + offset for p in (8443, 9100, 8080, 9200)], timeout=30)


def test_a_probe_answered_with_its_own_request_is_not_ready() -> None:
    """Seen in CI: the readiness probe of a port in the ephemeral range connected to itself
    (TCP simultaneous open) and read `GET /readyz HTTP/1.1` as the status line; `make run`
    crashed with BadStatusLine instead of waiting. A server echoing the request is the same."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def echo() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(conn.recv(4096))

        thread = threading.Thread(target=echo, daemon=True)
        thread.start()
        assert _answers(f"http://127.0.0.1:{port}/readyz") is None
        thread.join(5)
    assert _answers(f"http://127.0.0.1:{port}/readyz") is None  # nothing listening


def test_moving_keeps_the_files_layout_and_comments() -> None:
    text = (REPO / "config" / "gateway.toml").read_text()
    moved = set_keys(
        text, {("server", "port"): 18443, ("oidc", "issuer"): "http://127.0.0.1:19200"}
    )
    assert "port = 18443" in moved and 'issuer = "http://127.0.0.1:19200"' in moved
    assert moved.count("\n") == text.count("\n")
    assert "# the handshake itself refuses clients without a certificate" in moved
    users = moved_idp_users((REPO / "config" / "dev-idp-users.toml").read_text(), 8443, 18443)
    uris = re.findall(r'"(https://[^"]+)"', users)
    assert uris and all(":18443/" in u for u in uris)
    assert "password_hash" in users
