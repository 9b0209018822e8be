"""Every form of the gateway's own that changes state, clicked in a real Chromium and followed to
the page it ends on; and a page on another site that tries to make the browser send them.

Sign-out (issue 18: it failed in Chromium every time), TOTP enrolment (start, reload, a wrong
code, the confirming code, the backup codes, back to the application), replacing the
authenticator with the current code. The step-up form is clicked in test_browser.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page

from tests.e2e.test_browser import browser, device_context, page, shot, sign_in
from tests.oidc_fixtures import SignInSetup
from tests.support import Certs
from ztgateway.credentials.totp import totp_code

pytestmark = pytest.mark.browser
__all__ = ["browser", "page"]  # fixtures, used by name


def csp_errors(pg: Page) -> list[str]:
    errors: list[str] = []
    pg.on(
        "console",
        lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
    )
    return errors


async def test_sign_out_in_chromium_ends_both_sessions_and_lands_on_the_signed_out_page(
    page: Page, signin: SignInSetup
) -> None:
    gw = signin.gateway
    errors = csp_errors(page)
    await sign_in(page, signin)
    await page.wait_for_url(signin.origin + "/")
    [session] = [s for s in gw.store.sessions("alice") if not s.revoked]
    await page.goto(signin.origin + "/.ztgw/logout")
    await page.get_by_role("button", name="Sign out").click()
    # The gateway's sign-out, then the provider's end-session endpoint, then back here.
    await page.wait_for_url(signin.origin + "/.ztgw/signed-out")
    assert "You are signed out" in await page.inner_text("main")
    await shot(page, "7-signed-out")
    ended = gw.store.session(session.session_id)
    assert ended is not None and ended.revoked_reason == "signed out"
    assert errors == [], errors
    # The provider's session ended too: signing in again asks for the password.
    await page.goto(signin.origin + "/")
    await page.wait_for_url(re.compile(re.escape(signin.issuer)))
    assert await page.get_by_label(re.compile("password", re.I)).count() == 1


async def test_enrolment_in_chromium_survives_a_reload_and_a_wrong_code(
    page: Page, signin: SignInSetup
) -> None:
    gw = signin.gateway
    await sign_in(page, signin, "/admin/echo")
    await page.wait_for_url(re.compile(r"/\.ztgw/mfa/enroll\?rd=/admin/echo"))
    # Showing the page sets nothing up: that takes the person's POST.
    assert await page.locator("svg").count() == 0
    assert not gw.mfa.enrolled("alice") and gw.mfa.pending("alice", time.time()) is None
    await page.get_by_role("button", name="Set up an authenticator app").click()
    await page.wait_for_url(re.compile(r"/\.ztgw/mfa/enroll\?rd=/admin/echo"))
    assert await page.locator("svg").count() == 1
    secret = await page.locator("code").first.inner_text()
    assert re.fullmatch(r"[A-Z2-7]{32}", secret), secret
    assert not gw.mfa.enrolled("alice"), "pending until a code confirms it"
    await page.reload()
    assert await page.locator("code").first.inner_text() == secret, "a reload keeps the QR code"
    await page.get_by_label("Code from your app").fill("000000")
    await page.get_by_role("button", name="Finish set-up").click()
    assert "did not work" in await page.inner_text("main")
    assert await page.locator("svg").count() == 1, "a wrong code keeps the QR code"
    assert await page.locator("code").first.inner_text() == secret
    await page.get_by_label("Code from your app").fill(totp_code(secret, now=time.time()))
    await page.get_by_role("button", name="Finish set-up").click()
    await page.wait_for_selector("text=Your backup codes")
    assert gw.mfa.enrolled("alice")
    codes = await page.locator("ol li code").all_inner_texts()
    assert len(codes) == 10 and all(
        re.fullmatch(r"[a-z2-9]{4}-[a-z2-9]{4}-[a-z2-9]{4}", c) for c in codes
    )
    await shot(page, "3b-backup-codes")
    await page.get_by_role("link", name="Continue").click()
    # The confirming code was a step-up too: the admin route lets alice in.
    await page.wait_for_url(signin.origin + "/admin/echo")
    assert '"x-forwarded-user": "alice"' in await page.inner_text("body")


async def test_replacing_the_authenticator_in_chromium_needs_the_current_code(
    page: Page, signin: SignInSetup
) -> None:
    gw = signin.gateway
    old = (await gw.mfa.enroll("alice")).secret
    await sign_in(page, signin)
    await page.wait_for_url(signin.origin + "/")
    await page.goto(signin.origin + "/.ztgw/mfa/enroll")
    await page.get_by_label("Current code").fill("000000")
    await page.get_by_role("button", name="Replace my authenticator").click()
    assert "did not work" in await page.inner_text("main")
    assert gw.mfa.pending("alice", time.time()) is None
    await page.get_by_label("Current code").fill(totp_code(old, now=time.time()))
    await page.get_by_role("button", name="Replace my authenticator").click()
    await page.wait_for_url(re.compile(r"/\.ztgw/mfa/enroll"))
    new = await page.locator("code").first.inner_text()
    assert new != old and re.fullmatch(r"[A-Z2-7]{32}", new)
    user = gw.store.user("alice")
    assert user is not None and gw.mfa.box is not None
    assert gw.mfa.box.open(user.mfa_secret or "", user="alice") == old, "the old factor holds"
    # The same 30-second step as the current code just given: not taken for a replay.
    await page.get_by_label("Code from your app").fill(totp_code(new, now=time.time()))
    await page.get_by_role("button", name="Finish set-up").click()
    await page.wait_for_selector("text=Your backup codes")
    user = gw.store.user("alice")
    assert user is not None and gw.mfa.box.open(user.mfa_secret or "", user="alice") == new


@pytest.fixture
async def other_site(signin: SignInSetup) -> AsyncIterator[str]:
    """A page on another site (`localhost` is another site than `127.0.0.1`) that makes the
    visitor's browser post to every state-changing endpoint of the gateway, as an attacker's
    page would: forms, no-cors fetches with CORS-safelisted bodies, an image."""
    gw = signin.origin
    posture = '{"platform":"macos","os_version":"15.1","disk_encrypted":true}'
    html = f"""<!doctype html><title>loading</title>
<iframe name="a"></iframe><iframe name="b"></iframe><iframe name="c"></iframe>
<form id="enrol" method="post" action="{gw}/.ztgw/mfa/enroll" target="a">
<input name="action" value="start"><input name="rd" value="/"></form>
<form id="logout" method="post" action="{gw}/.ztgw/logout" target="b"></form>
<form id="stepup" method="post" action="{gw}/.ztgw/mfa" target="c">
<input name="code" value="000000"><input name="rd" value="/"></form>
<img src="{gw}/.ztgw/mfa/enroll?rd=/">
<script>
const opts = (body) => ({{method: "POST", mode: "no-cors", credentials: "include", body}});
document.getElementById("enrol").submit();
document.getElementById("logout").submit();
document.getElementById("stepup").submit();
const sent = [];
for (let i = 0; i < 6; i++) {{
  sent.push(fetch("{gw}/.ztgw/mfa/verify", opts('{{"code":"000000"}}')));
}}
sent.push(fetch("{gw}/.ztgw/mfa", opts(new URLSearchParams({{code: "000000", rd: "/"}}))));
sent.push(fetch("{gw}/.ztgw/posture", opts(new Blob(['{posture}']))));
Promise.allSettled(sent).then(() => setTimeout(() => {{ document.title = "done"; }}, 500));
</script>"""

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://localhost:{port}/"
    await runner.cleanup()


async def test_a_page_on_another_site_enrols_nobody_signs_out_nobody_and_burns_no_attempts(
    browser: Browser, signin: SignInSetup, certs: Certs, other_site: str
) -> None:
    gw = signin.gateway
    context = await device_context(browser, signin, certs)
    pg = await context.new_page()
    pg.set_default_timeout(15_000)
    await sign_in(pg, signin)
    await pg.wait_for_url(signin.origin + "/")
    [session] = [s for s in gw.store.sessions("alice") if not s.revoked]
    refused_before = refusals(gw)
    await pg.goto(other_site)
    await pg.wait_for_function("document.title === 'done'")
    await context.close()
    now = time.time()
    assert not gw.mfa.enrolled("alice") and gw.mfa.pending("alice", now) is None
    live = gw.store.session(session.session_id)
    assert live is not None and not live.revoked, "no sign-out from another site"
    assert await gw.store.failures_async("mfa:alice", now, 3600) == 0, "no attempts burnt"
    user = gw.store.user("alice")
    assert user is None or user.mfa_locked_until is None
    assert gw.store.posture("alice-laptop") is None, "no posture from another site"
    # Each request was refused as what it was, before anything else was looked at.
    assert refusals(gw) - refused_before >= 6 + 3 + 1


def refusals(gw: object) -> float:
    text = gw.metrics.render().decode()  # type: ignore[attr-defined]
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ztgw_requests_total{") and (
            'reason="origin-mismatch"' in line or 'reason="media-type-unsupported"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total
