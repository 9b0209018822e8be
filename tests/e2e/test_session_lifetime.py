"""How long a sign-in lasts, judged by the gateway's clock (a ManualClock moved by the tests):
idle and absolute timeouts on the server whatever the cookie says, a step-up that must not
revive what has ended (issue 18, L3), an enrolment that waits only so long, and sessions that
leave memory once nothing can use them."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from tests.e2e.test_signin import HTML, browser, hidden, session_cookie, sign_in
from tests.oidc_fixtures import SignInSetup
from tests.support import ADMIN_TOKEN, Certs
from ztgateway.cli import main
from ztgateway.clock import ManualClock
from ztgateway.credentials.totp import totp_code
from ztgateway.store.base import UserRecord

JSON = {"Accept": "application/json"}
IDLE = 1800.0


@pytest.fixture
def gateway_clock() -> ManualClock:
    # Starts at the real time: the dev IdP's ID tokens are stamped with it.
    return ManualClock(time.time())


async def keep_in_use(
    s: aiohttp.ClientSession, setup: SignInSetup, clock: ManualClock, hours: int
) -> None:
    """A request every hour for `hours` hours: the session never idles."""
    for _ in range(hours):
        clock.advance(3600)
        assert (await s.get(setup.origin + "/echo", headers=JSON)).status == 200


async def step_up_form(s: aiohttp.ClientSession, setup: SignInSetup) -> dict[str, str]:
    page = await (await s.get(setup.origin + "/.ztgw/mfa?rd=/echo", headers=HTML)).text()
    return {"csrf": hidden(page, "csrf"), "rd": hidden(page, "rd")}


async def test_an_idle_session_ends_on_the_server_whatever_the_cookie_says(
    signin: SignInSetup, certs: Certs, gateway_clock: ManualClock
) -> None:
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        assert (await s.get(signin.origin + "/echo", headers=JSON)).status == 200
        gateway_clock.advance(IDLE + 1)
        r = await s.get(signin.origin + "/echo", headers=JSON, allow_redirects=False)
        assert (r.status, (await r.json())["reason"]) == (401, "session-expired")
        assert "Max-Age=0" in r.headers["Set-Cookie"]


@pytest.mark.parametrize("signin", [{"sessions": {"idle_timeout": 86400}}], indirect=True)
async def test_an_active_session_still_ends_at_its_absolute_timeout(
    signin: SignInSetup, certs: Certs, gateway_clock: ManualClock
) -> None:
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        await keep_in_use(s, signin, gateway_clock, 11)
        gateway_clock.advance(3600 + 1)  # 12 h and a second after the sign-in
        r = await s.get(signin.origin + "/echo", headers=JSON, allow_redirects=False)
        assert (r.status, (await r.json())["reason"]) == (401, "session-expired")


async def test_a_code_does_not_revive_an_idle_expired_session(
    signin: SignInSetup, certs: Certs, gateway_clock: ManualClock
) -> None:
    gw = signin.gateway
    secret = (await gw.mfa.enroll("alice")).secret
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        form = await step_up_form(s, signin)
        gateway_clock.advance(IDLE + 60)  # the form is still valid, the session is not
        code = totp_code(secret, now=gateway_clock.time())
        r = await s.post(
            signin.origin + "/.ztgw/mfa",
            data={**form, "code": code},
            headers=HTML,
            allow_redirects=False,
        )
        # A person signs in again; nothing was issued.
        assert r.status == 303 and r.headers["Location"].startswith("/.ztgw/login?rd=")
        assert "Set-Cookie" not in r.headers
        r = await s.post(signin.origin + "/.ztgw/mfa/verify", json={"code": code})
        assert (r.status, (await r.json())["reason"]) == (401, "session-expired")
        r = await s.get(signin.origin + "/echo", headers=JSON, allow_redirects=False)
        assert (r.status, (await r.json())["reason"]) == (401, "session-expired")
    assert await gw.store.failures_async("mfa:alice", gateway_clock.time(), 3600) == 0


@pytest.mark.parametrize("signin", [{"sessions": {"idle_timeout": 86400}}], indirect=True)
async def test_a_code_does_not_revive_a_session_past_its_absolute_timeout(
    signin: SignInSetup, certs: Certs, gateway_clock: ManualClock
) -> None:
    gw = signin.gateway
    secret = (await gw.mfa.enroll("alice")).secret
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        await keep_in_use(s, signin, gateway_clock, 11)
        gateway_clock.advance(1800)
        form = await step_up_form(s, signin)
        gateway_clock.advance(1800 + 1)  # the form is 30 minutes old, the sign-in 12 hours
        code = totp_code(secret, now=gateway_clock.time())
        r = await s.post(signin.origin + "/.ztgw/mfa/verify", json={"code": code})
        assert (r.status, (await r.json())["reason"]) == (401, "session-expired")
        r = await s.post(signin.origin + "/.ztgw/mfa", data={**form, "code": code})
        assert (r.status, (await r.json(content_type=None))["reason"]) == (401, "session-expired")


@pytest.mark.parametrize(
    ("change", "reason", "status"),
    [("lock", "account-locked", 403), ("revoke-device", "device-revoked", 403)],
)
async def test_a_step_up_honours_account_locks_and_device_state(
    signin: SignInSetup, certs: Certs, change: str, reason: str, status: int
) -> None:
    gw = signin.gateway
    secret = (await gw.mfa.enroll("alice")).secret
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        form = await step_up_form(s, signin)
        if change == "lock":
            account = gw.store.user("alice") or UserRecord(user="alice")
            account.locked_until, account.lock_reason = gw.clock.time() + 600, "test"
            await gw.store.save_user(account)
        else:
            await gw.store.set_device_state("alice-laptop", "revoked")
        code = totp_code(secret, now=gw.clock.time())
        r = await s.post(signin.origin + "/.ztgw/mfa", data={**form, "code": code})
        assert (r.status, (await r.json(content_type=None))["reason"]) == (status, reason)
        r = await s.post(signin.origin + "/.ztgw/mfa/verify", json={"code": code})
        assert (r.status, (await r.json())["reason"]) == (status, reason)


async def test_a_session_cookie_steps_up_only_with_its_own_device(
    signin: SignInSetup, certs: Certs
) -> None:
    gw = signin.gateway
    secret = (await gw.mfa.enroll("alice")).secret
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        cookie = session_cookie(s)
    async with browser(certs, "stolen-laptop") as other:
        r = await other.post(
            signin.origin + "/.ztgw/mfa/verify",
            json={"code": totp_code(secret, now=gw.clock.time())},
            headers={"Cookie": f"__Host-ztgw-session={cookie}"},
        )
        assert (r.status, (await r.json())["reason"]) == (401, "session-invalid")


async def test_an_enrolment_not_confirmed_in_time_expires(
    signin: SignInSetup, certs: Certs, gateway_clock: ManualClock
) -> None:
    gw = signin.gateway
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        enrol = signin.origin + "/.ztgw/mfa/enroll"
        page = await (await s.get(enrol, headers=HTML)).text()
        form = {"csrf": hidden(page, "csrf"), "rd": "/"}
        r = await s.post(enrol, data={**form, "action": "start"}, headers=HTML)
        page = await r.text()
        secret = re.search(r'by hand: <code class="key" aria-label="([A-Z2-7]+)"', page)
        assert secret is not None
        gateway_clock.advance(gw.config.mfa.enrolment_ttl + 1)
        assert gw.mfa.pending("alice", gateway_clock.time()) is None
        r = await s.post(
            enrol,
            data={
                **form,
                "csrf": hidden(page, "csrf"),
                "action": "confirm",
                "code": totp_code(secret.group(1), now=gateway_clock.time()),
            },
        )
        assert (r.status, (await r.json(content_type=None))["reason"]) == (
            409,
            "mfa-enrolment-expired",
        )
        assert not gw.mfa.enrolled("alice")


async def test_an_operator_reset_clears_the_factor_and_a_pending_enrolment(
    signin: SignInSetup, certs: Certs, gateway_clock: ManualClock
) -> None:
    gw = signin.gateway
    await gw.mfa.enroll("alice")
    await gw.mfa.start_enrolment("alice", gateway_clock.time())
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{gw.ops_port}/admin/users/alice/mfa-reset",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as r,
    ):
        assert (r.status, await r.json()) == (200, {"user": "alice", "reset": True})
    assert not gw.mfa.enrolled("alice")
    assert gw.mfa.pending("alice", gateway_clock.time()) is None
    # The CLI does the same through the store; the gateway hears of it within its sync bound.
    await gw.mfa.start_enrolment("alice", gateway_clock.time())
    config = str(gw.config.file)
    assert await asyncio.to_thread(main, ["users", "mfa", "reset", "alice", "-c", config]) == 0
    await gw.store.sync()
    assert gw.mfa.pending("alice", gateway_clock.time()) is None


async def test_sessions_nothing_can_use_leave_memory(
    signin: SignInSetup, certs: Certs, gateway_clock: ManualClock
) -> None:
    gw = signin.gateway
    async with browser(certs) as s:
        assert (await sign_in(s, signin)).status == 303
        [signed_out] = gw.store.sessions("alice")
        page = await (await s.get(signin.origin + "/.ztgw/logout", headers=HTML)).text()
        r = await s.post(signin.origin + "/.ztgw/logout", data={"csrf": hidden(page, "csrf")})
        assert (await sign_in(s, signin)).status == 303
        live = next(x for x in gw.store.sessions("alice") if not x.revoked)
        cookie = session_cookie(s)
        assert await gw.keeper.expire(gateway_clock.time(), gw.config.routes) == 1
        assert gw.store.session(signed_out.session_id) is None
        assert gw.store.session(live.session_id) is not None
        gateway_clock.advance(IDLE + 1)
        assert await gw.keeper.expire(gateway_clock.time(), gw.config.routes) == 1
        assert gw.store.sessions() == []
        r = await s.get(
            signin.origin + "/echo",
            headers={**JSON, "Cookie": f"__Host-ztgw-session={cookie}"},
            allow_redirects=False,
        )
        # Still refused as what it is: read back from the store, where it stays until its
        # absolute expiry (for `sessions show`), and out of memory again at the next sweep.
        assert (r.status, (await r.json())["reason"]) == (401, "session-expired")
