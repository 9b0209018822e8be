"""Forward-auth decides and records exactly as the data plane does (security review M4).

An edge proxy (nginx `auth_request`, Traefik ForwardAuth) asks the ops listener about each
request. The answer must come from the same decide-and-record path as a request on the mTLS
port: the session is touched, anomalies and failed attempts are stored, and a TERMINATE
revokes the session, for the edge and the data plane alike. On the old code forward-auth only
evaluated and audited: the terminated session was allowed again on the next request.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any
from urllib.parse import quote

import aiohttp

from tests.conftest import GatewayFactory
from tests.e2e.test_sessions import call, route
from tests.support import Certs
from ztgateway.app import Gateway
from ztgateway.dev.tokens import issue_token
from ztgateway.sessions import token_session_id


def forward_auth_config() -> dict[str, Any]:
    return {
        # The certificate in the one header this edge passes it in (security review H1).
        "forward_auth": {
            "enabled": True,
            "trusted_proxies": ["127.0.0.1/32"],
            "edge": "nginx",
            "cert_header": "X-SSL-Client-Cert",
        },
        "routes": [route(ip_drift="terminate")],
    }


async def ask(gw: Gateway, certs: Certs, token: str, client_ip: str) -> tuple[int, str | None]:
    """What nginx's auth_request sends: the original request described in headers."""
    pem = certs.client("alice-laptop")[0].read_text()
    headers = {
        "X-Original-URI": "/echo",
        "X-Original-Method": "GET",
        "X-Forwarded-For": client_ip,
        "X-SSL-Client-Cert": quote(pem),
        "Authorization": f"Bearer {token}",
        "Accept": "application/json",
    }
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{gw.ops_port}/forward-auth", headers=headers) as r,
    ):
        return r.status, r.headers.get("X-ZT-Reason")


def session_of(gw: Gateway, token: str) -> Any:
    return gw.store.session(token_session_id(hashlib.sha256(token.encode()).hexdigest()))


async def test_forward_auth_terminate_revokes_the_session_and_stores_what_it_learned(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(forward_auth_config())
    token = issue_token(certs.issuer_key, sub="alice")
    before = time.time()

    assert await ask(gw, certs, token, "127.0.0.1") == (200, None)
    session = session_of(gw, token)
    assert session is not None, "an allowed forward-auth request starts the token's session"
    assert session.requests == 1 and session.last_seen >= before

    assert await ask(gw, certs, token, "127.0.0.1") == (200, None)
    assert session_of(gw, token).requests == 2, "last-seen and the request count are kept"

    # The client's address moves: the route terminates on IP drift.
    assert await ask(gw, certs, token, "203.0.113.9") == (401, "ip-drift")
    revoked = session_of(gw, token)
    assert revoked is not None and revoked.revoked, "a TERMINATE revokes the session"
    # ... so the old address does not get back in, neither through the edge ...
    assert await ask(gw, certs, token, "127.0.0.1") == (401, "session-terminated")
    # ... nor on the data plane: one session, whichever entry point decided.
    status, _, body = await call(gw, certs, token)
    assert (status, body["reason"]) == (401, "session-terminated")

    now = time.time()
    failures = await gw.store.failures_async("user:alice", now, 600)
    assert failures >= 2, "refusals through forward-auth count as failed attempts of the user"
    assert await gw.store.failures_async("ip:203.0.113.9", now, 600) == 1
    metrics = gw.metrics.render().decode()
    assert 'ztgw_session_terminations_total{reason="ip-drift",route="api"} 1.0' in metrics


async def test_forward_auth_and_the_data_plane_share_one_session(
    gateway_factory: GatewayFactory, certs: Certs
) -> None:
    gw = await gateway_factory(forward_auth_config())
    token = issue_token(certs.issuer_key, sub="alice")
    assert (await call(gw, certs, token))[0] == 200
    assert await ask(gw, certs, token, "127.0.0.1") == (200, None)
    assert session_of(gw, token).requests == 2
    # Terminated on the data plane (drift from 127.0.0.2) -> refused at the edge too.
    status, _, body = await call(gw, certs, token, ip="127.0.0.2")
    assert (status, body["reason"]) == (401, "ip-drift")
    assert await ask(gw, certs, token, "127.0.0.1") == (401, "session-terminated")
