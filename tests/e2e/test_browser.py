"""People browsing through the gateway, in a real Chromium driven by Playwright.

Debian's Chromium (`/usr/bin/chromium`), the device certificate given to the browser context
(Playwright's `client_certificates`), the dev identity provider for sign-in. On failure a
screenshot is kept under test-artifacts/.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Error, Page, async_playwright

from tests.oidc_fixtures import PASSWORDS, SignInSetup, report_unencrypted_mac
from tests.support import Certs, real_time_env
from ztgateway.credentials.totp import totp_code
from ztgateway.sessions import cookie_session_id

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
DRIFT = {
    "server": {"trusted_proxies": ["127.0.0.1/32"]},
    "routes": [
        {
            "name": "app",
            "prefix": "/",
            "upstream": "demo",
            "policy": {"login": "browsers"},
            "session": {"ip_drift": "step_up"},
        },
        {
            "name": "secure",
            "prefix": "/secure/",
            "upstream": "demo",
            "policy": {"login": "always", "min_trust": "compliant"},
        },
    ],
}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian's chromium package is required (installed by .ci/run)"
    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, env=real_time_env()
        )
        yield b
        await b.close()


@pytest.fixture
async def page(
    browser: Browser, signin: SignInSetup, certs: Certs, request: pytest.FixtureRequest
) -> AsyncIterator[Page]:
    context = await device_context(browser, signin, certs)
    pg = await context.new_page()
    pg.set_default_timeout(15_000)
    yield pg
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        await pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    await context.close()


async def device_context(
    browser: Browser, signin: SignInSetup, certs: Certs, device: str | None = "alice-laptop"
) -> BrowserContext:
    options: dict[str, Any] = {"ignore_https_errors": True, "locale": "en-GB"}
    if device:
        pem, key = certs.client(device)
        options["client_certificates"] = [
            {"origin": signin.origin, "certPath": str(pem), "keyPath": str(key)}
        ]
    return await browser.new_context(**options)


async def shot(page: Page, name: str) -> None:
    """With ZTGW_SCREENSHOTS=<dir>, keep a picture of a page only a test's configuration shows
    (docs/oidc.md's provider chooser); every page of the demo is photographed by
    `make screenshots` (scripts/screenshots.py)."""
    target = os.environ.get("ZTGW_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(target) / f"{name}.png"))


async def sign_in(
    page: Page,
    signin: SignInSetup,
    path: str = "/",
    user: str = "alice",
    provider: str | None = None,
) -> None:
    """Sign in at the dev IdP; `provider`: the chooser's button to click first (several
    providers); without it the route's one provider takes the browser straight there."""
    await page.goto(signin.origin + path)
    if provider is not None:
        await page.wait_for_url(re.compile(r"/\.ztgw/login\?rd="))
        await page.get_by_role("link", name=f"Sign in with {provider}").click()
    await idp_form(page, signin, user)


async def idp_form(page: Page, signin: SignInSetup, user: str = "alice") -> None:
    """Fill the dev IdP's sign-in form; the browser ends up back at the gateway."""
    await page.get_by_label(re.compile("password", re.I)).wait_for()
    await page.get_by_label(re.compile("user", re.I)).fill(user)
    await page.get_by_label(re.compile("password", re.I)).fill(PASSWORDS[user])
    await page.get_by_role("button", name=re.compile("sign in|log in|continue", re.I)).click()
    await page.wait_for_url(re.compile(re.escape(signin.origin)))


async def test_person_signs_in_and_uses_the_legacy_app(page: Page, signin: SignInSetup) -> None:
    await page.goto(signin.origin + "/")
    # One provider: no chooser, straight to its sign-in page.
    await page.wait_for_url(re.compile(re.escape(signin.issuer) + "/authorize"))
    await sign_in(page, signin)
    await page.wait_for_url(signin.origin + "/")
    body = await page.content()
    assert "alice" in body  # the demo app shows the identity headers it received
    await page.goto(signin.origin + "/.ztgw/whoami")
    assert "alice" in await page.inner_text("main")


async def test_mfa_route_enrols_and_asks_for_a_fresh_code(page: Page, signin: SignInSetup) -> None:
    await sign_in(page, signin, "/admin/echo")
    await page.wait_for_url(re.compile(r"/\.ztgw/mfa/enroll"))
    # Issue 18 (M1): the page alone sets nothing up; the person's POST starts the enrolment.
    await page.get_by_role("button", name="Set up an authenticator app").click()
    await page.wait_for_selector("svg")  # the QR code
    secret = (await page.locator("code.key").inner_text()).replace(" ", "")
    assert re.fullmatch(r"[A-Z2-7]{32}", secret), secret
    await page.get_by_label("Code from your app").fill(totp_code(secret, now=time.time()))
    await page.get_by_role("button", name="Finish set-up").click()
    await page.get_by_role("link", name="Continue").click()
    await page.wait_for_url(signin.origin + "/admin/echo")
    assert '"x-forwarded-user": "alice"' in await page.inner_text("body")
    await page.goto(signin.origin + "/")
    await page.goto(signin.origin + "/.ztgw/whoami")


@pytest.mark.parametrize("signin", [DRIFT], indirect=True)
async def test_moving_to_another_address_asks_for_step_up_again(
    browser: Browser, signin: SignInSetup, certs: Certs
) -> None:
    secret = (await signin.gateway.mfa.enroll("alice")).secret
    context = await device_context(browser, signin, certs)
    page = await context.new_page()
    await sign_in(page, signin)
    await page.wait_for_url(signin.origin + "/")
    await context.set_extra_http_headers({"X-Forwarded-For": "10.9.8.7"})
    await page.goto(signin.origin + "/form")
    await page.wait_for_url(re.compile(r"/\.ztgw/mfa\?rd="))
    await page.get_by_label("Code").fill(totp_code(secret, now=time.time()))
    await page.get_by_role("button", name="Verify").click()
    await page.wait_for_url(signin.origin + "/form")
    await context.close()


async def test_a_terminated_session_bounces_to_sign_in(page: Page, signin: SignInSetup) -> None:
    await sign_in(page, signin)
    await page.wait_for_url(signin.origin + "/")
    # The browser's own session, by its cookie (the store's list may not hold it yet).
    store = signin.gateway.store
    name = signin.gateway.config.sessions.cookie_name
    (cookie,) = [c["value"] for c in await page.context.cookies() if c["name"] == name]
    current = await store.find_session(cookie_session_id(cookie))
    assert current is not None
    ended = [current, *(s for s in store.sessions("alice") if s.session_id != current.session_id)]
    for session in ended:
        await store.revoke_session(session.session_id, "terminated in a test", time.time())
    to_provider: list[str] = []
    page.on(
        "request",
        lambda r: to_provider.append(r.url) if r.url.startswith(signin.issuer) else None,
    )
    await page.goto(signin.origin + "/form")
    # The person is told why first (even with one provider, which would otherwise be
    # straight away): then the provider, which still knows the browser, sends it back signed
    # in: a new session, never the terminated one.
    await page.wait_for_url(re.compile(r"/\.ztgw/login\?rd=/form&ended=revoked"))
    assert "An administrator ended your session" in await page.inner_text("main")
    assert not to_provider
    await page.get_by_role("link", name=re.compile("^Sign in with")).click()
    await page.wait_for_url(signin.origin + "/form")
    assert any(u.startswith(signin.issuer + "/authorize") for u in to_provider), to_provider
    fresh = [s for s in signin.gateway.store.sessions("alice") if not s.revoked]
    assert len(fresh) == 1 and fresh[0].session_id not in {s.session_id for s in ended}


@pytest.mark.parametrize("signin", [DRIFT], indirect=True)
async def test_a_noncompliant_device_sees_what_to_fix(
    page: Page, signin: SignInSetup, certs: Certs
) -> None:
    await report_unencrypted_mac(signin, certs)
    # The device is refused before anyone signs in: the browser lands on what to fix.
    await page.goto(signin.origin + "/secure/echo")
    await page.wait_for_url(re.compile(r"/\.ztgw/device"))
    text = await page.inner_text("main")
    assert "does not meet" in text and "Turn on disk encryption" in text


async def test_no_client_certificate_means_no_page(
    browser: Browser, signin: SignInSetup, certs: Certs
) -> None:
    context = await device_context(browser, signin, certs, device=None)
    page = await context.new_page()
    with pytest.raises(Error):
        await page.goto(signin.origin + "/", timeout=10_000)
    await context.close()
