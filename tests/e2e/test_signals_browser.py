"""What a person sees when the identity provider signals, in real Chromium: signing out at the
provider signs them out of the gateway (back-channel logout), and a credential change at the
provider sends their next page to the second-factor step (CAEP)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page

from tests.e2e.test_browser import browser, device_context, sign_in  # noqa: F401 - fixture
from tests.signals_fixtures import Signals
from tests.support import Certs

pytestmark = pytest.mark.browser


@pytest.fixture
async def person(browser: Browser, signals: Signals, certs: Certs) -> AsyncIterator[Page]:  # noqa: F811
    context = await device_context(browser, signals.setup, certs)
    page = await context.new_page()
    page.set_default_timeout(15_000)
    await sign_in(page, signals.setup, "/echo")
    await page.wait_for_url(signals.origin + "/echo")
    assert "alice" in await page.content()
    yield page
    await context.close()


async def test_signing_out_at_the_provider_signs_the_person_out_of_the_gateway(
    person: Page, signals: Signals
) -> None:
    end_session = signals.idp.endpoint("end_session")
    assert end_session is not None
    await person.goto(end_session)
    assert "signed out" in (await person.inner_text("main")).lower()
    await person.goto(signals.origin + "/echo")
    # Back to signing in (the one provider's sign-in form, since they left it too).
    await person.wait_for_url(re.compile(r"/\.ztgw/login|/authorize\?"))
    if "/authorize?" not in person.url:
        await person.get_by_role("link", name=re.compile("Sign in with")).click()
    await person.get_by_label(re.compile("password", re.I)).wait_for()


async def test_a_credential_change_at_the_provider_asks_for_the_second_factor(
    person: Page, signals: Signals
) -> None:
    answer = await signals.send(
        event="credential-change",
        subject={"format": "iss_sub", "iss": signals.issuer, "sub": "alice"},
    )
    assert answer["receiver_status"] == 202
    await person.goto(signals.origin + "/echo")
    # No second factor enrolled yet: the step-up begins with setting one up.
    await person.wait_for_url(re.compile(r"/\.ztgw/mfa(/enroll)?\?rd="))
    await person.get_by_role("button", name="Set up an authenticator app").wait_for()
