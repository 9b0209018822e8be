"""`[server]`, `[tls]`, `[ops]` and `[forward_auth]`: the listeners, their limits and who may
speak for a client (trusted proxies, the forward-auth edge)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..configreader import Table
from ..request.headerfamilies import cert_header_problem

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


CertMode = Literal["required", "optional"]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    client_cert: CertMode = "required"
    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 10_000
    max_header_bytes: int = 8190
    max_headers: int = 100
    client_max_size: int = 10 * 1024 * 1024
    shutdown_timeout: float = 15.0
    trusted_proxies: tuple[Network, ...] = ()
    spoofed_headers: Literal["strip", "deny"] = "strip"
    allow_encoded_slash: bool = False
    public_url: str = ""
    workers: int = 1
    body_timeout: float = 30.0
    send_timeout: float = 30.0
    max_target_bytes: int = 8190
    hosts: tuple[str, ...] = ()
    allow_trace: bool = False
    websocket_ping_interval: float = 20.0
    websocket_max_message: int = 4 * 1024 * 1024
    invalid_credentials_limit: int = 30
    """Failed credential verifications per client address within the window before further
    credentials from it are refused unverified (throttle.py); 0 turns the throttle off."""
    invalid_credentials_window: float = 60.0
    hsts_max_age: int = 31_536_000
    """Strict-Transport-Security max-age on the gateway's own answers (0: not sent)."""
    hsts_include_subdomains: bool = False
    max_pending_handshakes: int = 1024
    """Connections mid-handshake, budgeted apart from `max_connections` (established)."""
    max_pending_handshakes_per_source: int = 64
    """Of those, from one address (an IPv6 /64): one host cannot starve the others."""
    min_ready_workers: int = 1
    """With workers > 1, the supervisor's /readyz is 200 while at least this many are ready."""
    memory_trim_interval: float = 30.0
    """Seconds between returns of freed heap memory to the system (malloc_trim); 0: never."""


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path
    crl: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    reload_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class OpsConfig:
    host: str = "127.0.0.1"
    port: int = 9100
    enabled: bool = True
    admin_token_file: Path | None = None


EdgeProxy = Literal["nginx", "traefik", "caddy"]


EDGE_PROXIES: tuple[EdgeProxy, ...] = ("nginx", "traefik", "caddy")


@dataclass(frozen=True, slots=True)
class ForwardAuthConfig:
    enabled: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    edge: EdgeProxy = "nginx"
    """Whose headers describe the original request (URI, method, host, client address): only
    that proxy's are read; another proxy's names in a request were sent by the client."""
    cert_header: str = ""
    """The one header in which the edge passes the client certificate it verified ("" = the
    edge passes none). The certificate is verified again here; any other certificate header
    in a request is refused (docs/security.md, "Forward-auth")."""


def parse_server(t: Table) -> ServerConfig:
    cfg = ServerConfig(
        host=t.text("host", "127.0.0.1"),
        port=t.integer("port", 8443, min=0, max=65535),
        client_cert=t.choice("client_cert", ("required", "optional"), "required"),  # type: ignore[arg-type]
        handshake_timeout=t.duration("handshake_timeout", 10.0, min=0.1),
        header_timeout=t.duration("header_timeout", 10.0, min=0.1),
        idle_timeout=t.duration("idle_timeout", 60.0, min=0.1),
        max_connections=t.integer("max_connections", 10_000, min=1),
        max_header_bytes=t.integer("max_header_bytes", 8190, min=256, max=65536),
        max_headers=t.integer("max_headers", 100, min=8, max=1000),
        client_max_size=t.integer("client_max_size", 10 * 1024 * 1024, min=0),
        shutdown_timeout=t.duration("shutdown_timeout", 15.0, min=0.0),
        trusted_proxies=t.cidrs("trusted_proxies"),
        spoofed_headers=t.choice("spoofed_headers", ("strip", "deny"), "strip"),  # type: ignore[arg-type]
        allow_encoded_slash=t.flag("allow_encoded_slash", False),
        public_url=t.text("public_url", ""),
        workers=t.integer("workers", 1, min=1, max=64),
        body_timeout=t.duration("body_timeout", 30.0, min=0.1),
        send_timeout=t.duration("send_timeout", 30.0, min=0.1),
        max_target_bytes=t.integer("max_target_bytes", 8190, min=256, max=65536),
        hosts=tuple(_host_names(t)),
        allow_trace=t.flag("allow_trace", False),
        websocket_ping_interval=t.duration("websocket_ping_interval", 20.0, min=0.1),
        websocket_max_message=t.integer(
            "websocket_max_message", 4 * 1024 * 1024, min=1024, max=1 << 30
        ),
        invalid_credentials_limit=t.integer("invalid_credentials_limit", 30, min=0),
        invalid_credentials_window=t.duration("invalid_credentials_window", 60.0, min=1.0),
        hsts_max_age=t.integer("hsts_max_age", 31_536_000, min=0),
        hsts_include_subdomains=t.flag("hsts_include_subdomains", False),
        max_pending_handshakes=t.integer("max_pending_handshakes", 1024, min=1),
        max_pending_handshakes_per_source=t.integer("max_pending_handshakes_per_source", 64, min=1),
        min_ready_workers=t.integer("min_ready_workers", 1, min=1, max=64),
        memory_trim_interval=t.duration("memory_trim_interval", 30.0, min=0.0),
    )
    if cfg.min_ready_workers > cfg.workers and t.has("min_ready_workers"):
        t.fail("min_ready_workers", f"must be at most workers ({cfg.workers})")
    t.done()
    return cfg


def _host_names(t: Table) -> list[str]:
    """`server.hosts`: the Host names the data plane answers for (RFC 9110 §7.2)."""
    out = []
    for name in t.str_list("hosts", ()):
        host = name.strip().lower()
        if (
            not host
            or any(c in host for c in "/?#@ ")
            or (":" in host and not host.startswith("["))
        ):
            t.fail("hosts", f"{name!r} is not a host name (no scheme, port or path)")
        out.append(host)
    return out


def parse_tls(t: Table) -> TLSConfig:
    cert, key, ca = t.path("cert", required=True), t.path("key", required=True), None
    ca = t.path("client_ca", required=True)
    assert cert is not None and key is not None and ca is not None
    cfg = TLSConfig(
        cert=cert,
        key=key,
        client_ca=ca,
        crl=t.path("crl"),
        min_version=t.choice("min_version", ("TLSv1.2", "TLSv1.3"), "TLSv1.2"),  # type: ignore[arg-type]
        reload_interval=t.duration("reload_interval", 2.0, min=0.0),
    )
    t.done()
    return cfg


def parse_ops(t: Table) -> OpsConfig:
    cfg = OpsConfig(
        host=t.text("host", "127.0.0.1"),
        port=t.integer("port", 9100, min=0, max=65535),
        enabled=t.flag("enabled", True),
        admin_token_file=t.path("admin_token_file", must_exist=False),
    )
    t.done()
    return cfg


def parse_forward_auth(t: Table) -> ForwardAuthConfig:
    cfg = ForwardAuthConfig(
        enabled=t.flag("enabled", False),
        trusted_proxies=t.cidrs("trusted_proxies"),
        edge=t.choice("edge", EDGE_PROXIES, "nginx"),  # type: ignore[arg-type]
        cert_header=t.text("cert_header", ""),
    )
    if cfg.enabled and not cfg.trusted_proxies:
        t.fail("trusted_proxies", "forward-auth needs the front proxy's addresses")
    if cfg.cert_header:
        problem = cert_header_problem(cfg.edge, cfg.cert_header)
        if problem:
            t.fail("cert_header", problem)
    t.done()
    return cfg
