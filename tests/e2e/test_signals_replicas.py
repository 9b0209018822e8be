"""Signals act on every replica: two gateways sharing one SQLite file (as `workers = N` do) or
one real redis-server. A SET pushed to one ends the session, and closes its WebSocket, on the
other (measured in docs/signals.md: about 0.25 s); its replay is refused by either; a polled
stream is acted on once."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.test_signals import WS_CLOSED, call, forged, open_websocket, until
from tests.e2e.test_workers import supervised
from tests.oidc_fixtures import users_toml
from tests.redis_server import RedisServer
from tests.signals_fixtures import Signals, push_set, signals_config, ssf_toml
from tests.support import Certs, metric, session
from ztgateway.app import Gateway
from ztgateway.dev.idp import DEVIDP_KEY, start_devidp
from ztgateway.dev.tokens import issue_token

pytestmark = pytest.mark.replicas


async def pair(
    signals: Signals, backend: str, redis: RedisServer | None
) -> tuple[Gateway, Gateway]:
    if backend == "sqlite":
        return signals.gateway, await signals.make({"any_port": True})
    assert redis is not None
    # The fixture's own gateway is on another store: it must not poll this stream as well.
    await signals.gateway.signals.close()
    over: dict[str, Any] = {"any_port": True, "store": {"url": redis.url}}
    return await signals.make(dict(over)), await signals.make(dict(over))


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def maybe_redis(backend: str, request: pytest.FixtureRequest) -> RedisServer | None:
    if backend != "redis":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server


async def test_a_set_pushed_to_one_replica_closes_the_websocket_on_the_other(
    signals: Signals, certs: Certs, backend: str, maybe_redis: RedisServer | None
) -> None:
    a, b = await pair(signals, backend, maybe_redis)
    token = issue_token(certs.issuer_key, sub="alice")
    assert (await call(a, certs, token))[0] == 200
    assert (await call(b, certs, token))[0] == 200
    set_token = forged(signals)
    async with open_websocket(b, certs, token) as ws:
        status, body = await signals.push(set_token, a)
        assert status == 202, body
        # How fast is a measurement (docs/signals.md), not an assertion: a generous deadline.
        msg = await ws.receive(timeout=10)
        assert msg.type in WS_CLOSED
        assert ws.close_code == 1008
    status, body, _ = await call(b, certs, token)
    assert (status, body["reason"]) == (401, "session-terminated")
    # The jti is remembered in the shared store: the other replica refuses the replay.
    status, body = await signals.push(set_token, b)
    assert (status, body["reason"]) == (400, "signal-replayed")


async def test_a_back_channel_logout_on_one_replica_holds_on_the_other(
    signals: Signals, certs: Certs, backend: str, maybe_redis: RedisServer | None
) -> None:
    from tests.e2e.test_backchannel_logout import logout_token, post_logout

    a, b = await pair(signals, backend, maybe_redis)
    token = issue_token(certs.issuer_key, sub="alice")
    assert (await call(b, certs, token))[0] == 200
    logout = logout_token(signals)
    assert (await post_logout(signals, logout, a))[0] == 200
    status, body, _ = await post_logout(signals, logout, b)
    assert status == 400 and "already received" in body["error_description"]


@pytest.mark.parametrize("signals", [{"delivery": "poll", "poll_interval": 0.1}], indirect=True)
async def test_a_polled_stream_is_acted_on_once_by_all_the_replicas(
    signals: Signals, certs: Certs, backend: str, maybe_redis: RedisServer | None
) -> None:
    a, b = await pair(signals, backend, maybe_redis)
    token = issue_token(certs.issuer_key, sub="alice")
    assert (await call(a, certs, token))[0] == 200
    jtis = []
    for _ in range(5):
        answer = await signals.send(
            event="session-revoked", subject={"format": "opaque", "id": "alice"}
        )
        jtis.append(answer["jti"])

    async def all_acknowledged() -> bool:
        return set(jtis) <= set(signals.transmitter.acknowledged)

    await until(all_acknowledged, timeout=5.0)
    for gw in (a, b):
        # Whichever replica acted, the other hears of it within its sync interval.

        async def refused(gw: Gateway = gw) -> bool:
            status, body, _ = await call(gw, certs, token)
            return (status, body.get("reason")) == (401, "session-terminated")

        await until(refused, timeout=10.0)

    def accepted() -> float:
        return sum(
            metric(gw, "ztgw_ssf_sets_total", transmitter="dev", via="poll", result="accepted")
            for gw in (a, b)
        )

    async def all_accepted() -> bool:
        # A replica that finds a jti claimed acknowledges it while the claimer may still be
        # acting on it; the count settles when the claimer is done.
        return accepted() >= len(jtis)

    await until(all_accepted, timeout=5.0)
    assert accepted() == len(jtis), "each SET acted on exactly once"
    await asyncio.sleep(0.3)  # more polls: nothing delivered twice
    assert not signals.transmitter.errors


async def test_workers_share_one_stream_every_websocket_closes_and_replays_are_refused(
    certs: Certs, upstream: int, tmp_path: Path
) -> None:
    """`workers = 2` processes on one port: the kernel spreads the WebSockets and the pushes
    over both; one SET closes all of alice's WebSockets, whichever worker took it, and every replay is refused by whichever worker takes that."""
    users = tmp_path / "idp-users.toml"
    audience = "https://gateway.example.test"
    users.write_text(users_toml(audience) + ssf_toml(certs, audience, push=False))
    runner, _, issuer = await start_devidp("127.0.0.1", 0, users)
    idp = runner.app[DEVIDP_KEY]
    try:
        async with supervised(
            certs,
            upstream,
            tmp_path,
            routes=[
                {
                    "name": "api",
                    "prefix": "/",
                    "upstream": "demo",
                    "policy": {"require_token": True},
                }
            ],
            signals={"dev": signals_config(issuer, audience)},
        ) as gw:
            token = issue_token(certs.issuer_key, sub="alice")
            url = f"wss://127.0.0.1:{gw.port}/ws"
            auth = {"Authorization": f"Bearer {token}"}
            async with contextlib.AsyncExitStack() as stack:
                sockets = []
                for _ in range(6):
                    s = await stack.enter_async_context(session(certs))
                    ws = await stack.enter_async_context(s.ws_connect(url, headers=auth))
                    await ws.send_str("ping")
                    assert (await ws.receive(timeout=5)).data == "ping"
                    sockets.append(ws)
                _, set_token = idp.transmitter.make_set(
                    "session-revoked", {"format": "opaque", "id": "alice"}
                )
                status, body = await push_set(certs, gw.port, set_token)
                assert status == 202, body
                for ws in sockets:
                    msg = await ws.receive(timeout=10)
                    assert msg.type in WS_CLOSED and ws.close_code == 1008
            for _ in range(6):
                status, body = await push_set(certs, gw.port, set_token)
                assert (status, body["reason"]) == (400, "signal-replayed")
            merged = await ops_text(gw.ops)
            assert (
                'ztgw_ssf_sets_total{result="accepted",transmitter="dev",via="push"} 1.0' in merged
            )
            assert (
                'ztgw_ssf_sets_total{result="replayed",transmitter="dev",via="push"} 6.0' in merged
            )
    finally:
        await runner.cleanup()


async def ops_text(ops: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{ops}/metrics") as r:
        return await r.text()
