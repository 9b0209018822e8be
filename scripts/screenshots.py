"""`make screenshots`: every page a person meets, photographed in real Chromium from the real
demo (docs/screenshots/*.png, shown in docs/portal.md and the README).

The demo is started as `make run` starts it (`python -m ztgateway.dev.run`: the demo app, the
dev IdP and the gateway with config/gateway.toml and its [portal] branding) in a scratch copy of
the checkout, on ports moved by a free offset and with fresh state, so the pictures never depend
on what a developer's own demo has seen. Debian's Chromium (/usr/bin/chromium), driven by
Playwright, presents the dev PKI's device certificates (alice-laptop, bob-phone) and signs in at
the dev IdP like a person would; the operator's side (setting up alice's TOTP, ending her
sessions, locking her account) goes through the `ztgateway` command line, as an operator's would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyotp
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from ztgateway.dev.run import free_port_offset

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
PASSWORDS = {"alice": "alice-dev-password", "bob": "bob-dev-password"}


class Demo:
    """The demo runner in a scratch checkout, and the operator's command line beside it."""

    def __init__(self, root: Path, offset: int) -> None:
        self.root = root
        self.offset = offset
        self.origin = f"https://127.0.0.1:{8443 + offset}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ztgateway.dev.run", "--port-offset", str(offset)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_running(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = "".join(self.lines)
            if "Ctrl-C stops all three" in text:
                if "ztgateway is running" not in text:
                    raise SystemExit(f"the demo did not start:\n{text}")
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"the demo exited:\n{text}")
            time.sleep(0.2)
        raise SystemExit("the demo did not answer in time:\n" + "".join(self.lines))

    def cli(self, *argv: str) -> str:
        out = subprocess.run(
            [str(REPO / ".venv" / "bin" / "ztgateway"), *argv],
            cwd=self.root,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    def post_posture(self, report: dict[str, Any]) -> None:
        ctx = ssl.create_default_context(cafile=str(self.root / "certs" / "ca.pem"))
        certs = self.root / "certs" / "clients"
        ctx.load_cert_chain(certs / "alice-laptop.pem", certs / "alice-laptop.key")
        request = urllib.request.Request(
            self.origin + "/.ztgw/posture",
            data=json.dumps(report).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, context=ctx, timeout=10) as r:
            assert r.status == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def scratch_checkout() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ztgw-screenshots-") as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "config", root / "config", ignore=shutil.ignore_patterns(".*"))
        shutil.copytree(REPO / "certs", root / "certs", ignore=shutil.ignore_patterns("*.db"))
        (root / ".venv").symlink_to(REPO / ".venv")
        yield root


class Camera:
    def __init__(self, out: Path, demo: Demo) -> None:
        self.out = out
        self.demo = demo
        self.taken: list[str] = []

    async def context(self, browser: Browser, device: str, viewport: dict[str, int]) -> Page:
        certs = self.demo.root / "certs" / "clients"
        context: BrowserContext = await browser.new_context(
            ignore_https_errors=True,
            locale="en-GB",
            viewport=viewport,
            device_scale_factor=1,
            client_certificates=[
                {
                    "origin": self.demo.origin,
                    "certPath": str(certs / f"{device}.pem"),
                    "keyPath": str(certs / f"{device}.key"),
                }
            ],
        )
        page = await context.new_page()
        page.set_default_timeout(20_000)
        return page

    async def shot(self, page: Page, name: str, *, full: bool = True) -> None:
        await page.wait_for_load_state("networkidle")
        await page.screenshot(path=str(self.out / f"{name}.png"), full_page=full)
        self.taken.append(name)
        print(f"  {name}.png  {page.url.replace(self.demo.origin, '')}")

    async def until_url(self, page: Page, url: str, part: str) -> None:
        """Open `url` until the browser lands where `part` says: the command line wrote the
        store, and the gateway hears of it within its sync interval (a fraction of a second)."""
        for _ in range(50):
            await page.goto(url)
            if part in page.url:
                return
            await asyncio.sleep(0.1)
        raise SystemExit(f"{url} never led to {part!r} (at {page.url})")

    async def until_text(self, page: Page, url: str, text: str) -> None:
        for _ in range(50):
            await page.goto(url)
            if text in await page.inner_text("body"):
                return
            await asyncio.sleep(0.1)
        raise SystemExit(f"{url} never showed {text!r}")

    async def sign_in_at_idp(self, page: Page, user: str, *, name: str | None = None) -> None:
        """The demo has one identity provider: a browser without a session goes straight to
        its form."""
        await page.get_by_label("Username").wait_for()
        if name:
            await self.shot(page, name)
        await page.get_by_label("Username").fill(user)
        await page.get_by_label("Password").fill(PASSWORDS[user])
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url(f"{self.demo.origin}/**")


def code(secret: str) -> str:
    return pyotp.TOTP(secret).now()


async def alice(camera: Camera, browser: Browser, secret: str) -> None:
    """alice-laptop, desktop: sign-in, the risk step-up, the app, whoami, remediation, an
    ended session, a locked account, a refusal for programs, sign-out, a failed sign-in."""
    origin = camera.demo.origin
    page = await camera.context(browser, "alice-laptop", DESKTOP)
    await page.goto(origin + "/reports/echo")
    await camera.sign_in_at_idp(page, "alice", name="02-identity-provider")
    await page.wait_for_url("**/.ztgw/mfa?**")
    await camera.shot(page, "03-step-up-risk")
    await page.get_by_label("Code").fill("000000")
    await page.get_by_role("button", name="Verify").click()
    await camera.shot(page, "04-step-up-wrong-code")
    await page.get_by_label("Code").fill(code(secret))
    await page.get_by_role("button", name="Verify").click()
    await page.wait_for_url(origin + "/reports/echo")
    await page.goto(origin + "/")
    await camera.shot(page, "05-legacy-app")
    await page.goto(origin + "/.ztgw/whoami")
    await camera.shot(page, "06-whoami")
    await page.goto(origin + "/api/echo")
    await camera.shot(page, "07-refused-token-required")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    report = {
        "platform": "macos", "os_version": "13.6", "last_patch": today,
        "disk_encrypted": False, "firewall": True, "antivirus": True, "screen_lock": True,
        "mdm_enrolled": True, "jailbroken": False,
    }  # fmt: skip
    camera.demo.post_posture(report)
    await page.goto(origin + "/secure/echo")
    await page.wait_for_url("**/.ztgw/device?**")
    await camera.shot(page, "08-device-remediation")
    camera.demo.post_posture({**report, "os_version": "15.1", "disk_encrypted": True})
    camera.demo.cli("sessions", "terminate", "--user", "alice", "--reason", "laptop reported lost")
    await camera.until_url(page, origin + "/", "ended=revoked")
    await camera.shot(page, "09-session-ended")
    await page.get_by_role("link", name=re.compile("^Sign in with")).click()  # the IdP knows her
    await page.wait_for_url(f"{origin}/**")
    camera.demo.cli("users", "lock", "alice", "--for", "25m")
    await camera.until_text(page, origin + "/", "The lock ends at")
    await camera.shot(page, "10-account-locked")
    camera.demo.cli("users", "unlock", "alice")
    await page.goto(origin + "/.ztgw/logout")
    await camera.shot(page, "11-sign-out")
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url("**/.ztgw/signed-out")
    await camera.shot(page, "12-signed-out")
    await page.goto(origin + "/.ztgw/oidc/callback?state=reused&code=reused")
    await camera.shot(page, "13-sign-in-failed")
    await page.context.close()


async def bob(camera: Camera, browser: Browser) -> None:
    """bob-phone: TOTP enrolment on a desktop screen and on the phone itself, the backup
    codes, and the admin page his group may not use."""
    origin = camera.demo.origin
    desk = await camera.context(browser, "bob-phone", DESKTOP)
    await desk.goto(origin + "/")
    await camera.sign_in_at_idp(desk, "bob")
    await desk.wait_for_url("**/.ztgw/mfa/enroll?**")
    await camera.shot(desk, "20-enrol-start")
    await desk.get_by_role("button", name="Set up an authenticator app").click()
    await desk.wait_for_selector(".qr svg")
    await camera.shot(desk, "21-enrol-qr-code")
    phone = await camera.context(browser, "bob-phone", PHONE)
    await phone.goto(origin + "/")
    await camera.sign_in_at_idp(phone, "bob")
    await phone.wait_for_url("**/.ztgw/mfa/enroll?**")
    await camera.shot(phone, "22-enrol-on-a-phone")
    secret = (await phone.locator("code.key").inner_text()).replace(" ", "")
    await phone.get_by_label("Code from your app").fill(code(secret))
    await phone.get_by_role("button", name="Finish set-up").click()
    await camera.shot(phone, "23-backup-codes")
    await desk.goto(origin + "/admin/echo")
    await camera.shot(desk, "24-refused-group-required")
    await desk.context.close()
    await phone.context.close()


async def shoot(out: Path, demo: Demo, alice_secret: str) -> list[str]:
    camera = Camera(out, demo)
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"],
        )
        try:
            await alice(camera, browser, alice_secret)
            await bob(camera, browser)
        finally:
            await browser.close()
    return camera.taken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/screenshots.py", description=__doc__)
    parser.add_argument(
        "--out", default=str(REPO / "docs" / "screenshots"), help="folder for the PNG files"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with scratch_checkout() as root:
        demo = Demo(root, free_port_offset())
        try:
            demo.wait_running()
            print(f"demo running at {demo.origin}; photographing into {out}")
            uri = demo.cli("users", "mfa", "enroll", "alice").strip().splitlines()[-1]
            taken = asyncio.run(shoot(out, demo, pyotp.parse_uri(uri).secret))
        finally:
            demo.stop()
    # Only this script's pictures (NN-name.png): docs/oidc.md's chooser pictures come from
    # tests/e2e/test_several_providers.py (ZTGW_SCREENSHOTS), the demo having one provider.
    stale = sorted(p.name for p in out.glob("[0-9][0-9]-*.png") if p.stem not in taken)
    for name in stale:
        (out / name).unlink()
    print(f"{len(taken)} screenshots" + (f"; removed {', '.join(stale)}" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
