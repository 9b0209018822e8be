"""Several identity providers, clicked in a real Chromium: two dev IdPs on two loopback ports,
each a real OIDC provider with its own signing key, both with a user called "alice".

- a route that accepts both shows the chooser; each provider signs in;
- a route that accepts one goes straight to it;
- a session of the other provider is refused there with a page, an audit reason and a metric;
- the two "alice"s are two users: identity headers, sessions and audit say so.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page

from tests.e2e.test_browser import browser, device_context, idp_form, shot, sign_in
from tests.oidc_fixtures import PROVIDER_LABELS, TwoProviders, partner_device
from tests.support import Certs, audit_events

pytestmark = pytest.mark.browser
__all__ = ["browser"]


@pytest.fixture
async def contexts(
    browser: Browser, two_providers: TwoProviders, certs: Certs
) -> AsyncIterator[list[BrowserContext]]:
    """Browser contexts with alice's laptop certificate; closed at the end."""
    made: list[BrowserContext] = []
    yield made
    for context in made:
        await context.close()


async def new_page(
    browser: Browser,
    setup: TwoProviders,
    certs: Certs,
    contexts: list[BrowserContext],
    device: str = "alice-laptop",
) -> Page:
    """A browser on a device: the directory's alice has alice-laptop, the partners' alice
    a laptop of her own (a device belongs to one user)."""
    context = await device_context(browser, setup.view("corp"), certs, device)
    contexts.append(context)
    page = await context.new_page()
    page.set_default_timeout(15_000)
    return page


def forwarded(body: str) -> dict[str, Any]:
    """The headers the demo app saw (it echoes them as JSON)."""
    match = re.search(r'"x-forwarded-user": "([^"]*)"', body)
    assert match is not None, body
    groups = re.search(r'"x-forwarded-groups": "([^"]*)"', body)
    return {"user": match.group(1), "groups": groups.group(1) if groups else None}


async def test_the_chooser_lists_the_routes_providers_and_each_signs_in_its_own_alice(
    browser: Browser,
    two_providers: TwoProviders,
    certs: Certs,
    contexts: list[BrowserContext],
) -> None:
    setup = two_providers
    seen: dict[str, dict[str, Any]] = {}
    devices = {"corp": "alice-laptop", "partners": partner_device(certs)}
    for name, label in PROVIDER_LABELS.items():
        page = await new_page(browser, setup, certs, contexts, devices[name])
        await page.goto(setup.origin + "/echo")
        await page.wait_for_url(re.compile(r"/\.ztgw/login\?rd=/echo"))
        if name == "corp":
            await shot(page, "8-provider-chooser")
        buttons = page.get_by_role("link", name=re.compile("^Sign in with"))
        assert await buttons.all_inner_texts() == [
            "Sign in with Corp account",
            "Sign in with Partner account",
        ]
        await page.get_by_role("link", name=f"Sign in with {label}").click()
        # The person's click took them to that provider, and only that one.
        await page.wait_for_url(re.compile(re.escape(setup.issuers[name]) + "/authorize"))
        await idp_form(page, setup.view(name))
        await page.wait_for_url(setup.origin + "/echo")
        seen[name] = forwarded(await page.inner_text("body"))
        await page.goto(setup.origin + "/.ztgw/whoami")
        main = await page.inner_text("main")
        assert seen[name]["user"] in main and label in main
    # The same "alice" at two providers: two users, each with her provider's groups. corp
    # speaks for the directory; the partners' alice and her groups are in their name space.
    assert seen["corp"] == {"user": "alice", "groups": "admins,eng"}
    assert seen["partners"] == {"user": "partners:alice", "groups": "partners:admins,partners:eng"}
    store = setup.gateway.store
    assert [s.extra["provider"] for s in store.sessions("alice")] == ["corp"]
    assert [s.extra["provider"] for s in store.sessions("partners:alice")] == ["partners"]
    await setup.gateway.audit.flush()
    forwarded_as = {
        (e["identity"]["user"], e["identity"]["provider"])
        for e in await audit_events(setup.gateway)
        if e.get("identity") and e["identity"].get("provider") and e["route"] == "app"
    }
    assert {("alice", "corp"), ("partners:alice", "partners")} <= forwarded_as
    metrics = setup.gateway.metrics.render().decode()
    for name in PROVIDER_LABELS:
        assert f'ztgw_logins_total{{provider="{name}",result="success"}} 1.0' in metrics


async def test_a_route_with_one_provider_goes_straight_to_it(
    browser: Browser,
    two_providers: TwoProviders,
    certs: Certs,
    contexts: list[BrowserContext],
) -> None:
    setup = two_providers
    page = await new_page(browser, setup, certs, contexts, partner_device(certs))
    pages_shown: list[str] = []
    page.on(
        "response",
        lambda r: pages_shown.append(r.url) if r.status == 200 and "/.ztgw/" in r.url else None,
    )
    await page.goto(setup.origin + "/partners/echo")
    await page.wait_for_url(re.compile(re.escape(setup.issuers["partners"]) + "/authorize"))
    assert pages_shown == [], "no chooser on the way"
    await idp_form(page, setup.view("partners"))
    await page.wait_for_url(setup.origin + "/partners/echo")
    assert forwarded(await page.inner_text("body"))["user"] == "partners:alice"


async def test_a_session_of_another_provider_is_refused_with_a_page_and_a_way_on(
    browser: Browser,
    two_providers: TwoProviders,
    certs: Certs,
    contexts: list[BrowserContext],
) -> None:
    setup = two_providers
    page = await new_page(browser, setup, certs, contexts, partner_device(certs))
    await sign_in(page, setup.view("partners"), "/echo", provider="Partner account")
    await page.wait_for_url(setup.origin + "/echo")
    response = await page.goto(setup.origin + "/corp/echo")
    assert response is not None and response.status == 403
    await shot(page, "9-provider-not-allowed")
    text = await page.inner_text("main")
    assert "does not accept your sign-in's provider" in text
    assert "provider-not-allowed" in text
    assert "signed in with Partner account; this application accepts Corp account" in text
    decision_id = response.headers["x-zt-decision-id"]
    # The way on: sign in with the provider the route accepts (straight there: it is the one).
    await page.get_by_role("link", name="Sign in with an accepted provider").click()
    await page.wait_for_url(re.compile(re.escape(setup.issuers["corp"]) + "/authorize"))
    await setup.gateway.audit.flush()
    [refused] = [e for e in await audit_events(setup.gateway) if e["decision_id"] == decision_id]
    assert refused["result"]["reason"] == "provider-not-allowed"
    details = " ".join(f.get("detail", "") for f in refused["result"]["findings"])
    assert "Partner account" in details
    metrics = setup.gateway.metrics.render().decode()
    assert re.search(
        r'ztgw_requests_total\{[^}]*reason="provider-not-allowed"[^}]*\} 1\.0', metrics
    )
    assert 'ztgw_provider_refusals_total{provider="partners",route="corp-only"} 1.0' in metrics
