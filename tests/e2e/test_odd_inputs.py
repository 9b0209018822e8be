"""Odd input to the gateway's own endpoints gets a clear refusal, never a 503 `stage-error`
(issue 18, I4: `rd=/a%2520b` and a CSRF token with non-ASCII digits raised into one)."""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from tests.oidc_fixtures import SignInSetup
from tests.support import Certs, client_ssl
from ztgateway.decision import Reason

HTML = {"Accept": "text/html"}
JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def arabic_now() -> str:
    return str(int(time.time())).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))


def cases() -> list[tuple[str, str, dict[str, Any]]]:
    fields = "&".join(f"f{i}=1" for i in range(30))
    forged = f"csrf={arabic_now()}.{'0' * 32}".encode()
    return [
        ("GET", "/.ztgw/login/start?rd=/a%2520b", {}),
        ("GET", "/.ztgw/login/start?rd=/a%20b%3Fx%3D%2520", {}),
        ("GET", "/.ztgw/login/start?rd=%FF%FE", {}),
        ("GET", "/.ztgw/login/start?rd=/" + "a" * 5000, {}),
        ("GET", "/.ztgw/login?rd=/a%2520b", {"headers": HTML}),
        ("GET", f"/.ztgw/oidc/callback?{fields}", {"headers": HTML}),
        ("GET", "/.ztgw/oidc/callback?state=%FF&code=%00", {"headers": HTML}),
        ("GET", "/.ztgw/oidc/callback?state=a&state=b", {}),
        ("GET", "/.ztgw/mfa?rd=/a%2520b", {"headers": HTML}),
        ("GET", "/.ztgw/mfa/enroll?rd=%00", {"headers": HTML}),
        ("GET", "/.ztgw/whoami", {"headers": {"Accept": "text/html;q=x, */*;;"}}),
        ("POST", "/.ztgw/logout", {"data": forged, "headers": FORM}),
        ("POST", "/.ztgw/mfa", {"data": forged + b"&code=123456&rd=/", "headers": FORM}),
        ("POST", "/.ztgw/mfa/enroll", {"data": forged + b"&action=start", "headers": FORM}),
        ("POST", "/.ztgw/logout", {"data": b"csrf=\xff\xfe", "headers": FORM}),
        ("POST", "/.ztgw/logout", {"data": b"csrf=a&csrf=b", "headers": FORM}),
        ("POST", "/.ztgw/logout", {"data": b"x" * 10_000, "headers": FORM}),
        ("POST", "/.ztgw/logout", {"data": b"--b--", "headers": {"Content-Type": "multipart/form-data; boundary=b"}}),
        ("POST", "/.ztgw/mfa", {"data": b"code=1&rd=" + b"%00" * 100, "headers": FORM}),
        ("POST", "/.ztgw/mfa/verify", {"data": b"[" * 3000 + b"]" * 3000, "headers": JSON}),
        ("POST", "/.ztgw/mfa/verify", {"data": b'{"code": {"a": 1}}', "headers": JSON}),
        ("POST", "/.ztgw/mfa/verify", {"data": b'{"code": "1-2-3"}', "headers": JSON}),
        ("POST", "/.ztgw/mfa/verify", {"data": b'{"code": "\\ud800"}', "headers": JSON}),
        ("POST", "/.ztgw/mfa/verify", {"data": b"\xff", "headers": JSON}),
        ("POST", "/.ztgw/mfa/verify", {"data": b"{}", "headers": {**JSON, "Origin": "https://évil.example"}}),
        ("POST", "/.ztgw/mfa/verify", {"data": b"{}", "headers": {**JSON, "Sec-Fetch-Site": "ééé"}}),
        ("POST", "/.ztgw/posture", {"data": b"\xff\xfe", "headers": {"Content-Type": "application/jose"}}),
    ]  # fmt: skip


async def test_odd_input_is_refused_clearly(signin: SignInSetup, certs: Certs) -> None:
    gw = signin.gateway
    await gw.mfa.enroll("alice")  # so that backup-code shaped input takes that path too
    connector = aiohttp.TCPConnector(ssl=client_ssl(certs))
    wrong = []
    async with aiohttp.ClientSession(connector=connector) as s:
        for method, path, kw in cases():
            async with s.request(method, signin.origin + path, allow_redirects=False, **kw) as r:
                body = await r.read()
                if r.status >= 500:
                    wrong.append((method, path[:60], r.status, body[:200]))
                elif r.content_type == "application/problem+json":
                    problem = await r.json(content_type=None)
                    if problem["reason"] not in {x.value for x in Reason} or (
                        problem["decision_id"] != r.headers["X-ZT-Decision-Id"]
                    ):
                        wrong.append((method, path[:60], r.status, problem))
    assert wrong == []
    assert 'reason="stage-error"' not in gw.metrics.render().decode()
