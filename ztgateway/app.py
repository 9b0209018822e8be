"""The gateway process: listeners, the request handler, and start-up / shut-down in order.

`Gateway` owns every long-lived service (TLS material, token verifier, upstream pools, audit
log, metrics) and the current `Runtime` snapshot. A request reads `self.runtime` once; a reload
builds a complete new snapshot and swaps the reference.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import signal
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import BadHttpMessage
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import __version__, endpoints, mfa_endpoints, portal
from .assertion import AssertionSigner, load_or_create_key
from .audit import AuditLog, AuditUnavailable, MaskKey, mask_headers, mask_query
from .audit.checkpoint import CheckpointSigner
from .audit.events import upstream_event
from .audit.keys import key_id, load_checkpoint_signing, load_mask_key, placement_warnings
from .clock import SYSTEM_CLOCK, Clock
from .config import GatewayConfig, load_config
from .context import RequestContext
from .credentials.jwt import TokenError, TokenVerifier
from .credentials.oidc import OIDCClient, StorePendingLogins
from .decision import Decision, Finding, Reason, Verdict
from .forms import CSRFTokens
from .forward.headers import (
    SERVER_BANNER,
    identity_header_names,
    list_header_value,
    upgrade_requested,
    upstream_request_headers,
)
from .forward.http import (
    BodyTooLarge,
    Upstreams,
    classify,
    forward_http,
    upstream_target,
    upstream_url,
)
from .forward.upstream import UpstreamFailure
from .forward.websocket import Watch, bridge_websocket
from .geo import GeoLocator
from .hostnames import server_names
from .keys import GatewayKeys
from .lifeline import watch_lifeline
from .listener import GatewayRequestHandler, Listener
from .logs import RateLimit, decision_id_var
from .metrics import Metrics
from .mfa import MFA
from .paths import encode_path
from .pipeline import Pipeline, default_stages
from .reloading import RESTART_REQUIRED, listener_changes, listener_limits, restart_required
from .resources import Heap, ensure_fd_limit
from .responses import DECISION_HEADER, add_security_headers, hsts_value, problem, see_other
from .routes import RouteTable
from .runtime import Runtime
from .stages.device import new_device
from .stages.risk import remember
from .stages.session import SessionKeeper, clear_cookie_header
from .store import store_from_url
from .store.base import ChangeKind, StoreUnavailable
from .tls import TLSManager

log = logging.getLogger("ztgateway")
INTERNAL_PREFIX = "/.ztgw/"
_PORTAL_PAGES = {
    ("/.ztgw/login", "GET"): portal.login_page,
    ("/.ztgw/login/start", "GET"): portal.login_start,
    ("/.ztgw/oidc/callback", "GET"): portal.callback,
    ("/.ztgw/logout", "GET"): portal.logout,
    ("/.ztgw/logout", "POST"): portal.logout,
    ("/.ztgw/signed-out", "GET"): portal.signed_out,
    ("/.ztgw/whoami", "GET"): portal.whoami,
}
_SIGN_IN_AGAIN = frozenset(
    {
        Reason.IDENTITY_UNAUTHENTICATED,
        Reason.SESSION_EXPIRED,
        Reason.SESSION_TERMINATED,
        Reason.SESSION_INVALID,
    }
)
WS_RECHECK_INTERVAL = 5.0
_OTHER_FDS = 64
"""File descriptors kept for everything but connections: logs, the store, the audit files,
the ops listener, TLS material reads."""


class Gateway:
    session_sweep_interval = 60.0
    """Seconds between sweeps of expired sessions out of memory (tests shorten it)."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        worker: int | None = None,
        ops_socket: Path | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        """Every part of the gateway reads time from here (tests pass a ManualClock)."""
        self.worker = worker
        self.ops_socket = ops_socket
        """A worker's ops listener: a Unix socket in the supervisor's private directory."""
        self.metrics = Metrics()
        self.tls = TLSManager(config.tls, config.server.client_cert, on_reload=self._on_tls_reload)
        self.mask_key, checkpoint_key = self._audit_keys(config, create=True)
        self.audit = AuditLog(
            config.audit.db,
            jsonl_path=config.audit.jsonl,
            max_queue=config.audit.max_queue,
            on_write_failure=lambda exc: self.metrics.audit_failures.inc(),
            durability=config.audit.durability,
            journal_dir=config.audit.journal_dir,
            checkpoint_signer=CheckpointSigner(checkpoint_key) if checkpoint_key else None,
            checkpoint_interval=config.audit.checkpoint_interval,
            clock=clock,
        )
        self.tokens: TokenVerifier | None = None
        self.store = store_from_url(config.store.url, base=config.store.base, clock=clock)
        self.store.subscribe(self._on_store_change)
        self.store.observe = self._on_store_write
        self.upstreams = Upstreams()
        self.geo = GeoLocator.open(config.risk.geoip_db)
        if config.risk.geoip_db is not None and not self.geo.available:
            log.warning(
                "geolocation unavailable, impossible travel is not checked: %s", self.geo.error
            )
        self.mfa = MFA(
            config.mfa,
            self.store,
            create_key=config.mfa.key_file is not None,
            clock=clock,
            on_backup_check=lambda result: self.metrics.mfa_backup_checks.labels(result).inc(),
        )
        self.keeper = SessionKeeper(self.store, config.sessions)
        # Keyed at start() from the one root key every worker and replica shares (keys.py):
        # the CSRF tokens, the sign-in's login cookie and, unless a key file is configured,
        # the assertion signature (issue 18, I3).
        self.csrf: CSRFTokens
        self.signer: AssertionSigner
        self.oidc: OIDCClient | None = None
        self.oidc_name = config.oidc.provider.name if config.oidc.provider is not None else "-"
        self.runtime = self._build_runtime(config)
        self.listener: Listener | None = None
        self.ops_runner: web.AppRunner | None = None
        self.ops_port: int | None = None
        self.port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watches: set[Watch] = set()
        self._dry: tuple[Runtime, Runtime] | None = None
        self.started_config = config
        """What the long-lived parts were built from (reloading.py compares with it)."""
        self.last_reload: dict[str, Any] = {}
        self.heap = Heap()
        self.started_at = clock.time()
        self._update_cert_metrics()
        self.metrics.watch_devices(lambda: [d.state for d in self.store.devices()])
        self.metrics.watch_sessions(self._active_sessions)

    @staticmethod
    def _audit_keys(
        config: GatewayConfig, *, create: bool
    ) -> tuple[MaskKey | None, Ed25519PrivateKey | None]:
        """The audit mask key and checkpoint key, both kept outside the audit store."""
        a = config.audit
        mask = load_mask_key(a.mask_key_file, a.mask_key_env, create=create)
        signing = load_checkpoint_signing(
            a.checkpoint_key_file, a.checkpoint_public_keys, create=create
        )
        return mask, signing

    # --- runtime snapshot ------------------------------------------------------------------
    def _build_runtime(self, config: GatewayConfig) -> Runtime:
        rt = Runtime(
            config=config,
            routes=RouteTable(config.routes),
            metrics=self.metrics,
            revocations=lambda: self.tls.current.revocations,
            tokens=self.tokens,
            store=self.store,
            geo=self.geo,
            clock=self.clock,
            server_names=server_names(config, lambda: self.tls.current.server_names),
        )
        rt.pipeline = Pipeline(default_stages(rt), on_stage_error=self._on_stage_error)
        self.metrics.prepare_routes(
            [r.name for r in config.routes], [s.name for s in rt.pipeline.stages]
        )
        return rt

    def _on_store_change(self, kind: ChangeKind, key: str) -> None:
        # A device or session changed (perhaps revoked, from the CLI or another process):
        # open WebSockets re-verify now instead of at their next interval.
        if kind in (ChangeKind.DEVICE, ChangeKind.SESSION, ChangeKind.USER):
            for w in list(self._watches):
                w.wake()

    def _on_store_write(self, operation: str, seconds: float, ok: bool) -> None:
        self.metrics.store_seconds.labels(operation).observe(seconds)
        if not ok:
            self.metrics.store_write_errors.labels(operation).inc()

    def _active_sessions(self) -> dict[str, int]:
        now = self.clock.time()
        counts: dict[str, int] = {}
        for s in self.store.sessions():
            if not s.revoked and s.expires_at > now:
                counts[s.kind] = counts.get(s.kind, 0) + 1
        return counts

    def dry_runtime(self) -> Runtime:
        """The current snapshot, judging without side effects (for /decide)."""
        rt = self.runtime
        cached = self._dry
        if cached is not None and cached[0] is rt:
            return cached[1]
        dry = Runtime(
            config=rt.config,
            routes=rt.routes,
            metrics=Metrics(),
            revocations=rt.revocations,
            tokens=rt.tokens,
            store=rt.store,
            dry_run=True,
            geo=rt.geo,
            clock=rt.clock,
        )
        dry.pipeline = Pipeline(default_stages(dry))
        self._dry = (rt, dry)
        return dry

    def _on_stage_error(self, stage: str) -> None:
        self.metrics.stage_errors.labels(stage).inc()

    def _on_tls_reload(self, ok: bool, error: str) -> None:
        self.metrics.tls_reloads.labels("success" if ok else "failure").inc()
        self._update_cert_metrics()
        if ok:
            # Open WebSockets re-verify at once: a revoked certificate closes them now.
            for w in list(self._watches):
                w.wake()

    def _update_cert_metrics(self) -> None:
        m = self.tls.current
        self.metrics.cert_expiry.labels("server").set(m.server_not_after)
        self.metrics.cert_expiry.labels("client_ca").set(m.ca_not_after)
        if m.revocations.next_update is not None:
            self.metrics.crl_next_update.set(m.revocations.next_update)

    def _on_token_result(self, issuer: str, result: str) -> None:
        self.metrics.token_validations.labels(issuer, result).inc()

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        for path in (cfg.audit.db, cfg.audit.jsonl):
            if path is not None:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        await self.audit.start()
        a = cfg.audit
        for warning in placement_warnings(
            a.db,
            a.jsonl,
            a.mask_key_file,
            a.checkpoint_key_file,
            mask_env=self.mask_key is not None and a.mask_key_file is None,
        ):
            log.warning("%s", warning)
        await self.store.open()
        await self._load_keys()
        if self.oidc is not None:
            await self.oidc.start()
        if cfg.issuers:
            self.tokens = TokenVerifier(
                cfg.issuers,
                session_factory=None,
                on_result=self._on_token_result,
                clock=self.clock.time,
            )
            await self.tokens.start()
            self.metrics.watch_issuers(self.tokens.jwks_status)
            self.runtime = self._build_runtime(cfg)
        s = cfg.server
        self.listener = Listener(
            handler=self.handle,
            context=lambda: self.tls.current.context,
            **listener_limits(s),
            on_handshake=self._on_handshake,
            on_protocol_error=self._on_protocol_error,
            on_header_timeout=self.metrics.slow_clients.inc,
            on_connection_change=self.metrics.connections_open.set,
            on_rejected=lambda r: self.metrics.connections_rejected.labels(r).inc(),
            decorate=lambda resp: add_security_headers(resp, self._hsts()),
        )
        self._budget_fds(self.listener)
        self.port = await self.listener.start(s.host, s.port, reuse_port=self.worker is not None)
        if cfg.ops.enabled:
            from .ops import create_ops_app

            self.ops_runner = web.AppRunner(create_ops_app(self), access_log=None)
            await self.ops_runner.setup()
            if self.ops_socket is not None:
                # A worker: only its supervisor talks to it, through a socket in a 0700
                # directory, so no TCP port is taken (or raced for) per worker.
                with suppress(FileNotFoundError):
                    self.ops_socket.unlink()  # left by the worker this one replaces
                unix = web.UnixSite(self.ops_runner, str(self.ops_socket))
                await unix.start()
                self.ops_socket.chmod(0o600)
            else:
                site = web.TCPSite(self.ops_runner, cfg.ops.host, cfg.ops.port)
                await site.start()
                self.ops_port = site.port
        self._tasks.append(asyncio.ensure_future(self._poll_tls()))
        self._tasks.append(asyncio.ensure_future(self._report_audit_depth()))
        if s.memory_trim_interval > 0 and self.heap.available:
            self._tasks.append(asyncio.ensure_future(self._trim_memory(s.memory_trim_interval)))
        self._tasks.append(asyncio.ensure_future(self._expire_sessions()))
        log.info(
            "ztgateway %s listening on https://%s:%d (ops on %s)",
            __version__, s.host, self.port,
            self.ops_socket or f"{cfg.ops.host}:{self.ops_port}",
        )  # fmt: skip

    async def _load_keys(self) -> None:
        cfg = self.config
        keys = await GatewayKeys.load(cfg.keys, self.store)
        self.csrf = CSRFTokens(keys.csrf)
        provider = cfg.oidc.provider
        if provider is not None:
            self.oidc = OIDCClient(
                provider,
                clock=self.clock.time,
                secret=keys.oidc_login,
                pending=StorePendingLogins(self.store),
            )
        key_file = cfg.assertion.key
        self.signer = AssertionSigner(
            load_or_create_key(key_file) if key_file is not None else keys.assertion_key(),
            issuer=cfg.assertion.issuer or cfg.server.public_url or "ztgateway",
            ttl=cfg.assertion.ttl,
            clock=self.clock,
            also_publish=cfg.assertion.also_publish,
        )

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests up to the deadline, flush the audit."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for w in list(self._watches):
            w.wake()
        if self.listener is not None:
            await self.listener.close(self.config.server.shutdown_timeout)
        if self.ops_runner is not None:
            await self.ops_runner.cleanup()
        await self.upstreams.close()
        if self.tokens is not None:
            await self.tokens.close()
        await self.store.close()
        if self.oidc is not None:
            await self.oidc.close()
        self.geo.close()
        self.mfa.close()
        await self.audit.close()

    async def _poll_tls(self) -> None:
        interval = self.config.tls.reload_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            self.tls.maybe_reload()

    async def _report_audit_depth(self) -> None:
        recovered = checkpoints = 0
        while True:
            await asyncio.sleep(1.0)
            stats = self.audit.stats
            self.metrics.audit_queue.set(stats.queued)
            self.metrics.audit_recovered.inc(stats.recovered - recovered)
            self.metrics.audit_checkpoints.inc(self.audit.checkpoints - checkpoints)
            recovered, checkpoints = stats.recovered, self.audit.checkpoints

    def _budget_fds(self, listener: Listener) -> None:
        """Raise RLIMIT_NOFILE for what the listener may hold; below it, refuse and count
        (resources.py) rather than let the event loop reset connections silently."""
        s = self.config.server
        upstream = sum(up.max_connections for up in _all_upstreams(self.config))
        wanted = s.max_connections + s.max_pending_handshakes + upstream + _OTHER_FDS
        limit = ensure_fd_limit(wanted)
        self.metrics.fd_limit.set(limit.soft)
        if limit.raised_from is not None:
            log.info(
                "raised the file-descriptor limit from %d to %d", limit.raised_from, limit.soft
            )
        listener.fd_budget = None
        if limit.soft < wanted:
            # Short: half of what is left for the upstream pools at most, the rest for clients.
            usable = max(2, limit.soft - _OTHER_FDS)
            listener.fd_budget = max(1, usable - min(upstream, usable // 2))
            log.warning(
                "file-descriptor limit %d (hard %d) is below the %d that max_connections (%d), "
                "max_pending_handshakes (%d) and the upstream pools need: at most %d client "
                "connections; more are refused and counted in "
                'ztgw_connections_rejected_total{reason="fd_limit"}. Raise LimitNOFILE / ulimit -n.',
                limit.soft, limit.hard, wanted, s.max_connections, s.max_pending_handshakes,
                listener.fd_budget,
            )  # fmt: skip
        self.metrics.handshakes_pending.set_function(lambda: len(listener.pending))

    async def _trim_memory(self, interval: float) -> None:
        """Return freed heap to the system now and then (resources.py: glibc keeps it)."""
        while True:
            await asyncio.sleep(interval)
            self.heap.trim()

    async def _expire_sessions(self) -> None:
        """Drop sessions past their absolute expiry from memory (and, a day later, the store).

        They are refused on their own already (the session stage checks `expires_at`); this
        keeps a long-running gateway's memory to the sessions that can still be used.
        """
        while True:
            await asyncio.sleep(self.session_sweep_interval)
            try:
                gone = await self.keeper.expire(self.clock.time(), self.runtime.config.routes)
            except StoreUnavailable:
                continue
            except Exception:  # the sweep must outlive a bad tick
                log.exception("session expiry sweep failed")
                continue
            if gone:
                log.info("expired %d sessions", gone)

    def reload(self) -> bool:
        """SIGHUP: new configuration and TLS material, or keep serving the old on any error.

        The listener's `[server]` limits apply to connections accepted from now on; settings
        only a restart applies are named (reloading.py) in `last_reload`, the log and a metric.
        """
        try:
            config = load_config(self.config.file)
            if (
                config.tls != self.config.tls
                or config.server.client_cert != self.config.server.client_cert
            ):
                self.tls.reconfigure(config.tls, config.server.client_cert)
            else:
                self.tls.maybe_reload(force=True)
            runtime = self._build_runtime(config)
            # A rotated mask or checkpoint key takes effect with the new configuration.
            mask_key, checkpoint_key = self._audit_keys(config, create=False)
        except Exception as exc:
            log.error("reload refused, still serving revision %s: %s", self.config.revision, exc)
            self.metrics.config_reloads.labels("failure").inc()
            self.metrics.config_reload_ok.set(0)
            self.last_reload = {"reloaded": False, "error": str(exc)}
            return False
        applied = listener_changes(self.config, config)
        pending = restart_required(self.started_config, config)
        self.config, self.runtime = config, runtime
        self.keeper.cfg = config.sessions
        if self.listener is not None:
            self.listener.apply_limits(**listener_limits(config.server))
            self._budget_fds(self.listener)
        self.mask_key = mask_key
        if checkpoint_key is None:
            self.audit.checkpoint_signer = None
        elif self.audit.checkpoint_signer is None or self.audit.checkpoint_signer.key_id != key_id(
            checkpoint_key.public_key()
        ):
            self.audit.checkpoint_signer = CheckpointSigner(checkpoint_key)
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_reload_ok.set(1)
        for name in RESTART_REQUIRED:
            self.metrics.config_restart_required.labels(name).set(1 if name in pending else 0)
        self._update_cert_metrics()
        for w in list(self._watches):
            w.wake()
        self.last_reload = {
            "reloaded": True,
            "revision": config.revision,
            "applied": applied,
            "restart_required": pending,
        }
        log.info(
            "configuration reloaded: revision %s%s",
            config.revision,
            f"; listener limits applied to new connections: {', '.join(applied)}"
            if applied
            else "",
        )
        if pending:
            log.warning(
                "configuration reloaded, but these settings changed since start-up and take "
                "effect only after a restart: %s",
                ", ".join(pending),
            )
        return True

    def _hsts(self) -> str | None:
        s = self.runtime.config.server
        return hsts_value(s.hsts_max_age, s.hsts_include_subdomains)

    # --- listener callbacks ------------------------------------------------------------------
    def _on_handshake(self, version: str | None, failure: str | None) -> None:
        if failure is None:
            self.metrics.handshakes.labels(version or "unknown").inc()
        else:
            self.metrics.handshake_failures.labels(failure).inc()

    def _on_protocol_error(
        self,
        conn: GatewayRequestHandler,
        request: web.BaseRequest,
        reason: Reason,
        decision_id: str,
        exc: BaseException | None,
    ) -> None:
        self.metrics.protocol_errors.labels(reason.value).inc()
        self.metrics.requests.labels("-", "deny", reason.value).inc()
        peer = conn.transport.get_extra_info("peername") if conn.transport else None
        event = {
            "decision_id": decision_id,
            "type": "ztgw.decision",
            "route": None,
            "input": {
                "client_ip": peer[0] if peer else None,
                "device": conn.cert.device_id if conn.cert else None,
                "protocol_error": type(exc).__name__ if exc else None,
            },
            "result": {
                "verdict": "deny",
                "reason": reason.value,
                "findings": [
                    {
                        "stage": "http",
                        "reason": reason.value,
                        "verdict": "deny",
                        "detail": type(exc).__name__ if exc else "",
                    }
                ],
            },
            "policy_revision": self.config.revision,
        }
        with suppress(AuditUnavailable):
            self.audit.record(event)

    # --- the request path --------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        conn = request.protocol
        assert isinstance(conn, GatewayRequestHandler)
        conn.request_started()
        token = decision_id_var.set(None)
        try:
            if request.version < HttpVersion11 and "Transfer-Encoding" in request.headers:
                # SECURITY: RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is faulty framing,
                # a classic request-smuggling shape; refuse and close, never forward.
                return conn.handle_error(
                    request, 400, BadHttpMessage("Transfer-Encoding in an HTTP/1.0 request")
                )
            response = await self._handle(request, conn)
            if self.audit.needs_sync and not response.prepared:
                refused = await self._audit_durable(request, response.headers.get(DECISION_HEADER))
                response = refused or response
        finally:
            conn.request_finished()
            decision_id_var.reset(token)
        if not response.prepared:
            # Answered by the gateway itself (a forwarded response has been streamed already).
            add_security_headers(response, self._hsts())
        if upgrade_requested(request.headers) and not isinstance(response, web.WebSocketResponse):
            # llhttp stops parsing after an Upgrade request; close so a pipelined request
            # behind it is retried by the client instead of hanging.
            response.force_close()
        return response

    async def _handle(
        self, request: web.BaseRequest, conn: GatewayRequestHandler
    ) -> web.StreamResponse:
        rt = self.runtime
        cfg = rt.config
        ctx = RequestContext.from_request(
            request,
            cert=conn.cert,
            peer_ip=conn.peer_ip or None,
            trusted_proxies=cfg.server.trusted_proxies,
            allow_encoded_slash=cfg.server.allow_encoded_slash,
            sni=conn.sni,
            clock=self.clock,
        )
        ctx.forwarded_proto = "https"
        decision_id_var.set(ctx.decision_id)
        accept = request.headers.get("Accept", "")
        misdirected = rt.server_names.refusal(ctx.host, ctx.sni)
        if misdirected is not None:
            # Every request on the listener, the gateway's own pages included: a foreign Host
            # would reach an upstream as X-Forwarded-Host (or build a portal link).
            decision = self.refusal_decision(ctx, Reason.HOST_MISDIRECTED, misdirected)
            with suppress(AuditUnavailable):
                self.record_decision(ctx, decision)
            return self._refusal(Reason.HOST_MISDIRECTED, ctx.decision_id, accept)
        if ctx.path is not None and ctx.path.startswith(INTERNAL_PREFIX):
            return await self._internal(request, ctx)
        if not self.store.healthy:
            # SECURITY: a revocation made elsewhere may not have reached us: refuse until the
            # store is back (and, for Redis, resynchronised) rather than trust a stale cache.
            self.metrics.store_errors.inc()
            decision = self.refusal_decision(
                ctx, Reason.SERVICE_UNAVAILABLE, "state store unavailable"
            )
            with suppress(AuditUnavailable):
                self.record_decision(ctx, decision)
            return self._refusal(
                Reason.SERVICE_UNAVAILABLE, ctx.decision_id, accept, extra={"Retry-After": "5"}
            )
        started = self.clock.monotonic()
        decision = await rt.pipeline.evaluate(ctx)
        self.metrics.decision_seconds.observe(self.clock.monotonic() - started)
        route = ctx.route
        route_label = route.name if route else "-"
        if route is not None:
            self.metrics.risk_score.labels(route_label).observe(ctx.risk_score)
        if ctx.session is not None and ctx.session.session is not None:
            self.metrics.anomaly_score.observe(ctx.session.anomaly)
        if decision.reason in (Reason.RISK_STEP_UP, Reason.RISK_DENIED) and route is not None:
            top = next(
                (
                    f.reason.value
                    for f in decision.findings
                    if f.stage == "risk" and f.verdict is None
                ),
                "none",
            )
            self.metrics.risk_refusals.labels(route_label, decision.verdict.label, top).inc()
        try:
            self.record_decision(ctx, decision)
            await self.keeper.after_decision(ctx, decision)
            if decision.allowed:
                remember(rt, ctx)
        except AuditUnavailable:
            # SECURITY: a decision we cannot record is not acted on (fail closed).
            self.metrics.audit_unavailable.inc()
            return self._refusal(
                Reason.SERVICE_UNAVAILABLE, ctx.decision_id, accept, extra={"Retry-After": "5"}
            )
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            return self._refusal(
                Reason.SERVICE_UNAVAILABLE, ctx.decision_id, accept, extra={"Retry-After": "5"}
            )
        if not decision.allowed or route is None:
            return self._render_refusal(ctx, decision, accept)
        response_headers: dict[str, str] = {}
        if self.audit.needs_sync:
            refused = await self._audit_durable(request, ctx.decision_id)
            if refused is not None:
                return refused
        headers = self._upstream_headers(ctx, request, decision)
        assert ctx.path is not None
        route_seconds = self.metrics.request_seconds.labels(route_label)
        head_seconds: list[float] = []
        observe_head = self.metrics.upstream_seconds.labels(route_label).observe

        def on_head(seconds: float) -> None:
            head_seconds.append(seconds)
            observe_head(seconds)

        # (outcome, upstream status, status answered, refusal reason): recorded once known.
        outcome: tuple[str, int | None, int, Reason | None] | None = None
        forwarding = self.clock.monotonic()
        try:
            if ctx.websocket:
                watch = Watch()
                self._watches.add(watch)
                try:
                    ws = await bridge_websocket(
                        request,
                        self.upstreams.session(route.upstream),
                        upstream_url(route, ctx.path, ctx.query),
                        headers,
                        recheck=lambda: self._recheck(request, conn),
                        interval=WS_RECHECK_INTERVAL,
                        watch=watch,
                    )
                    outcome = ("websocket", ws.status, ws.status, None)
                    return ws
                finally:
                    self._watches.discard(watch)
            response = await forward_http(
                request,
                route,
                self.upstreams.pool(route.upstream),
                upstream_target(route, ctx.path, ctx.query),
                headers,
                decision_id=ctx.decision_id,
                extra_headers=response_headers,
                on_upstream_head=on_head,
                clock=self.clock,
            )
            outcome = ("responded", response.status, response.status, None)
            return response
        except BodyTooLarge:
            self.metrics.requests.labels(route_label, "deny", Reason.BODY_TOO_LARGE.value).inc()
            resp = self._refusal(Reason.BODY_TOO_LARGE, ctx.decision_id, accept)
            resp.force_close()
            outcome = ("body-too-large", None, resp.status, Reason.BODY_TOO_LARGE)
            return resp
        except UpstreamFailure as fail:
            self.metrics.upstream_errors.labels(route_label, fail.kind).inc()
            log.warning("upstream %s %s: %s", route.upstream.name, fail.kind, fail.detail)
            outcome = (fail.kind, None, fail.reason.status, fail.reason)
            return self._refusal(fail.reason, ctx.decision_id, accept)
        except Exception as exc:
            # aiohttp's websocket client raises its own errors for refused upgrades.
            failure = classify(exc)
            self.metrics.upstream_errors.labels(route_label, failure.kind).inc()
            log.warning("upstream %s failed: %r", route.upstream.name, exc)
            outcome = (failure.kind, None, failure.reason.status, failure.reason)
            return self._refusal(failure.reason, ctx.decision_id, accept)
        finally:
            now = self.clock.monotonic()
            route_seconds.observe(now - ctx.started)
            if outcome is not None:
                self._record_upstream(
                    ctx, outcome, now - forwarding, head_seconds[0] if head_seconds else None
                )

    def _record_upstream(
        self,
        ctx: RequestContext,
        outcome: tuple[str, int | None, int, Reason | None],
        seconds: float,
        head_seconds: float | None,
    ) -> None:
        """The upstream's outcome, as an event linked to the decision (audit/events.py)."""
        kind, status, answered, reason = outcome
        if self.config.audit.upstream_events == "failures" and reason is None:
            return
        route = ctx.route
        assert route is not None
        ident, cert = ctx.identity, ctx.cert
        event = upstream_event(
            ctx.decision_id,
            route=route.name,
            upstream=route.upstream.name,
            outcome=kind,
            status=status,
            answered=answered,
            seconds=seconds,
            head_seconds=head_seconds,
            reason=reason.value if reason is not None else None,
            user=ident.user if ident else None,
            device=cert.device_id if cert else None,
            client_ip=ctx.client_ip,
        )
        try:
            self.audit.record(event)
        except AuditUnavailable:
            # Answered already; the decision itself is in the log. Counted, and /readyz says.
            self.metrics.audit_unavailable.inc()

    async def _audit_durable(
        self, request: web.BaseRequest, decision_id: str | None
    ) -> web.Response | None:
        """`durability = "fsync"`: this request's events on stable storage before it is
        answered or forwarded (one fdatasync shared by every request waiting now).

        None once synced; a refusal (503) when the sync failed (fail closed).
        """
        try:
            await self.audit.sync()
        except AuditUnavailable:
            self.metrics.audit_unavailable.inc()
            return self._refusal(
                Reason.SERVICE_UNAVAILABLE,
                decision_id or "-",
                request.headers.get("Accept", ""),
                extra={"Retry-After": "5"},
            )
        return None

    async def _recheck(self, request: web.BaseRequest, conn: GatewayRequestHandler) -> Decision:
        """Re-run the whole decision for an open WebSocket, on the current snapshot."""
        rt = self.runtime
        ctx = RequestContext.from_request(
            request,
            cert=conn.cert,
            peer_ip=conn.peer_ip or None,
            trusted_proxies=rt.config.server.trusted_proxies,
            allow_encoded_slash=rt.config.server.allow_encoded_slash,
            sni=conn.sni,
            clock=self.clock,
        )
        decision: Decision = await rt.pipeline.evaluate(ctx)
        if not decision.allowed:
            self.metrics.requests.labels(
                ctx.route.name if ctx.route else "-", decision.verdict.label, decision.reason.value
            ).inc()
            with suppress(AuditUnavailable):
                event = self.audit_event(ctx, decision, request)
                event["input"]["websocket_recheck"] = True
                self.audit.record(event)
        return decision

    def record_decision(self, ctx: RequestContext, decision: Decision) -> None:
        """Count and audit one decision; raises AuditUnavailable (the caller fails closed)."""
        route_label = ctx.route.name if ctx.route else "-"
        if not self.audit.healthy:
            # SECURITY: the audit writer is failing (disk full, read-only database): refuse
            # rather than act on decisions nobody will be able to account for.
            raise AuditUnavailable("audit log is failing")
        self.metrics.requests.labels(
            route_label, decision.verdict.label, decision.reason.value
        ).inc()
        if decision.monitor:
            self.metrics.would_deny.labels(route_label, decision.reason.value).inc()
        elif not decision.allowed:
            stage = next(
                (f.stage for f in decision.findings if f.reason is decision.reason and f.verdict),
                "request",
            )
            self.metrics.refusals.labels(route_label, stage, decision.reason.value).inc()
        self.audit.record(self.audit_event(ctx, decision, None))

    def record_outcome(
        self, ctx: RequestContext, stage: str, verdict: Verdict, reason: Reason, detail: str = ""
    ) -> None:
        """Audit and count a decision taken outside the pipeline (the gateway's own endpoints).

        Raises AuditUnavailable, counted, so a caller that must fail closed can.
        """
        finding = Finding(stage, reason, verdict, detail=detail)
        try:
            self.record_decision(ctx, Decision(ctx.decision_id, verdict, reason, (finding,)))
        except AuditUnavailable:
            self.metrics.audit_unavailable.inc()
            raise

    async def ensure_device(self, ctx: RequestContext) -> None:
        """Register the presented certificate's device if this is its first contact."""
        cert = ctx.cert
        if cert is None or self.store.device(cert.device_id) is not None:
            return
        await self.store.register_device(
            new_device(cert, ctx.now, ctx.client_ip, approved=self.config.devices.auto_approve)
        )

    def refusal_decision(self, ctx: RequestContext, reason: Reason, detail: str) -> Decision:
        """A refusal decided outside the pipeline, with its one finding."""
        finding = Finding("request", reason, Verdict.DENY, detail=detail)
        ctx.findings.append(finding)
        return Decision(ctx.decision_id, Verdict.DENY, reason, (finding,))

    def _upstream_headers(
        self, ctx: RequestContext, request: web.BaseRequest, decision: Decision
    ) -> Any:
        route = ctx.route
        assert route is not None
        return upstream_request_headers(
            ctx.headers,
            self.identity_headers(ctx, request.host, decision),
            forward_authorization=route.forward_authorization,
            websocket=ctx.websocket,
            drop_cookies=(self.config.sessions.cookie_name,),
            identity_names=identity_header_names(route.headers),
        )

    def identity_headers(
        self, ctx: RequestContext, original_host: str, decision: Decision
    ) -> dict[str, str]:
        """The headers the upstream may trust: forwarding facts, identity, signed assertion."""
        add: dict[str, str] = {
            "X-Forwarded-For": ctx.client_ip,
            "X-Forwarded-Proto": ctx.forwarded_proto,
            "X-Forwarded-Host": original_host,
        }
        add.update(self.asserted_identity(ctx, decision))
        return add

    def asserted_identity(self, ctx: RequestContext, decision: Decision) -> dict[str, str]:
        """Identity headers and the signed assertion (also what forward-auth answers).

        A request a monitor-mode route let through says so in its assertion; identities that
        failed their own checks never get this far (pipeline._NEVER_MONITORED)."""
        route = ctx.route
        assert route is not None
        h = route.headers
        ident = ctx.identity
        add: dict[str, str] = {DECISION_HEADER: ctx.decision_id}
        if ident is not None:
            if ident.user:
                add[h.user] = ident.user
            if ident.email:
                add[h.email] = ident.email
            if ident.groups:
                add[h.groups] = list_header_value(ident.groups)
            if ident.device_id:
                add[h.device] = ident.device_id
            add[h.assertion] = self.signer.sign(
                audience=route.name,
                user=ident.user,
                email=ident.email,
                groups=ident.groups,
                device_id=ident.device_id,
                source=ident.source,
                now=ctx.now,
                would=decision.would_verdict.label
                if decision.monitor and decision.would_verdict
                else None,
            )
        return add

    def _render_refusal(self, ctx: RequestContext, decision: Decision, accept: str) -> web.Response:
        """Refusal, step-up challenge or redirect, rate-limit hint, stale-cookie clean-up."""
        route = ctx.route
        reason, verdict = decision.reason, decision.verdict
        route_label = route.name if route else "-"
        detail = None
        if route is not None and route.expose_detail:
            detail = next((f.detail for f in decision.findings if f.reason is reason), None)
        extra: dict[str, str] = {}
        if ctx.retry_after:
            extra["Retry-After"] = str(max(1, math.ceil(ctx.retry_after)))
        if verdict is Verdict.TERMINATE:
            self.metrics.terminations.labels(route_label, reason.value).inc()
        browser = ctx.wants_html
        if browser and self.oidc is not None and reason in _SIGN_IN_AGAIN:
            # A person without a (valid) sign-in: send them to sign in, then back here.
            stale = ctx.session is not None and ctx.session.cookie_invalid
            cookies = (clear_cookie_header(self.config.sessions.cookie_name),) if stale else ()
            return see_other(portal.login_redirect(ctx), ctx.decision_id, *cookies)
        if browser and reason in (Reason.DEVICE_NONCOMPLIANT, Reason.POSTURE_STALE):
            # The remediation page says exactly what to fix on this device.
            return see_other("/.ztgw/device", ctx.decision_id)
        if verdict is Verdict.STEP_UP:
            self.metrics.step_ups.labels("issued").inc()
            if ctx.wants_html and self.mfa.available:
                target = (ctx.path or "/") + ("?" + ctx.query if ctx.query else "")
                return see_other("/.ztgw/mfa?rd=" + quote(target, safe="/"), ctx.decision_id)
        continue_to = None
        if (
            reason is Reason.ORIGIN_DENIED
            and ctx.path is not None
            and ctx.method in ("GET", "HEAD")
            and ctx.fetch.navigation
        ):
            # A link from another site: the person confirms with a click on our own page,
            # which the browser then sends as a same-origin navigation (docs/security.md).
            continue_to = encode_path(ctx.path) + ("?" + ctx.query if ctx.query else "")
        resp = self._refusal(
            reason,
            ctx.decision_id,
            accept,
            verdict=verdict,
            detail=detail,
            extra=extra,
            continue_to=continue_to,
        )
        if verdict is Verdict.STEP_UP:
            # RFC 9470 §3: the step-up challenge, with max_age when the route bounds MFA age.
            challenge = (
                'Bearer realm="ztgateway", error="insufficient_user_authentication", '
                f'error_description="{reason.value}: complete TOTP at /.ztgw/mfa/verify"'
            )
            if ctx.mfa_max_age:
                challenge += f", max_age={int(ctx.mfa_max_age)}"
            resp.headers["WWW-Authenticate"] = challenge
        view = ctx.session
        if view is not None and view.cookie_invalid:
            resp.headers["Set-Cookie"] = clear_cookie_header(self.config.sessions.cookie_name)
        return resp

    def _refusal(
        self,
        reason: Reason,
        decision_id: str,
        accept: str,
        *,
        verdict: Verdict = Verdict.DENY,
        detail: str | None = None,
        extra: dict[str, str] | None = None,
        continue_to: str | None = None,
    ) -> web.Response:
        resp = problem(
            reason,
            decision_id,
            verdict=verdict,
            accept=accept,
            detail=detail,
            extra_headers=extra,
            continue_to=continue_to,
        )
        resp.headers["Server"] = SERVER_BANNER
        return resp

    def audit_event(
        self, ctx: RequestContext, decision: Decision, request: web.BaseRequest | None
    ) -> dict[str, Any]:
        headers, masked = mask_headers(ctx.headers.items(), key=self.mask_key)
        query, masked_q = mask_query(ctx.query, key=self.mask_key)
        ident = ctx.identity
        cert = ctx.cert
        return {
            "decision_id": ctx.decision_id,
            "type": "ztgw.decision",
            "route": ctx.route.name if ctx.route else None,
            "input": {
                "method": ctx.method,
                "host": ctx.host,
                "path": ctx.path,
                "raw_path": ctx.raw_path if ctx.path != ctx.raw_path else None,
                "query": query,
                "client_ip": ctx.client_ip,
                "peer_ip": ctx.peer_ip,
                "user": ident.user if ident else None,
                "device": cert.device_id if cert else None,
                # The stored session's id (a hash, never the cookie or token): what `sessions
                # show` lists and `audit search --session` finds.
                "session": ctx.session.session_id if ctx.session else None,
                "cert": cert.to_json() if cert else None,
                "headers": headers,
                "websocket": ctx.websocket,
            },
            "identity": ident.to_json() if ident else None,
            "result": {
                "verdict": decision.verdict.label,
                "reason": decision.reason.value,
                "findings": [f.to_json() for f in decision.findings],
                "monitor": decision.monitor,
                "would_verdict": decision.would_verdict.label if decision.would_verdict else None,
            },
            "masked": sorted(masked + masked_q),
            "policy_revision": self.config.revision,
        }

    async def _internal(self, request: web.BaseRequest, ctx: RequestContext) -> web.StreamResponse:
        """Gateway endpoints under /.ztgw/ (served to any client that passed the handshake)."""
        try:
            return await self._endpoint(request, ctx)
        except StoreUnavailable:
            # Fail closed, and say so: not a stage error.
            self.metrics.store_errors.inc()
            decision = self.refusal_decision(ctx, Reason.SERVICE_UNAVAILABLE, "state store")
            with suppress(AuditUnavailable):
                self.record_decision(ctx, decision)
            return self._refusal(
                Reason.SERVICE_UNAVAILABLE,
                ctx.decision_id,
                request.headers.get("Accept", ""),
                extra={"Retry-After": "5"},
            )

    async def _endpoint(self, request: web.BaseRequest, ctx: RequestContext) -> web.StreamResponse:
        if ctx.path == "/.ztgw/jwks.json" and ctx.method in ("GET", "HEAD"):
            resp = web.json_response(self.signer.jwks, headers={"Cache-Control": "max-age=300"})
            resp.headers["Server"] = SERVER_BANNER
            return resp
        if ctx.path == "/.ztgw/posture" and ctx.method == "POST":
            return await endpoints.posture_report(self, request, ctx)
        if ctx.path == "/.ztgw/device" and ctx.method in ("GET", "HEAD"):
            return await endpoints.device_status(self, request, ctx)
        if ctx.path == "/.ztgw/mfa/verify" and ctx.method == "POST":
            return await mfa_endpoints.verify_api(self, request, ctx)
        if ctx.path == "/.ztgw/mfa" and ctx.method in ("GET", "POST"):
            return await mfa_endpoints.step_up_page(self, request, ctx)
        if ctx.path == "/.ztgw/mfa/enroll" and ctx.method in ("GET", "POST"):
            return await mfa_endpoints.enroll_page(self, request, ctx)
        page_handler = _PORTAL_PAGES.get((ctx.path or "", ctx.method))
        if page_handler is not None:
            return await page_handler(self, request, ctx)
        decision = self.refusal_decision(ctx, Reason.ROUTE_NOT_FOUND, ctx.path or "")
        with suppress(AuditUnavailable):
            self.record_decision(ctx, decision)
        return self._refusal(
            Reason.ROUTE_NOT_FOUND, ctx.decision_id, request.headers.get("Accept", "")
        )

    # --- ops helpers ----------------------------------------------------------------------------
    async def readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        checks["audit"] = {"ok": self.audit.healthy}
        m = self.tls.current
        now = self.clock.time()
        checks["certificates"] = {
            "ok": m.server_not_after > now,
            "server_not_after": m.server_not_after,
            "crl_next_update": m.revocations.next_update,
        }
        ups: dict[str, Any] = {}
        for up in _all_upstreams(self.config):
            ups[up.name] = await _reachable(up.url.host or "", up.url.port or 80)
        checks["upstreams"] = {"ok": all(ups.values()), "reachable": ups}
        checks["geoip"] = {
            "ok": True,
            "configured": self.config.risk.geoip_db is not None,
            "available": self.geo.available,
            "error": self.geo.error,
        }
        checks["store"] = {"ok": self.store.healthy}
        if self.tokens is not None:
            checks["issuers"] = {"ok": True, "status": self.tokens.jwks_status()}
        return checks


async def _reachable(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()
    return True


def _all_upstreams(config: GatewayConfig) -> list[Any]:
    seen: dict[str, Any] = {}
    for r in config.routes:
        seen.setdefault(r.upstream.name, r.upstream)
    return list(seen.values())


def tune_gc() -> None:
    """Collect cycles less often on the request path (issue 9's profile showed gc at ~3%).

    Everything built at start-up (config, compiled routes, the store's in-memory state, the
    modules) is moved out of the collector's sight with `gc.freeze()`, so full collections no
    longer rescan it; the young generation is collected every 20,000 allocations instead of 700.
    Requests create few reference cycles, so the larger young generation stays small.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


async def serve(
    config: GatewayConfig,
    *,
    worker: int | None = None,
    ops_socket: Path | None = None,
    lifeline: int | None = None,
    log_limit: RateLimit | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or, for a worker, until its supervisor is gone); SIGHUP
    reloads."""
    gw = Gateway(config, worker=worker, ops_socket=ops_socket)
    gw.heap.limit_arenas()
    await gw.start()
    tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gw.reload)
    if lifeline is not None:
        watch_lifeline(lifeline, stop.set)
    summaries: asyncio.Task[None] | None = None
    if log_limit is not None:
        log_limit.on_suppressed = gw.metrics.log_lines_suppressed.inc
        summaries = asyncio.ensure_future(_log_summaries(log_limit))
    print(f"ztgateway listening on https://{config.server.host}:{gw.port}", flush=True)
    if gw.ops_port:
        print(f"ops listener on http://{config.ops.host}:{gw.ops_port}", flush=True)
    await stop.wait()
    log.info(
        "shutting down: finishing in-flight requests (up to %ss)", config.server.shutdown_timeout
    )
    await gw.stop()
    if summaries is not None and log_limit is not None:
        summaries.cancel()
        log_limit.summaries(final=True)


async def _log_summaries(limit: RateLimit) -> None:
    while True:
        await asyncio.sleep(limit.window)
        limit.summaries()


__all__ = ["Gateway", "TokenError", "serve"]
