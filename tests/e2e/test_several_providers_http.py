"""Several identity providers at the HTTP level: what no browser click would send (mix-ups,
forged `iss`, a provider the route does not accept), API clients, and replicas."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest

from tests.conftest import GatewayFactory
from tests.e2e.test_signin import HTML, browser, idp_login
from tests.oidc_fixtures import (
    TWO_PROVIDER_ROUTES,
    TwoProviders,
    partner_device,
    start_two_idps,
    two_provider_config,
)
from tests.redis_server import RedisServer
from tests.support import Certs, free_port


async def start(s: aiohttp.ClientSession, setup: TwoProviders, provider: str, rd: str) -> str:
    """Begin a sign-in with `provider`; the provider's authorization URL (asking for the
    password again where the browser is signed in at the provider already)."""
    query = urlencode({"provider": provider, "rd": rd})
    r = await s.get(setup.origin + "/.ztgw/login/start?" + query, allow_redirects=False)
    assert r.status == 303, await r.text()
    location = r.headers["Location"]
    assert location.startswith(setup.issuers[provider] + "/authorize")
    return with_query(location, prompt="login")


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


async def test_a_callback_at_another_providers_callback_is_refused(
    two_providers: TwoProviders, certs: Certs
) -> None:
    """RFC 9700 §4.4 mix-up: corp's code and state, delivered at the partners' callback."""
    setup = two_providers
    async with browser(certs) as s:
        callback = await idp_login(s, await start(s, setup, "corp", "/echo"))
        assert urlsplit(callback).path == "/.ztgw/oidc/callback/corp"
        mixed = callback.replace("/callback/corp", "/callback/partners")
        r = await s.get(mixed, headers=HTML, allow_redirects=False)
        assert r.status == 401 and "state-invalid" in await r.text()
        # The attempt is spent: its own callback now fails too, and nobody is signed in.
        r = await s.get(callback, headers=HTML, allow_redirects=False)
        assert r.status == 401
    assert setup.gateway.store.sessions("alice") == []
    metrics = setup.gateway.metrics.render().decode()
    assert 'ztgw_logins_total{provider="partners",result="state-invalid"} 1.0' in metrics


async def test_a_response_naming_another_issuer_is_refused(
    two_providers: TwoProviders, certs: Certs
) -> None:
    """RFC 9207: the dev IdPs announce `iss` in their responses; it must be this provider's."""
    setup = two_providers
    async with browser(certs) as s:
        callback = await idp_login(s, await start(s, setup, "corp", "/echo"))
        assert parse_qs(urlsplit(callback).query)["iss"] == [setup.issuers["corp"]]
        forged = with_query(callback, iss=setup.issuers["partners"])
        r = await s.get(forged, headers=HTML, allow_redirects=False)
        assert r.status == 401 and "state-invalid" in await r.text()
        callback = await idp_login(s, await start(s, setup, "corp", "/echo"))
        parts = urlsplit(callback)
        query = {k: v[0] for k, v in parse_qs(parts.query).items() if k != "iss"}
        r = await s.get(
            urlunsplit(parts._replace(query=urlencode(query))),
            headers=HTML,
            allow_redirects=False,
        )
        assert r.status == 401, "announced iss left out"
        r = await s.get(
            (await idp_login(s, await start(s, setup, "corp", "/echo"))),
            headers=HTML,
            allow_redirects=False,
        )
        assert r.status == 303 and r.headers["Location"] == "/echo"


async def test_starting_with_a_provider_the_route_does_not_accept_is_refused(
    two_providers: TwoProviders, certs: Certs
) -> None:
    setup = two_providers
    async with browser(certs) as s:
        for query, status, reason in (
            ({"provider": "partners", "rd": "/corp/x"}, 403, "provider-not-allowed"),
            ({"provider": "google", "rd": "/echo"}, 400, "request-invalid"),
            ({"rd": "/echo"}, 400, "request-invalid"),  # several providers: which one?
        ):
            r = await s.get(
                setup.origin + "/.ztgw/login/start?" + urlencode(query), allow_redirects=False
            )
            assert r.status == status, query
            assert (await r.json(content_type=None))["reason"] == reason
        # The chooser for a corp-only route offers nothing to choose: straight to corp.
        r = await s.get(setup.origin + "/.ztgw/login?rd=/corp/x", allow_redirects=False)
        assert r.status == 303
        assert r.headers["Location"] == "/.ztgw/login/start?provider=corp&rd=/corp/x"
        page = await (await s.get(setup.origin + "/.ztgw/login?rd=/x", headers=HTML)).text()
        assert page.index("provider=corp&amp;") < page.index("provider=partners&amp;")


async def test_an_api_client_with_another_providers_session_gets_problem_json(
    two_providers: TwoProviders, certs: Certs
) -> None:
    setup = two_providers
    async with browser(certs, partner_device(certs)) as s:
        callback = await idp_login(s, await start(s, setup, "partners", "/partners/echo"))
        r = await s.get(callback, headers=HTML, allow_redirects=False)
        assert r.status == 303
        r = await s.get(setup.origin + "/partners/echo", headers={"Accept": "application/json"})
        assert r.status == 200
        assert (await r.json())["headers_map"]["x-forwarded-user"] == "partners:alice"
        r = await s.get(setup.origin + "/corp/echo", headers={"Accept": "application/json"})
        assert r.status == 403
        problem = await r.json(content_type=None)
        assert problem["reason"] == "provider-not-allowed" and problem["decision_id"]
        assert "detail" not in problem  # the route does not expose details to API clients


@pytest.mark.parametrize("shared", ["sqlite", "redis"])
async def test_a_second_providers_sign_in_started_on_one_replica_finishes_on_another(
    gateway_factory: GatewayFactory,
    certs: Certs,
    redis_server: RedisServer,
    tmp_path: Path,
    shared: str,
) -> None:
    port = free_port()
    origin = f"https://127.0.0.1:{port}"
    issuers, runners = await start_two_idps(tmp_path, origin)
    try:
        over: dict[str, Any] = {
            "oidc": two_provider_config(issuers),
            "routes": TWO_PROVIDER_ROUTES,
            **({"store": {"url": redis_server.url}} if shared == "redis" else {}),
        }
        a = await gateway_factory({**over, "server": {"port": port, "public_url": origin}})
        b = await gateway_factory({**over, "server": {"port": free_port(), "public_url": origin}})
        setup = TwoProviders(a, origin, issuers)
        other = f"https://127.0.0.1:{b.port}"
        async with browser(certs, partner_device(certs)) as s:
            authorize = await start(s, setup, "partners", "/partners/echo")
            # The provider sends the browser back; a load balancer hands it to the other one.
            callback = (await idp_login(s, authorize)).replace(origin, other)
            r = await s.get(callback, headers=HTML, allow_redirects=False)
            assert r.status == 303 and r.headers["Location"] == "/partners/echo"
            for replica in (origin, other):
                r = await s.get(replica + "/partners/echo", headers={"Accept": "application/json"})
                assert r.status == 200
                assert (await r.json())["headers_map"]["x-forwarded-user"] == "partners:alice"
                r = await s.get(replica + "/corp/echo", headers={"Accept": "application/json"})
                assert (await r.json(content_type=None))["reason"] == "provider-not-allowed"
    finally:
        for runner in runners:
            await runner.cleanup()
