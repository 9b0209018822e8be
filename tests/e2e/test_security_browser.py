"""Ambient client certificates, in a real Chromium (security review M2).

Chromium holds alice's certificate for the gateway's origin (Playwright's `client_certificates`)
and visits a page on another site. That page makes the requests a hostile site makes: an
`<img>`, a `<script>`, a `no-cors` fetch POST, a form POST into a frame, a frame of the app.
Chromium attaches the certificate to each of them; none may reach the app as alice. The
recording upstream shows what reached it. A second hostile page sits on another port of the
gateway's own host (another origin of the same site, "same-site"). Afterwards alice's own
navigation to the gateway still works.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser

from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.e2e.test_proxy import ProxyFactory, RecordingUpstream
from tests.support import Certs, real_time_env
from ztgateway.app import Gateway

pytestmark = pytest.mark.browser

PROBES = ("img", "script", "fetch", "form", "frame")


def hostile_page(gateway: str, tag: str) -> str:
    """Every way a page can make the browser send a request with the certificate attached."""
    probe = f"{gateway}/probe/{tag}"
    return f"""<!doctype html><html><head><title>loading</title></head><body>
<iframe name="sink"></iframe>
<form id="f" method="post" action="{probe}-form" target="sink"><input name="x" value="1"></form>
<script>
const done = [];
function settle(name) {{ done.push(name); if (done.length === {len(PROBES)}) document.title = "done"; }}
const img = new Image();
img.onload = img.onerror = () => settle("img");
img.src = "{probe}-img";
const s = document.createElement("script");
s.onload = s.onerror = () => settle("script");
s.src = "{probe}-script";
document.head.appendChild(s);
fetch("{probe}-fetch", {{method: "POST", mode: "no-cors", credentials: "include",
                         body: "transfer=1000"}}).finally(() => settle("fetch"));
const frame = document.createElement("iframe");
frame.onload = () => settle("frame");
frame.src = "{probe}-frame";
document.body.appendChild(frame);
document.querySelector("iframe[name=sink]").onload = () => settle("form");
document.getElementById("f").submit();
</script></body></html>"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, env=real_time_env()
        )
        yield b
        await b.close()


async def serve(host: str, pages: dict[str, str]) -> tuple[web.AppRunner, int]:
    app = web.Application()
    for path, html in pages.items():

        async def handler(_: web.Request, html: str = html) -> web.Response:
            return web.Response(text=html, content_type="text/html")

        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def audit_reasons(gw: Gateway) -> dict[str, str]:
    """The path of each audited decision and its reason."""
    await gw.audit.flush()
    assert gw.config.audit.jsonl is not None
    out: dict[str, str] = {}
    for line in gw.config.audit.jsonl.read_text().splitlines():
        event: dict[str, Any] = json.loads(line)
        path = (event.get("input") or {}).get("path")
        if path:
            out[path] = event["result"]["reason"]
    return out


async def test_pages_of_other_sites_cannot_act_as_the_certificates_owner(
    browser: Browser, proxy: ProxyFactory, recording: RecordingUpstream, certs: Certs
) -> None:
    gw = await proxy()
    origin = f"https://127.0.0.1:{gw.port}"
    # Another site (another host) and another origin of the gateway's own site (another port).
    link = f'<!doctype html><a id="go" href="{origin}/echo?from=link">open the app</a>'
    cross, cross_port = await serve(
        "127.0.0.2", {"/": hostile_page(origin, "cross"), "/link": link}
    )
    sibling, sibling_port = await serve("127.0.0.1", {"/": hostile_page(origin, "sibling")})
    pem, key = certs.client("alice-laptop")
    context = await browser.new_context(
        ignore_https_errors=True,
        client_certificates=[{"origin": origin, "certPath": str(pem), "keyPath": str(key)}],
    )
    try:
        page = await context.new_page()
        page.set_default_timeout(15_000)
        for url in (f"http://127.0.0.2:{cross_port}/", f"http://127.0.0.1:{sibling_port}/"):
            await page.goto(url)
            await page.wait_for_function("document.title === 'done'")
        reached = [p for p in recording.paths() if p.startswith("/probe/")]
        assert reached == [], f"reached the app with alice's certificate: {reached}"
        reasons = await audit_reasons(gw)
        for tag in ("cross", "sibling"):
            for probe in PROBES:
                assert reasons.get(f"/probe/{tag}-{probe}") == "origin-denied", (tag, probe)
        # Alice's own visit: a navigation she makes herself.
        response = await page.goto(origin + "/echo")
        assert response is not None and response.status == 200
        seen = (await response.json())["headers_map"]
        assert seen["x-forwarded-user"] == "alice"
        assert seen["sec-fetch-site"] == "none"
        # A link on another site's page gets a page of the gateway to continue from: her click
        # there is a same-origin navigation (a route can let links through: cross_site = "lax").
        await page.goto(f"http://127.0.0.2:{cross_port}/link")
        async with page.expect_navigation() as navigation:
            await page.click("#go")
        response = await navigation.value
        assert response is not None and response.status == 403
        assert recording.paths().count("/echo?from=link") == 0
        async with page.expect_navigation() as navigation:
            await page.get_by_role("link", name="Continue to").click()
        response = await navigation.value
        assert response is not None and response.status == 200
        seen = (await response.json())["headers_map"]
        assert seen["sec-fetch-site"] == "same-origin"
        assert seen["x-forwarded-user"] == "alice"
        assert recording.paths().count("/echo?from=link") == 1
    finally:
        await context.close()
        await cross.cleanup()
        await sibling.cleanup()
