"""Security keys and passkeys (WebAuthn) as a second factor, clicked in a real Chromium.

Chromium's virtual authenticator (Chrome DevTools Protocol `WebAuthn` domain, through
Playwright's CDP session) stands in for the security key: a CTAP2 platform authenticator that
verifies the user. The gateway is reached as https://localhost:PORT (an RP ID must be a host
name, not an address); its [webauthn] relying party comes from `public_url`. The phishing site of
the wrong-origin test is https://evil.localhost:PORT, served by Playwright itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, CDPSession, Page
from playwright.async_api import Error as PlaywrightError

from tests.conftest import GatewayFactory
from tests.e2e.test_browser import ARTIFACTS, browser, device_context, shot, sign_in
from tests.oidc_fixtures import CLIENT_SECRET, SignInSetup, users_toml
from tests.support import ADMIN_TOKEN, Certs, audit_events, free_port
from ztgateway.app import Gateway
from ztgateway.cli import main
from ztgateway.clock import ManualClock
from ztgateway.dev.idp import start_devidp

pytestmark = pytest.mark.browser
__all__ = ["browser"]  # the fixture, from test_browser

AUTHENTICATOR = {
    "protocol": "ctap2",
    "transport": "internal",
    "hasResidentKey": True,
    "hasUserVerification": True,
    "isUserVerified": True,
}
STEP_UP_PAST = 1000.0  # seconds the gateway's clock moves so the route's mfa_max_age (900) ends


@dataclass
class Setup:
    signin: SignInSetup
    clock: ManualClock
    overrides: dict[str, Any]
    """The gateway's configuration (over the suite's base): a replica starts from it."""
    replica_port: int = 0


@pytest.fixture
async def wa(
    gateway_factory: GatewayFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Setup]:
    """A gateway at https://localhost:PORT with a route that takes only a security key, with
    user verification, for its step-up; its clock is a ManualClock the test moves. With the
    parameter "redis", its state is in a real redis-server (for a second replica)."""
    port = free_port()
    origin = f"https://localhost:{port}"
    users = tmp_path / "idp-users.toml"
    users.write_text(users_toml(origin))
    runner, _, issuer = await start_devidp("127.0.0.1", 0, users)
    clock = ManualClock(time.time())
    overrides: dict[str, Any] = {
        "server": {"port": port, "public_url": origin},
        "oidc": {
            "name": "dev",
            "issuer": issuer,
            "client_id": "ztgateway",
            "client_secret": CLIENT_SECRET,
        },
        "routes": [
            {"name": "app", "prefix": "/", "upstream": "demo", "policy": {"login": "browsers"}},
            {
                "name": "admin",
                "prefix": "/admin/",
                "upstream": "demo",
                "policy": {"login": "always"},
                "session": {
                    "mfa_max_age": 900,
                    "step_up_factors": ["webauthn"],
                    "require_user_verification": True,
                },
            },
        ],
    }
    replica_port = 0
    if getattr(request, "param", None) == "redis":
        # A second replica on another port of localhost: both origins take answers.
        replica_port = free_port()
        overrides["store"] = {"url": request.getfixturevalue("redis_server").url}
        overrides["webauthn"] = {
            "rp_id": "localhost",
            "origins": [origin, f"https://localhost:{replica_port}"],
        }
    gw = await gateway_factory(overrides, clock=clock)
    assert gw.config.webauthn.rp_id == "localhost"
    yield Setup(SignInSetup(gw, issuer, origin), clock, overrides, replica_port)
    await runner.cleanup()


async def virtual_key(context: BrowserContext, page: Page) -> tuple[CDPSession, str]:
    cdp = await context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable")
    added = await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": AUTHENTICATOR})
    return cdp, added["authenticatorId"]


async def rewrite_key(cdp: CDPSession, authenticator: str, **changes: Any) -> None:
    """Put the authenticator's one credential back with `changes` (the same key material)."""
    (credential,) = (await cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator}))[
        "credentials"
    ]
    await cdp.send(
        "WebAuthn.removeCredential",
        {"authenticatorId": authenticator, "credentialId": credential["credentialId"]},
    )
    await cdp.send(
        "WebAuthn.addCredential",
        {"authenticatorId": authenticator, "credential": {**credential, **changes}},
    )


async def use_key(page: Page) -> None:
    await page.get_by_role("button", name="Use my security key").click()


async def enrol(page: Page, name: str) -> None:
    """On the keys page: name the key, click, and wait for it in the list."""
    await page.get_by_label("Name for the new key").fill(name)
    await page.get_by_role("button", name="Add a security key or passkey").click()
    try:
        await page.locator("#webauthn-keys li", has_text=name).wait_for()
    except PlaywrightError:
        status = await page.locator("#webauthn-status").all_inner_texts()
        raise AssertionError(f"not enrolled: {status}") from None


def ceremonies(gw: Gateway, ceremony: str, result: str) -> float:
    return gw.metrics.webauthn_ceremonies.labels(ceremony, result)._value.get()


@dataclass
class Person:
    """Alice in Chromium with one virtual authenticator, signed in, sent to add a key."""

    page: Page
    context: BrowserContext
    signin: SignInSetup
    clock: ManualClock
    cdp: CDPSession
    authenticator: str

    @property
    def gw(self) -> Gateway:
        return self.signin.gateway

    async def later(self) -> None:
        """Past the route's mfa_max_age, back at the route (its step-up page, or where it
        sends)."""
        self.clock.advance(STEP_UP_PAST)
        await self.page.goto(self.signin.origin + "/admin/echo")


@pytest.fixture
async def alice(
    browser: Browser,
    wa: Setup,
    certs: Certs,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Person]:
    signin, clock = wa.signin, wa.clock
    context = await device_context(browser, signin, certs)
    page = await context.new_page()
    page.set_default_timeout(15_000)
    cdp, authenticator = await virtual_key(context, page)
    # The route takes only a security key: with none, the person is sent to add one.
    await sign_in(page, signin, "/admin/echo")
    await page.wait_for_url(re.compile(r"/\.ztgw/webauthn\?rd=/admin/echo"))
    yield Person(page, context, signin, clock, cdp, authenticator)
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    await context.close()


async def test_a_person_enrols_a_security_key_and_steps_up_with_it(
    alice: Person,
) -> None:
    page, signin, clock, gw = alice.page, alice.signin, alice.clock, alice.gw
    await shot(page, "7-security-key-add")
    await enrol(page, "Laptop key")
    await shot(page, "8-security-keys")
    (key,) = await gw.store.webauthn_credentials("alice")
    assert key.name == "Laptop key" and key.user_verified
    assert ceremonies(gw, "register", "success") == 1
    # Adding the key was a step-up with it: the route lets the person in.
    await page.get_by_role("link", name="Continue").click()
    await page.wait_for_url(signin.origin + "/admin/echo")
    assert '"x-forwarded-user": "alice"' in await page.inner_text("body")

    # Later, the route asks again: the step-up page offers the key, and only the key.
    await alice.later()
    await page.wait_for_url(re.compile(r"/\.ztgw/mfa\?rd=/admin/echo"))
    assert await page.get_by_label("Code").count() == 0, "a TOTP code does not answer this route"
    await shot(page, "9-step-up-security-key")
    await use_key(page)
    await page.wait_for_url(signin.origin + "/admin/echo")
    assert '"x-forwarded-user": "alice"' in await page.inner_text("body")
    assert ceremonies(gw, "authenticate", "success") == 1
    (used,) = await gw.store.webauthn_credentials("alice")
    assert used.sign_count > key.sign_count and used.last_used_at == clock.time()
    events = await audit_events(gw)
    assert any(
        "step-up passed (webauthn" in f.get("detail", "")
        for e in events
        for f in e.get("result", {}).get("findings", [])
        if e.get("result", {}).get("verdict") == "allow"
    )


async def test_a_cloned_security_key_is_refused_and_audited(
    alice: Person,
) -> None:
    """WebAuthn §7.2 step 21: the signature counter going back means a second copy of the key."""
    page, signin, gw, cdp, authenticator = alice.page, alice.signin, alice.gw, alice.cdp, alice.authenticator  # fmt: skip
    await enrol(page, "Original")
    await alice.later()
    await use_key(page)
    await page.wait_for_url(signin.origin + "/admin/echo")
    (stored,) = await gw.store.webauthn_credentials("alice")
    assert stored.sign_count >= 2

    # The clone: the same key material in an authenticator whose counter is behind.
    await rewrite_key(cdp, authenticator, signCount=0)
    await alice.later()
    await page.wait_for_url(re.compile(r"/\.ztgw/mfa\?rd="))
    await use_key(page)
    await page.locator("#webauthn-status", has_text="may be cloned").wait_for()
    assert re.search(r"/\.ztgw/mfa\?rd=", page.url), "the person stays on the step-up page"
    assert ceremonies(gw, "authenticate", "webauthn-cloned") == 1
    (after,) = await gw.store.webauthn_credentials("alice")
    assert after.sign_count == stored.sign_count, "a refused clone does not move the counter"
    events = await audit_events(gw)
    cloned = [e for e in events if e.get("result", {}).get("reason") == "webauthn-cloned"]
    assert len(cloned) == 1 and cloned[0]["result"]["verdict"] == "deny"
    assert "does not advance" in cloned[0]["result"]["findings"][0].get("detail", "")
    # And the route stays closed.
    response = await page.goto(signin.origin + "/admin/echo")
    assert response is not None
    await page.wait_for_url(re.compile(r"/\.ztgw/mfa\?rd="))


async def test_an_assertion_made_for_another_origin_is_refused(
    alice: Person,
) -> None:
    """A phishing site (a sibling host) relays the gateway's challenge to the person's key and
    the key's answer back: the answer names the phishing origin, and is refused."""
    page, signin, gw, cdp, authenticator = alice.page, alice.signin, alice.gw, alice.cdp, alice.authenticator  # fmt: skip
    port = signin.origin.rsplit(":", 1)[1]
    evil = f"https://evil.localhost:{port}"

    async def phishing_page(route: Any) -> None:
        await route.fulfill(status=200, content_type="text/html", body="<p>Sign in</p>")

    await page.route(f"{evil}/**", phishing_page)
    await enrol(page, "Key")
    await alice.later()
    await page.wait_for_url(re.compile(r"/\.ztgw/mfa\?rd="))
    csrf = await page.locator("#webauthn").get_attribute("data-csrf")
    # The attacker's relay: the gateway's options, fetched in the person's session...
    options = await page.evaluate(
        """async (csrf) => {
            const r = await fetch("/.ztgw/webauthn/authenticate/options", {method: "POST",
                headers: {"Content-Type": "application/json"},
                body: JSON.stringify({csrf: csrf, rd: "/admin/echo"})});
            return await r.json();
        }""",
        csrf,
    )
    # ... answered by the person's key on the phishing site. The key is scoped to the RP ID
    # "localhost", so the phishing site has it moved under its own RP ID.
    await rewrite_key(cdp, authenticator, rpId="evil.localhost", signCount=1000)
    await page.goto(evil + "/login")
    answer = await page.evaluate(
        """async (o) => {
            const dec = (s) => Uint8Array.from(atob(s.replace(/-/g, "+").replace(/_/g, "/")
                + "===".slice((s.length + 3) % 4)), (c) => c.charCodeAt(0));
            const c = await navigator.credentials.get({publicKey: {
                challenge: dec(o.challenge), rpId: "evil.localhost", userVerification: "required",
                allowCredentials: o.allowCredentials.map((d) => ({type: d.type, id: dec(d.id)}))}});
            return c.toJSON();
        }""",
        options,
    )
    assert (
        json.loads(base64.urlsafe_b64decode(answer["response"]["clientDataJSON"] + "=="))["origin"]
        == evil
    )
    # Back at the gateway, the relay posts the answer in the person's session.
    await page.goto(signin.origin + "/admin/echo")
    await page.wait_for_url(re.compile(r"/\.ztgw/mfa\?rd="))
    csrf = await page.locator("#webauthn").get_attribute("data-csrf")
    status, body = await page.evaluate(
        """async ([csrf, answer]) => {
            const r = await fetch("/.ztgw/webauthn/authenticate", {method: "POST",
                headers: {"Content-Type": "application/json", "Accept": "application/json"},
                body: JSON.stringify({csrf: csrf, rd: "/admin/echo", credential: answer})});
            return [r.status, await r.json()];
        }""",
        [csrf, answer],
    )
    assert (status, body["reason"]) == (401, "webauthn-origin-mismatch"), body
    assert ceremonies(gw, "authenticate", "webauthn-origin-mismatch") == 1
    events = await audit_events(gw)
    (refused,) = [e for e in events if e.get("decision_id") == body["decision_id"]]
    assert refused["result"]["verdict"] == "deny"
    assert evil in refused["result"]["findings"][0].get("detail", "")
    # The challenge was spent by the refused answer: the genuine key needs a new one.
    (stored,) = await gw.store.webauthn_credentials("alice")
    assert stored.sign_count < 1000


async def test_two_keys_per_person_removed_through_the_admin_api_and_the_cli(
    alice: Person,
) -> None:
    page, signin, gw, cdp, authenticator = alice.page, alice.signin, alice.gw, alice.cdp, alice.authenticator  # fmt: skip
    await enrol(page, "Desk key")
    # A second key, on another authenticator, right after the first one's step-up.
    await cdp.send("WebAuthn.removeVirtualAuthenticator", {"authenticatorId": authenticator})
    await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": AUTHENTICATOR})
    await enrol(page, "Travel key")
    keys = await gw.store.webauthn_credentials("alice")
    assert [k.name for k in keys] == ["Desk key", "Travel key"]
    # The second key steps up on its own.
    await alice.later()
    await use_key(page)
    await page.wait_for_url(signin.origin + "/admin/echo")

    # The admin API removes the desk key (audited).
    async with (
        aiohttp.ClientSession() as s,
        s.delete(
            f"http://127.0.0.1:{gw.ops_port}/admin/users/alice/webauthn/{keys[0].credential_id}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as r,
    ):
        assert r.status == 200, await r.text()
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"http://127.0.0.1:{gw.ops_port}/admin/users/alice/webauthn",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as r,
    ):
        listed = await r.json()
    assert [k["name"] for k in listed] == ["Travel key"] and "public_key" not in listed[0]
    # The CLI removes the travel key (audited into the same chain).
    prefix = keys[1].credential_id[:10]
    # `--`: a base64url id starts with "-" one time in 64, and would read as an option.
    cli = ["users", "webauthn", "remove", "alice", "-c", str(gw.config.file), "--", prefix]
    assert await asyncio.to_thread(main, cli) == 0
    assert await gw.store.webauthn_credentials("alice") == []
    events = await audit_events(gw)
    details = [f.get("detail", "") for e in events if e.get("type") == "ztgw.admin" for f in e["result"]["findings"]]  # fmt: skip
    assert any(keys[0].credential_id in d and "DELETE" in d for d in details)
    assert any(keys[1].credential_id in d and "cli:" in d for d in details)
    # With no key left, the route's step-up sends the person to add one.
    await alice.later()
    await page.wait_for_url(re.compile(r"/\.ztgw/webauthn\?rd=/admin/echo"))


async def test_a_key_that_does_not_verify_the_person_is_refused_where_the_route_asks(
    alice: Person,
) -> None:
    """The route sets require_user_verification: presence alone (a touch, no PIN or biometric)
    is not enough, at registration or at the step-up (WebAuthn §7.1 step 15, §7.2 step 17)."""
    page, signin, gw, cdp, authenticator = alice.page, alice.signin, alice.gw, alice.cdp, alice.authenticator  # fmt: skip
    await enrol(page, "Verified key")
    # The same key, now answering without verifying the person.
    await cdp.send(
        "WebAuthn.setUserVerified", {"authenticatorId": authenticator, "isUserVerified": False}
    )
    await alice.later()
    await use_key(page)
    # The gateway asked for verification, so Chromium itself refuses the unverified answer.
    status = page.locator("#webauthn-status")
    await status.filter(has_text="could not verify you").wait_for()
    assert ceremonies(gw, "authenticate", "success") == 0

    # A client that drops the request for verification (a script relaying the challenge) gets
    # an answer without it past the browser: the gateway refuses it.
    async def without_uv(route: Any) -> None:
        response = await route.fetch()
        options = await response.json()
        options["userVerification"] = "discouraged"
        await route.fulfill(response=response, json=options)

    await page.route("**/.ztgw/webauthn/authenticate/options", without_uv)
    await page.reload()
    await use_key(page)
    await status.filter(has_text="must verify you").wait_for()
    assert ceremonies(gw, "authenticate", "webauthn-uv-required") == 1
    await page.goto(signin.origin + "/admin/echo")
    await page.wait_for_url(re.compile(r"/\.ztgw/mfa\?rd="))


@pytest.mark.replicas
@pytest.mark.parametrize("wa", ["redis"], indirect=True)
async def test_a_key_added_on_one_replica_steps_up_on_another(
    alice: Person, wa: Setup, gateway_factory: GatewayFactory, certs: Certs, browser: Browser
) -> None:
    """Two gateways on one Redis (as behind a load balancer, here on two ports of localhost,
    both named in [webauthn] origins): the key, the session and the challenge are shared."""
    page, gw = alice.page, alice.gw
    port = wa.replica_port
    replica = f"https://localhost:{port}"
    b = await gateway_factory(
        {**wa.overrides, "server": {**wa.overrides["server"], "port": port}}, clock=wa.clock
    )
    await enrol(page, "Shared key")
    pem, key = certs.client("alice-laptop")
    context = await browser.new_context(
        ignore_https_errors=True,
        client_certificates=[{"origin": replica, "certPath": str(pem), "keyPath": str(key)}],
        storage_state=await page.context.storage_state(),
    )
    other = await context.new_page()
    other.set_default_timeout(15_000)
    cdp = await context.new_cdp_session(other)
    await cdp.send("WebAuthn.enable")
    added = await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": AUTHENTICATOR})
    (credential,) = (
        await alice.cdp.send("WebAuthn.getCredentials", {"authenticatorId": alice.authenticator})
    )["credentials"]
    await cdp.send(
        "WebAuthn.addCredential",
        {"authenticatorId": added["authenticatorId"], "credential": credential},
    )
    wa.clock.advance(STEP_UP_PAST)
    # The Redis store times its heartbeat with the gateway's clock: a jump of the clock reads
    # as a silent Redis until the next PONG, and the gateways fail closed until then.
    for _ in range(200):
        if gw.store.healthy and b.store.healthy:
            break
        await asyncio.sleep(0.05)
    assert gw.store.healthy and b.store.healthy
    await other.goto(replica + "/admin/echo")
    await other.wait_for_url(re.compile(r"/\.ztgw/mfa\?rd=/admin/echo"))
    await use_key(other)
    await other.wait_for_url(replica + "/admin/echo")
    assert '"x-forwarded-user": "alice"' in await other.inner_text("body")
    assert ceremonies(b, "authenticate", "success") == 1
    (stored,) = await gw.store.webauthn_credentials("alice")
    assert stored.last_used_at == wa.clock.time()
    await context.close()
