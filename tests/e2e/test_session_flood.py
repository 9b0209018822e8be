"""Memory stays bounded when a client floods the gateway (issue 18, M6 and I5): page requests
without a cookie start no session, sign-ins in flight are bounded per device, and so are a
user's sessions on one device."""

from __future__ import annotations

import sqlite3
import tracemalloc

import aiohttp

from tests.conftest import GatewayFactory
from tests.e2e.test_signin import HTML, browser, idp_login, sign_in
from tests.oidc_fixtures import SignInSetup
from tests.support import Certs, client_ssl
from ztgateway.app import Gateway

FLOOD = 600


def store_rows(gw: Gateway, table: str) -> list[tuple[object, ...]]:
    path = gw.config.store.url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return list(db.execute(f"SELECT * FROM {table}"))


async def test_a_flood_of_cookie_less_page_requests_leaves_sessions_and_memory_flat(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    # On the old code each of these requests started a 12-hour session in memory and a row.
    gw = await gateway_factory({"routes": [{"name": "app", "prefix": "/", "upstream": "demo"}]})
    connector = aiohttp.TCPConnector(ssl=client_ssl(certs), limit=8)
    url = f"https://127.0.0.1:{gw.port}/echo"
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.get(url, headers=HTML) as r:  # warm up: caches, pools, metrics labels
            assert r.status == 200
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for i in range(FLOOD):
                headers = dict(HTML)
                if i % 3 == 0:  # with a cookie the gateway never issued
                    headers["Cookie"] = f"__Host-ztgw-session=bogus-{i}"
                async with s.get(url, headers=headers) as r:
                    assert r.status in (200, 303, 401)
            await gw.store.flush()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    assert gw.store.sessions() == []
    assert store_rows(gw, "sessions") == []
    kept = sum(
        stat.size_diff
        for stat in after.compare_to(before, "filename")
        if "/ztgateway/store/" in stat.traceback[0].filename
        or "/ztgateway/stages/session.py" in stat.traceback[0].filename
        or "/ztgateway/sessions.py" in stat.traceback[0].filename
    )
    # What the store, the session stage and the session keeper still hold after 600 requests (the old code kept
    # about 1 KB per request here).
    assert kept < 32 * 1024, f"{kept} bytes kept by the store for {FLOOD} requests"


async def start_sign_in(s: aiohttp.ClientSession, setup: SignInSetup) -> str:
    r = await s.get(setup.origin + "/.ztgw/login/start?rd=/echo", allow_redirects=False)
    assert r.status == 303
    return r.headers["Location"]


async def finish_sign_in(
    s: aiohttp.ClientSession, setup: SignInSetup, authorize: str, user: str
) -> aiohttp.ClientResponse:
    callback = await idp_login(s, authorize, user)
    return await s.get(callback, headers=HTML, allow_redirects=False)


async def test_one_device_looping_on_sign_in_evicts_only_its_own_attempts(
    signin: SignInSetup, certs: Certs
) -> None:
    # Issue 18 (I5): one global FIFO of attempts, which one client could flush.
    async with browser(certs, "bob-phone") as bob, browser(certs) as alice:
        bobs = await start_sign_in(bob, signin)
        for _ in range(40):
            await start_sign_in(alice, signin)
        per_device: dict[object, int] = {}
        for row in store_rows(signin.gateway, "pending_logins"):
            per_device[row[1]] = per_device.get(row[1], 0) + 1
        assert per_device == {"alice-laptop": 5, "bob-phone": 1}
        r = await finish_sign_in(bob, signin, bobs, "bob")
        assert r.status == 303 and r.headers["Location"] == "/echo", await r.text()


async def test_a_user_keeps_a_bounded_number_of_sessions_per_device(
    signin: SignInSetup, certs: Certs
) -> None:
    gw = signin.gateway
    for _ in range(7):
        async with browser(certs) as s:  # a fresh browser profile each time: no cookie
            assert (await sign_in(s, signin)).status == 303
    sessions = gw.store.sessions("alice")
    assert len([x for x in sessions if not x.revoked]) == gw.config.sessions.max_per_device == 5
    ended = [x for x in sessions if x.revoked]
    assert [x.revoked_reason for x in ended] == ["too many sessions on this device"] * 2
    assert max(x.created for x in ended) < min(x.created for x in sessions if not x.revoked)
