"""nginx `auth_request` in front, ztgateway deciding on its ops listener: a real nginx."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import GatewayFactory
from tests.support import Certs, free_port, session
from ztgateway.credentials.devtoken import issue_token

pytestmark = pytest.mark.nginx
REPO = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture
async def nginx_front(
    gateway_factory: GatewayFactory, certs: Certs, upstream: int, tmp_path: Path
) -> AsyncIterator[int]:
    gw = await gateway_factory(
        {"forward_auth": {"enabled": True, "trusted_proxies": ["127.0.0.1/32"]}}
    )
    port = free_port()
    snippet = (REPO / "config/nginx/ztgateway-forward-auth.conf").read_text()
    snippet = snippet.replace("ZTGW_OPS", f"127.0.0.1:{gw.ops_port}")
    (tmp_path / "ztgateway-forward-auth.conf").write_text(snippet)
    shutil.copy(REPO / "config/nginx/ztgateway-identity-headers.conf", tmp_path)
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / d).mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""
user root;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp_path}/client_body;
  proxy_temp_path {tmp_path}/proxy;
  fastcgi_temp_path {tmp_path}/fastcgi;
  uwsgi_temp_path {tmp_path}/uwsgi;
  scgi_temp_path {tmp_path}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {certs.server};
    ssl_certificate_key {certs.server_key};
    ssl_client_certificate {certs.ca};
    ssl_verify_client on;
    include {tmp_path}/ztgateway-forward-auth.conf;
    location / {{
      auth_request /_ztgw_auth;
      include {tmp_path}/ztgateway-identity-headers.conf;
      proxy_pass http://127.0.0.1:{upstream};
    }}
  }}
}}
"""
    )
    proc = subprocess.Popen(
        [NGINX, "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(100):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                await w.wait_closed()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(
                        proc.stderr.read().decode() if proc.stderr else "nginx died"
                    ) from None
                await asyncio.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


async def test_nginx_forwards_the_identity_the_gateway_decided(
    nginx_front: int, certs: Certs
) -> None:
    async with (
        session(certs) as s,
        s.get(
            f"https://127.0.0.1:{nginx_front}/echo", headers={"X-Forwarded-User": "mallory"}
        ) as r,
    ):
        assert r.status == 200
        body = await r.json()
        decision_id = r.headers["X-ZT-Decision-Id"]
    seen = body["headers_map"]
    assert seen["x-forwarded-user"] == "alice"
    assert seen["x-zt-device-id"] == "alice-laptop"
    assert seen["x-zt-decision-id"] == decision_id
    assert seen["x-zt-assertion"].count(".") == 2


async def test_nginx_refuses_what_the_gateway_refuses(nginx_front: int, certs: Certs) -> None:
    async with session(certs) as s:
        async with s.get(f"https://127.0.0.1:{nginx_front}/api/echo") as r:
            assert r.status == 401
        token = issue_token(certs.issuer_key, sub="alice")
        async with s.get(
            f"https://127.0.0.1:{nginx_front}/admin/echo",
            headers={"Authorization": f"Bearer {token}"},
        ) as r:
            assert r.status == 403
        token = issue_token(certs.issuer_key, sub="alice", groups=["admins"])
        async with s.get(
            f"https://127.0.0.1:{nginx_front}/admin/echo",
            headers={"Authorization": f"Bearer {token}"},
        ) as r:
            assert r.status == 200
            assert "authorization" not in (await r.json())["headers_map"]


async def test_forward_auth_refuses_callers_that_are_not_the_trusted_proxy(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(
        {"forward_auth": {"enabled": True, "trusted_proxies": ["10.0.0.1/32"]}}
    )
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"http://127.0.0.1:{gw.ops_port}/forward-auth", headers={"X-Original-URI": "/echo"}
        ) as r,
    ):
        assert r.status == 403
        assert (await r.json(content_type=None))["reason"] == "request-invalid"
