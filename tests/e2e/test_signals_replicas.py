"""Signals act on every replica: two gateways sharing one SQLite file (as `workers = N` do) or
one real redis-server. A SET pushed to one ends the session, and closes its WebSocket, on the
other within a second; its replay is refused by either; a polled stream is acted on once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.e2e.test_signals import WS_CLOSED, call, forged, metric, until
from tests.redis_server import RedisServer
from tests.signals_fixtures import Signals
from tests.support import Certs, session
from ztgateway.app import Gateway
from ztgateway.credentials.devtoken import issue_token

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


async def test_a_set_pushed_to_one_replica_closes_the_websocket_on_the_other_within_a_second(
    signals: Signals, certs: Certs, backend: str, maybe_redis: RedisServer | None
) -> None:
    a, b = await pair(signals, backend, maybe_redis)
    token = issue_token(certs.issuer_key, sub="alice")
    assert (await call(a, certs, token))[0] == 200
    assert (await call(b, certs, token))[0] == 200
    set_token = forged(signals)
    async with (
        session(certs) as s,
        s.ws_connect(
            f"wss://127.0.0.1:{b.port}/api/ws", headers={"Authorization": f"Bearer {token}"}
        ) as ws,
    ):
        await ws.send_str("ping")
        assert (await ws.receive(timeout=5)).data == "ping"
        status, body = await signals.push(set_token, a)
        assert status == 202, body
        pushed = time.monotonic()
        msg = await ws.receive(timeout=5)
        closed = time.monotonic() - pushed
        assert msg.type in WS_CLOSED
        assert ws.close_code == 1008
    assert closed < 1.0, f"the other replica closed the WebSocket after {closed:.2f} s"
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
        status, body, _ = await call(gw, certs, token)
        assert (status, body["reason"]) == (401, "session-terminated")
    accepted = sum(
        metric(gw, "ztgw_ssf_sets_total", transmitter="dev", via="poll", result="accepted")
        for gw in (a, b)
    )
    assert accepted == len(jtis), "each SET acted on exactly once"
    await asyncio.sleep(0.3)  # more polls: nothing delivered twice
    assert not signals.transmitter.errors
