"""Every page a person meets, clicked through in real Chromium on the demo configuration's own
routes (config/gateway.toml: the same [[routes]], [sessions], [posture] and [portal]).

alice (admins) signs in and meets TOTP enrolment on /admin/, the risk step-up on /reports/, the
remediation page on /secure/ from a device that fails its posture; bob (not in admins) meets
the group-denied page; a locked account sees until when; a person whose session was ended is
told why; sign-out and whoami. Every page carries the demo's branding.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from tests.e2e.test_browser import browser, device_context, sign_in  # noqa: F401 - fixture
from tests.oidc_fixtures import SignInSetup, report_unencrypted_mac
from tests.support import Certs
from ztgateway.credentials.totp import totp_code
from ztgateway.store.base import UserRecord

ROOT = Path(__file__).resolve().parents[2]


def demo_overrides() -> dict[str, Any]:
    """The demo configuration's routes and the sections that shape its pages."""
    demo = tomllib.loads((ROOT / "config" / "gateway.toml").read_text())
    portal = dict(demo["portal"])
    portal["logo"] = str(ROOT / "config" / portal["logo"])
    return {
        "routes": demo["routes"],
        "sessions": demo["sessions"],
        "posture": demo["posture"],
        "portal": portal,
    }


DEMO = demo_overrides()
BRAND = DEMO["portal"]["name"]
SUPPORT = DEMO["portal"]["support_email"]

pytestmark = [
    pytest.mark.browser,
    # Every test here runs on the demo configuration's routes and portal.
    pytest.mark.parametrize("signin", [DEMO], indirect=True),
]


async def branded(page: Page) -> str:
    """The page's main text, after checking it is the one skeleton with the demo's branding."""
    assert (await page.title()).endswith(f"– {BRAND}")
    assert await page.locator("header.brand img").count() == 1
    assert await page.locator('link[rel="stylesheet"][href^="/.ztgw/static/portal-"]').count() == 1
    footer = await page.inner_text("footer")
    assert SUPPORT in footer and "Reference" in footer
    # The stylesheet was applied (served from /.ztgw/static/ under the strict CSP).
    width = await page.evaluate("getComputedStyle(document.querySelector('main')).maxWidth")
    assert width != "none"
    return await page.inner_text("main")


@contextlib.asynccontextmanager
async def demo_page(
    browser: Browser,  # noqa: F811
    signin: SignInSetup,
    certs: Certs,
    device: str = "alice-laptop",
) -> AsyncIterator[Page]:
    """A page on a device's browser context whose Content-Security-Policy violations are
    collected: the pages load their stylesheet and logo from /.ztgw/static/ and have no inline
    style or script, so Chromium must report none under `style-src 'self'` (no
    'unsafe-inline'); checked when the test's steps are done."""
    on_device = await device_context(browser, signin, certs, device=device)
    violations: list[str] = []
    try:
        page = await on_device.new_page()
        page.on(
            "console",
            lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
        )
        yield page
    finally:
        await on_device.close()
    assert not violations, violations


async def code_for(signin: SignInSetup, secret: str) -> str:
    return totp_code(secret, now=signin.gateway.clock.time())


async def test_alice_enrols_totp_for_the_admin_route_on_her_phone_sized_screen(
    browser: Browser,  # noqa: F811
    signin: SignInSetup,
    certs: Certs,
) -> None:
    async with demo_page(browser, signin, certs) as page:
        await page.set_viewport_size({"width": 390, "height": 844})
        await sign_in(page, signin, "/admin/echo")
        await page.wait_for_url(re.compile(r"/\.ztgw/mfa/enroll"))
        text = await branded(page)
        assert "Set up your second factor" in text
        await page.get_by_role("button", name="Set up an authenticator app").click()
        await page.wait_for_selector(".qr svg")
        # On a phone the QR code cannot be scanned by the phone itself: a link opens the app.
        link = page.get_by_role("link", name="Open in authenticator app")
        href = await link.get_attribute("href")
        assert href is not None and href.startswith("otpauth://totp/")
        box = await link.bounding_box()
        assert box is not None and box["height"] >= 40, "a tap target"
        # Nothing wider than the phone's screen (no sideways scrolling).
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        secret = (await page.locator("code.key").inner_text()).replace(" ", "")
        assert secret in href
        await page.get_by_label("Code from your app").fill(await code_for(signin, secret))
        await page.get_by_role("button", name="Finish set-up").click()
        text = await branded(page)
        assert "backup codes" in text
        await page.get_by_role("link", name="Continue").click()
        await page.wait_for_url(signin.origin + "/admin/echo")
        assert '"x-forwarded-user": "alice"' in await page.inner_text("body")


async def test_a_first_visit_to_reports_is_a_risk_step_up(
    browser: Browser,  # noqa: F811
    signin: SignInSetup,
    certs: Certs,
) -> None:
    secret = (await signin.gateway.mfa.enroll("alice")).secret
    async with demo_page(browser, signin, certs) as page:
        await sign_in(page, signin, "/reports/echo")
        await page.wait_for_url(re.compile(r"/\.ztgw/mfa\?rd=/reports/echo&why=risk-step-up"))
        text = await branded(page)
        assert "Confirm it is you" in text and "riskier than usual" in text
        await page.get_by_label("Code").fill("000000")
        await page.get_by_role("button", name="Verify").click()
        text = await branded(page)
        assert "That code did not work" in text and "riskier than usual" in text
        await page.get_by_label("Code").fill(await code_for(signin, secret))
        await page.get_by_role("button", name="Verify").click()
        await page.wait_for_url(signin.origin + "/reports/echo")
        # The second factor just given also answers /admin/'s 15 minutes.
        await page.goto(signin.origin + "/admin/echo")
        assert '"x-forwarded-user": "alice"' in await page.inner_text("body")


async def test_bob_is_told_admin_is_for_another_group(
    browser: Browser,  # noqa: F811
    signin: SignInSetup,
    certs: Certs,
) -> None:
    async with demo_page(browser, signin, certs, device="bob-phone") as page:
        await sign_in(page, signin, "/admin/echo", user="bob")
        text = await branded(page)
        assert "Your account is not in a group allowed here" in text
        assert "Ask the application owner for access" in text
        assert "group-required" in text


async def test_a_device_that_fails_its_posture_sees_each_check_in_words(
    browser: Browser,  # noqa: F811
    signin: SignInSetup,
    certs: Certs,
) -> None:
    await report_unencrypted_mac(signin, certs)
    async with demo_page(browser, signin, certs) as page:
        await page.goto(signin.origin + "/secure/echo")
        await page.wait_for_url(re.compile(r"/\.ztgw/device\?rd=/secure/echo"))
        text = await branded(page)
        assert "This device does not meet the security requirements" in text
        failed = page.locator("ul.checks li.fail")
        assert await failed.count() == 1
        assert "Disk encryption — the disk is not encrypted" in await failed.inner_text()
        integrity = page.locator("ul.checks li", has_text="System integrity")
        assert "Passed" in await integrity.inner_text()
        assert "not jailbroken or rooted" in await integrity.inner_text()
        assert "✓" not in text and "jailbroken or rooted;" not in text
        # What to do appears once, and the way back is there.
        assert text.count("Turn on disk encryption") == 1
        await page.get_by_role("link", name="Check again").click()
        await page.wait_for_url(re.compile(r"/\.ztgw/device\?rd="))
        assert await page.get_by_role("link", name="Back to /secure/echo").count() == 1


async def test_a_locked_account_sees_until_when_and_an_ended_session_why(
    browser: Browser,  # noqa: F811
    signin: SignInSetup,
    certs: Certs,
) -> None:
    gw = signin.gateway
    async with demo_page(browser, signin, certs) as page:
        await sign_in(page, signin, "/")  # lands on the daily TOTP enrolment of the demo's app
        # Locked for 25 minutes from the gateway's clock, said in her time zone.
        now = gw.clock.time()
        await gw.store.save_user(
            UserRecord(user="alice", timezone="Asia/Tokyo", locked_until=now + 25 * 60)
        )
        await page.goto(signin.origin + "/form")
        text = await branded(page)
        assert "account is locked" in text and "account-locked" in text
        ends = dt.datetime.fromtimestamp(now + 25 * 60, dt.timezone(dt.timedelta(hours=9)))
        assert f"{ends:%H:%M} (Asia/Tokyo)" in text
        assert re.search(r"in (25|24) minutes", text)
        # Unlocked, and an operator ends her sessions (the reason is theirs: the page says only
        # who ended it).
        await gw.store.save_user(UserRecord(user="alice", timezone="Asia/Tokyo"))
        for session in gw.store.sessions("alice"):
            await gw.store.revoke_session(session.session_id, "laptop reported stolen", time.time())
        await page.goto(signin.origin + "/form")
        await page.wait_for_url(re.compile(r"/\.ztgw/login\?rd=/form&ended=revoked"))
        text = await branded(page)
        assert "An administrator ended your session" in text
        assert "laptop reported stolen" not in text


async def test_sign_out_whoami_and_signed_out_are_the_same_portal(
    browser: Browser,  # noqa: F811
    signin: SignInSetup,
    certs: Certs,
) -> None:
    async with demo_page(browser, signin, certs) as page:
        await sign_in(page, signin, "/")
        # The gateway's own namespace is not an application: it leads to the person's page.
        await page.goto(signin.origin + "/.ztgw/")
        await page.wait_for_url(signin.origin + "/.ztgw/whoami")
        text = await branded(page)
        assert "alice" in text and "your sign-in with the identity provider" in text
        assert "Times in UTC" in text
        await page.get_by_role("link", name="Sign out").click()
        await page.wait_for_url(re.compile(r"/\.ztgw/logout"))
        await branded(page)
        await page.get_by_role("button", name="Sign out").click()
        await page.wait_for_url(re.compile(r"/\.ztgw/signed-out"))
        assert "You are signed out" in await branded(page)
        # One provider and nothing to say: the browser goes straight to it.
        await page.get_by_role("link", name="Sign in again").click()
        await page.get_by_label("Username").wait_for()


async def test_too_many_wrong_codes_say_until_when_the_second_factor_is_locked(
    browser: Browser,  # noqa: F811
    signin: SignInSetup,
    certs: Certs,
) -> None:
    await signin.gateway.mfa.enroll("alice")
    async with demo_page(browser, signin, certs) as page:
        await sign_in(page, signin, "/reports/echo")
        await page.wait_for_url(re.compile(r"/\.ztgw/mfa\?"))
        text = ""
        for _ in range(signin.gateway.config.mfa.max_failures + 1):
            await page.get_by_label("Code").fill("000000")
            await page.get_by_role("button", name="Verify").click()
            await page.wait_for_load_state()
            text = await branded(page)
            if "Too many wrong codes" in text:
                break
        assert "Too many wrong codes" in text
        ends = signin.gateway.clock.time() + signin.gateway.config.mfa.ban_time
        shown = dt.datetime.fromtimestamp(ends, dt.UTC)
        assert re.search(rf"You can try again at {shown:%H}:\d\d \(UTC\), in 1[45] minutes", text)
