from __future__ import annotations

import aiohttp

from tests.support import Certs, session
from ztgateway.app import Gateway


async def test_dump(gateway: Gateway, certs: Certs) -> None:
    async with session(certs) as s:
        async with s.get(f"https://127.0.0.1:{gateway.port}/echo") as r:
            assert r.status == 200
        async with s.get(f"https://127.0.0.1:{gateway.port}/api/echo") as r:
            assert r.status == 401
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gateway.ops_port}/metrics") as r:
        open("/tmp/scratch/metrics.txt", "w").write(await r.text())
