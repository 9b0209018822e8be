"""What a reload can apply to a running gateway, and what only a restart can.

Issue 19 D4: a reload reported success while `[server] max_connections`, the timeouts and the
header limits kept their start-up values, silently. A reload now applies the listener's limits
to every connection accepted afterwards, and names each changed setting that the running
process cannot take on (a port, the number of workers, where the audit log is written...): in
the reload's answer (`restart_required`), in a WARNING log line, and in the gauge
`ztgw_config_restart_required{setting}`. They are compared with the configuration the process
started with, so a second reload still reports what the first could not apply.
"""

from __future__ import annotations

from typing import Any, Final

from .loader import GatewayConfig

LISTENER_LIMITS: Final = (
    "handshake_timeout",
    "header_timeout",
    "idle_timeout",
    "max_connections",
    "max_header_bytes",
    "max_headers",
    "max_pending_handshakes",
    "max_pending_handshakes_per_source",
    "body_timeout",
    "send_timeout",
    "max_target_bytes",
    "hosts",
    "allow_trace",
    "websocket_ping_interval",
    "websocket_max_message",
)
"""`[server]` settings a reload applies to connections accepted from then on (the listener's
budgets and the HTTP/1.1 protocol's limits: `app.listener_settings`)."""

RESTART_REQUIRED: Final = (
    "server.host",
    "server.port",
    "server.workers",
    "server.min_ready_workers",
    "ops.host",
    "ops.port",
    "ops.enabled",
    "audit.db",
    "audit.jsonl",
    "audit.durability",
    "audit.journal_dir",
    "audit.max_queue",
    "audit.checkpoint_interval",
    "store.url",
    "store.base",
    "logging.level",
    "logging.format",
    "keys",
    "issuers",
    "oidc",
    "mfa",
    "assertion",
    "risk.geoip_db",
    "signals",
)
"""Settings held by long-lived parts built at start-up (sockets, the audit writer, the store,
the gateway's root key, the token verifier, the OIDC client, the MFA box, the assertion signer,
the GeoIP reader, the signal receiver's transmitters and pollers)."""


def setting(config: GatewayConfig, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def changed(old: GatewayConfig, new: GatewayConfig, paths: tuple[str, ...]) -> list[str]:
    return [p for p in paths if setting(old, p) != setting(new, p)]


def listener_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    return changed(old, new, tuple(f"server.{name}" for name in LISTENER_LIMITS))


def restart_required(started: GatewayConfig, new: GatewayConfig) -> list[str]:
    return changed(started, new, RESTART_REQUIRED)
