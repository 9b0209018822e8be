"""Memory under a flood (issue 18, M6 and I5): what a client that never keeps cookies, or loops
on "sign in", makes a gateway hold.

    python -m bench.flood [--requests 5000] [--logins 2000]

A real gateway in this process (a temporary dev PKI, the demo app upstream, the dev IdP for
sign-in), driven over real TLS connections with a client certificate:

1. `--requests` page requests (`Accept: text/html`) without a cookie, then as many with a
   cookie the gateway never issued; reported for each: sessions in memory, the growth of the
   Python heap (tracemalloc, after a collection) and of the process's resident memory (RSS).
2. `--logins` sign-in starts (`/.ztgw/login/start`) from one device, then the sign-ins in flight:
   per device in the store (where the gateway keeps them since issue 18) or in the OIDC client's
   memory (before it).

The same script runs against an older checkout (`PYTHONPATH=<checkout> python -m bench.flood`)
to compare; it prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sqlite3
import ssl
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp

from ztgateway.app import Gateway
from ztgateway.config import load_config
from ztgateway.dev.demo_app import start_demo_app
from ztgateway.dev.idp import hash_password, start_devidp
from ztgateway.dev.pki import init_pki


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def main(requests: int, logins: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ztgw-flood-"))
    pki = init_pki(tmp / "pki")
    upstream, upstream_port = await start_demo_app("127.0.0.1", 0)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    origin = f"https://127.0.0.1:{port}"
    users = tmp / "idp-users.toml"
    users.write_text(
        f"""[users.alice]
password_hash = "{hash_password("x", log_n=10)}"
[clients.ztgateway]
client_id = "ztgateway"
client_secret = "bench-client-secret-0123456789"
redirect_uris = ["{origin}/.ztgw/oidc/callback"]
"""
    )
    idp, _, issuer = await start_devidp("127.0.0.1", 0, users)
    config = tmp / "gateway.toml"
    config.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}
public_url = "{origin}"
[tls]
cert = "{pki.server_cert}"
key = "{pki.server_key}"
client_ca = "{pki.ca_cert}"
[ops]
enabled = false
[audit]
db = "{tmp}/audit.db"
[store]
url = "sqlite:///{tmp}/state.db"
[devices]
auto_approve = true
[mfa]
key_file = "{tmp}/mfa.key"
[oidc]
name = "dev"
issuer = "{issuer}"
client_id = "ztgateway"
client_secret = "bench-client-secret-0123456789"
[upstreams.demo]
url = "http://127.0.0.1:{upstream_port}"
[[routes]]
name = "app"
prefix = "/"
upstream = "demo"
"""
    )
    gw = Gateway(load_config(config))
    await gw.start()
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(
        str(pki.clients_dir / "alice-laptop.pem"), str(pki.clients_dir / "alice-laptop.key")
    )
    out: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=8),
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as s:
            async with s.get(origin + "/echo", headers={"Accept": "text/html"}) as r:
                await r.read()
            tracemalloc.start()
            for phase, cookie in (("page_requests", None), ("forged_cookies", "bogus")):
                heap0, rss0, sessions0 = heap(), rss(), len(gw.store.sessions())
                for i in range(requests):
                    headers = {"Accept": "text/html"}
                    if cookie:
                        headers["Cookie"] = f"__Host-ztgw-session={cookie}-{i}"
                    async with s.get(origin + "/echo", headers=headers) as r:
                        await r.read()
                await gw.store.flush()
                out[phase] = {
                    "requests": requests,
                    "sessions_before": sessions0,
                    "sessions_after": len(gw.store.sessions()),
                    "heap_growth_bytes": heap() - heap0,
                    "rss_growth_bytes": rss() - rss0,
                }
            heap0, rss0 = heap(), rss()
            for _ in range(logins):
                async with s.get(
                    origin + "/.ztgw/login/start?rd=/echo", allow_redirects=False
                ) as r:
                    await r.read()
            held: dict[str, Any] = {}
            with sqlite3.connect(tmp / "state.db") as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
                if "pending_logins" in tables:
                    held["in_store_per_device"] = dict(
                        db.execute("SELECT source, COUNT(*) FROM pending_logins GROUP BY source")
                    )
            if gw.oidc is not None:
                held["in_memory"] = gw.oidc.status()["pending_logins"]
            out["sign_in_starts"] = {
                "starts": logins,
                "pending": held,
                "heap_growth_bytes": heap() - heap0,
                "rss_growth_bytes": rss() - rss0,
            }
            tracemalloc.stop()
    finally:
        await gw.stop()
        await idp.cleanup()
        await upstream.cleanup()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--logins", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.requests, args.logins)), indent=2))
