"""Test support: a TOML writer, config builders, TLS clients, a hand-moved clock, and what the
end-to-end tests ask a running gateway (`get`, `metric`, `audit_event(s)`, `admin`)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from cryptography.x509.oid import ExtendedKeyUsageOID
from multidict import CIMultiDict

from ztgateway.clock import SYSTEM_CLOCK, Clock, ManualClock
from ztgateway.dev.pki import CertificateAuthority, init_pki

if TYPE_CHECKING:
    from ztgateway.app import Gateway


class CallableClock(ManualClock):
    """The tests' one hand-moved clock: a `ManualClock` (`advance`, `set`) that can also be
    called, as the credential code takes a `() -> float` (TokenVerifier, OIDCClient, the dev
    IdP). It starts at `at`, or at the wall time of the moment it is made."""

    __slots__ = ()

    def __init__(self, at: float | None = None) -> None:
        super().__init__(SYSTEM_CLOCK.time() if at is None else at)

    def __call__(self) -> float:
        return self.time()


def real_time_env() -> dict[str, str]:
    """This process's environment without libfaketime, for a child that cannot run under it.

    `make test-future` runs the suite under libfaketime (tests/run_future.sh). Two children
    break there: Chromium's zygote deadlocks and redis-server's allocator recurses into
    clock_gettime at start-up. Neither clock matters to what is tested: the browser is a
    client with its own clock (it ignores the test CA's validity and gets Max-Age cookies)
    and the gateway gives Redis only relative TTLs, never a time of its own.
    """
    return {
        k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("FAKETIME")
    }


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now, for a server a test starts as another process."""
    return free_ports(1, host)[0]


def accepting(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """A server accepts on `port` now. A port from `free_port()` lies in the ephemeral range,
    where probing it before its server binds can connect the probe to itself (TCP simultaneous
    open): that is not a server, and while it lasts the server cannot bind the port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return bool(s.getsockname() != s.getpeername())
    except OSError:
        return False


@contextlib.contextmanager
def refusing_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port where nothing answers, for as long as the block runs: bound and never listening,
    so a connection to it is refused and nothing else can take it. A port from free_port() is
    only free until something binds it: an "unreachable" upstream once turned out to be the
    gateway's own ops listener, bound to the same port a moment later, which answered 404."""
    sock = socket.socket()
    try:
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports: all bound at once, so the kernel cannot hand one out twice
    (two calls of free_port() can return the same port, and a gateway then refuses an ops
    port equal to its mTLS port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Enough TOML for gateway configs: scalars, lists, tables and arrays of tables."""
    lines: list[str] = []
    nested: list[tuple[str, Any]] = []
    for k, v in data.items():
        if isinstance(v, Mapping) and not (prefix and k in ("claims", "headers") and _flat(v)):
            nested.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            nested.append((k, v))
        else:
            lines.append(f"{json.dumps(k)} = {_toml_value(v)}")
    for k, v in nested:
        name = f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)
        if isinstance(v, list):
            for item in v:
                lines.append(f"\n[[{name}]]")
                lines.append(to_toml(item, name))
        else:
            lines.append(f"\n[{name}]")
            lines.append(to_toml(v, name))
    return "\n".join(lines)


def _flat(v: Mapping[str, Any]) -> bool:
    return all(not isinstance(x, Mapping) for x in v.values())


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


@dataclass
class Certs:
    dir: Path
    ca: Path
    ca_key: Path
    server: Path
    server_key: Path
    crl: Path
    issuer_key: Path
    issuer_jwks: Path

    def client(self, name: str) -> tuple[Path, Path]:
        return self.dir / "clients" / f"{name}.pem", self.dir / "clients" / f"{name}.key"


def make_pki(d: Path, clock: Clock = SYSTEM_CLOCK) -> Certs:
    """A dev PKI valid at `clock`'s now, plus the odd clients the tests need.

    Tests that judge a fixed instant make their PKI with a ManualClock at that instant, so
    nothing they compare was made "now".
    """
    paths = init_pki(d, clock=clock)
    ca = CertificateAuthority.load(paths.ca_cert, paths.ca_key, clock=clock)
    now = clock.now()
    clients = d / "clients"
    ca.issue_client(
        "old-laptop",
        user="alice",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    ).write(clients / "old-laptop.pem", clients / "old-laptop.key")
    ca.issue_client(
        "server-cert-as-client", user="svc", eku=(ExtendedKeyUsageOID.SERVER_AUTH,)
    ).write(clients / "server-cert-as-client.pem", clients / "server-cert-as-client.key")
    ca.issue_client("stolen-laptop", user="alice").write(
        clients / "stolen-laptop.pem", clients / "stolen-laptop.key"
    )
    ca.issue_client("carol-laptop", user="carol").write(
        clients / "carol-laptop.pem", clients / "carol-laptop.key"
    )
    other = CertificateAuthority.generate("Mallory CA", clock=clock)
    other.issue_client("mallory-laptop", user="alice").write(
        clients / "mallory-laptop.pem", clients / "mallory-laptop.key"
    )
    return Certs(
        dir=d,
        ca=paths.ca_cert,
        ca_key=paths.ca_key,
        server=paths.server_cert,
        server_key=paths.server_key,
        crl=paths.crl,
        issuer_key=paths.issuer_key,
        issuer_jwks=paths.issuer_jwks,
    )


def client_ssl(
    certs: Certs, name: str | None = "alice-laptop", *, tls13: bool = True
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if name:
        pem, key = certs.client(name)
        ctx.load_cert_chain(str(pem), str(key))
    return ctx


def session(certs: Certs, name: str | None = "alice-laptop", **kw: Any) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        ssl=client_ssl(certs, name), force_close=kw.pop("force_close", False)
    )
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, **kw)


# --- asking a running gateway ------------------------------------------------------------------
# One copy of what the end-to-end tests ask a gateway: a request through its mTLS port, a
# metric from its registry, its audit events, its admin API.

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
"""The admin API's bearer token in every test configuration (conftest.base_config)."""
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    """Case-insensitive (a multidict), as received."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def decision_id(self) -> str:
        return self.headers["X-ZT-Decision-Id"]


async def get(
    gw: Gateway,
    certs: Certs,
    path: str = "/echo",
    token: str | None = None,
    *,
    cert: str | None = "alice-laptop",
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """One GET through the gateway's mTLS port, with `cert`'s client certificate and, when
    given, `token` as the bearer token."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with (
        session(certs, cert) as s,
        s.get(f"https://127.0.0.1:{gw.port}{path}", headers=sent) as r,
    ):
        return Reply(r.status, CIMultiDict(r.headers), await r.read())


async def scrape(ops_port: int) -> str:
    """The gateway's /metrics as Prometheus reads it: through the ops listener, as text."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{ops_port}/metrics") as r,
    ):
        assert r.status == 200
        return await r.text()


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """One sample of the gateway's registry; a labelled counter never touched counts as 0."""
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


def metric_total(gw: Gateway, name: str) -> float:
    """A sample summed over all its label values."""
    return sum(
        sample.value
        for family in gw.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    )


async def audit_events(gw: Gateway) -> list[dict[str, Any]]:
    """Every event of the gateway's JSON-lines audit log, once the writer has flushed."""
    await gw.audit.flush()
    path = gw.config.audit.jsonl
    assert path is not None
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def audit_event(gw: Gateway, decision_id: str) -> dict[str, Any]:
    """The audit event of one decision."""
    for event in await audit_events(gw):
        if event["decision_id"] == decision_id:
            return event
    raise AssertionError(f"no audit event for decision {decision_id}")


async def admin(
    gw: Gateway,
    method: str,
    path: str,
    *,
    token: Mapping[str, str] | None = ADMIN,
    body: Any = None,
) -> tuple[int, Any]:
    """A call of the admin API on the ops listener: status and JSON answer."""
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method, f"http://127.0.0.1:{gw.ops_port}{path}", headers=token or {}, json=body
        ) as r,
    ):
        return r.status, await r.json(content_type=None)
