"""The gateway process: wiring and lifecycle (start-up / shut-down in order, reload).

`Gateway` owns every long-lived service (TLS material, token verifier, upstream pools, audit
log, metrics) and the current `Runtime` snapshot. A request reads `self.runtime` once; a reload
builds a complete new snapshot and swaps the reference. What happens to a request is in
`edge/request_path.py`; how it is decided and recorded, in `decisions.py`.

Why one module of about seven hundred and fifty lines: start-up, reload and shut-down are one
ordering of the same services (each started after what it needs, stopped before it, and swapped
whole on a reload), and that order is read best in one place. The request path, the decision
path, the listeners and the endpoints are their own modules.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from contextlib import suppress
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import __version__
from .audit import AuditLog, MaskKey
from .audit.checkpoint import CheckpointSigner
from .audit.keys import key_id, load_checkpoint_signing, load_mask_key, placement_warnings
from .clock import SYSTEM_CLOCK, Clock
from .config import GatewayConfig, load_config
from .config.reloading import RESTART_REQUIRED, listener_changes, restart_required
from .context import RequestContext
from .credentials.jwt import TokenError, TokenVerifier
from .credentials.mfa import MFA
from .credentials.oidc import OIDCClient, StorePendingLogins
from .credentials.providers import SignInProviders
from .credentials.webauthn import WebAuthn
from .decision import Decision, Finding, Reason, Verdict
from .decisions import DecisionPath, Recorder, audit_event, refusal
from .edge.http1 import Limits
from .edge.listener import Listener
from .edge.request_path import RequestPath
from .edge.tls import CertInfo
from .edge.tlsmaterial import TLSManager
from .forward.assertion import AssertionSigner, load_or_create_key
from .forward.http import Upstreams
from .forward.identity import asserted_identity
from .forward.websocket import Watch
from .keys import GatewayKeys
from .logs import RateLimit
from .metrics import Metrics
from .ops.app import create_ops_app
from .pipeline import Pipeline, default_stages
from .portal.forms import CSRFTokens
from .process import sdnotify
from .process.lifeline import watch_lifeline
from .process.resources import Heap, ensure_fd_limit
from .revocation.service import RevocationService, cert_key
from .risk.geo import GeoLocator
from .routes import RouteTable
from .runtime import Runtime
from .sessions import SessionKeeper
from .signals.backchannel import BackchannelLogout
from .signals.compliance import PREFIX as TRANSMITTER_VERDICT
from .signals.receiver import SignalReceiver
from .stages.device import new_device
from .store import store_from_url
from .store.base import ChangeKind, StoreUnavailable

log = logging.getLogger("ztgateway")
_OTHER_FDS = 64
"""File descriptors kept for everything but connections: logs, the store, the audit files,
the ops listener, TLS material reads."""


def protocol_limits(cfg: GatewayConfig) -> Limits:
    """What the data plane's HTTP protocol enforces, from `[server]` and the routes."""
    s = cfg.server
    hosts: set[str] = set(s.hosts)
    if not hosts:
        hosts |= {"localhost", "127.0.0.1", "[::1]"}
        if s.host not in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard names no host
            hosts.add(f"[{s.host}]" if ":" in s.host else s.host)
        if s.public_url:
            from yarl import URL

            public = URL(s.public_url).raw_host
            if public:
                hosts.add(f"[{public}]" if ":" in public else public.lower())
        for route in cfg.routes:
            hosts |= route.hosts
    return Limits(
        header_timeout=s.header_timeout,
        body_timeout=s.body_timeout,
        idle_timeout=s.idle_timeout,
        send_timeout=s.send_timeout,
        max_header_bytes=s.max_header_bytes,
        max_headers=s.max_headers,
        max_target_bytes=s.max_target_bytes,
        hosts=frozenset(h.lower() for h in hosts),
        # CONNECT would ask us to tunnel; TRACE reflects the request, credentials included.
        refuse_methods=frozenset({"CONNECT"} if s.allow_trace else {"TRACE", "CONNECT"}),
    )


def listener_settings(cfg: GatewayConfig) -> dict[str, Any]:
    """What the listener takes from `[server]`, at start-up and on every reload (issue 19 D4):
    its own budgets and the protocol's limits for connections accepted from then on."""
    s = cfg.server
    return {
        "limits": protocol_limits(cfg),
        "handshake_timeout": s.handshake_timeout,
        "max_connections": s.max_connections,
        "max_pending_handshakes": s.max_pending_handshakes,
        "max_pending_handshakes_per_source": s.max_pending_handshakes_per_source,
    }


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
        self.revocation = RevocationService(
            config.revocation, tls=self.tls, store=self.store, metrics=self.metrics, clock=clock
        )
        self.revocation.on_revoked = self._end_revoked
        self.revocation.open_certs = self._open_certs
        # Keyed at start() from the one root key every worker and replica shares (keys.py):
        # the CSRF tokens, the sign-in's login cookie and, unless a key file is configured,
        # the assertion signature (issue 18, I3).
        self.csrf: CSRFTokens
        self.webauthn: WebAuthn
        self.signer: AssertionSigner
        # Every configured identity provider (built at start, keyed like the CSRF tokens);
        # `oidc` is the first of them, for code that knows of one provider only.
        self.providers = SignInProviders((), OIDCClient)
        self.oidc: OIDCClient | None = None
        self.oidc_name = config.oidc.provider.name if config.oidc.provider is not None else "-"
        self.runtime, self.pipeline = self._build_snapshot(config)
        self.listener: Listener | None = None
        self.ops_runner: web.AppRunner | None = None
        self.ops_port: int | None = None
        self.port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.watches: set[Watch] = set()
        """Open WebSockets: woken to re-verify at once on a revocation or a reload."""
        self.recorder = Recorder(
            metrics=self.metrics,
            audit=self.audit,
            keeper=self.keeper,
            revision=lambda: self.config.revision,
            mask_key=lambda: self.mask_key,
        )
        self.decisions = DecisionPath(self.recorder)
        # Signals from the identity provider: SSF events and back-channel logout (signals/).
        self.signals = SignalReceiver(
            config.signals,
            store=self.store,
            recorder=self.recorder,
            clock=clock,
            providers=config.oidc.providers,
        )
        self.backchannel = BackchannelLogout(self.signals, lambda: self.providers, config.oidc)
        self.request_path = RequestPath(self, self.decisions)
        self._dry: tuple[Runtime, tuple[Runtime, Pipeline]] | None = None
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
    def _build_snapshot(self, config: GatewayConfig) -> tuple[Runtime, Pipeline]:
        """A configuration snapshot and the stages built from it: assigned together, always
        (`self.runtime, self.pipeline = ...`), and read together by a request."""
        rt = Runtime(
            config=config,
            routes=RouteTable(config.routes),
            metrics=self.metrics,
            revocations=lambda: self.tls.current.revocations,
            revocation=self.revocation,
            tokens=self.tokens,
            store=self.store,
            geo=self.geo,
            clock=self.clock,
        )
        pipeline = Pipeline(default_stages(rt), on_stage_error=self._on_stage_error)
        self.metrics.prepare_routes(
            [r.name for r in config.routes], [s.name for s in pipeline.stages]
        )
        return rt, pipeline

    def _on_store_change(self, kind: ChangeKind, key: str) -> None:
        # A device or session changed (perhaps revoked, from the CLI or another process):
        # open WebSockets re-verify now instead of at their next interval.
        if kind in (ChangeKind.DEVICE, ChangeKind.SESSION, ChangeKind.USER) or (
            kind is ChangeKind.POSTURE and key.startswith(TRANSMITTER_VERDICT)
        ):
            # (An agent's posture report re-judges at the next interval; a transmitter's
            # compliance verdict, signals/compliance.py, at once.)
            for w in list(self.watches):
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

    def dry_snapshot(self) -> tuple[Runtime, Pipeline]:
        """The current snapshot and its stages, judging without side effects (for /decide)."""
        rt = self.runtime
        cached = self._dry
        if cached is not None and cached[0] is rt:
            return cached[1]
        dry = Runtime(
            config=rt.config,
            routes=rt.routes,
            metrics=Metrics(),
            revocations=rt.revocations,
            revocation=rt.revocation,
            tokens=rt.tokens,
            store=rt.store,
            dry_run=True,
            geo=rt.geo,
            clock=rt.clock,
        )
        pair = (dry, Pipeline(default_stages(dry)))
        self._dry = (rt, pair)
        return pair

    def _on_stage_error(self, stage: str) -> None:
        self.metrics.stage_errors.labels(stage).inc()

    def _on_tls_reload(self, ok: bool, error: str) -> None:
        self.metrics.tls_reloads.labels("success" if ok else "failure").inc()
        self._update_cert_metrics()
        if ok:
            self.revocation.update_cas()
            # Open WebSockets re-verify at once: a revoked certificate closes them now.
            for w in list(self.watches):
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
        await self.revocation.start()
        await self.providers.start()
        await self.signals.start()
        if cfg.issuers:
            self.tokens = TokenVerifier(
                cfg.issuers,
                session_factory=None,
                on_result=self._on_token_result,
                clock=self.clock.time,
            )
            await self.tokens.start()
            self.metrics.watch_issuers(self.tokens.jwks_status)
            self.runtime, self.pipeline = self._build_snapshot(cfg)
        s = cfg.server
        self.listener = Listener(
            handler=self.request_path,
            context=lambda: self.tls.current.context,
            **listener_settings(cfg),
            clock=self.clock.time,
            on_handshake=self._on_handshake,
            on_connection_change=self.metrics.connections_open.set,
            on_rejected=lambda r: self.metrics.connections_rejected.labels(r).inc(),
        )
        self._budget_fds(self.listener)
        self.port = await self.listener.start(s.host, s.port, reuse_port=self.worker is not None)
        if cfg.ops.enabled:
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
        self._tasks.append(asyncio.ensure_future(self.revocation.run()))
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
        self.webauthn = WebAuthn(lambda: self.config.webauthn, self.store, keys.webauthn_user)
        self.providers = SignInProviders.build(
            cfg.oidc.providers,
            clock=self.clock.time,
            secret=keys.oidc_login,
            pending=StorePendingLogins(self.store),
        )
        self.oidc = self.providers.first
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
        for w in list(self.watches):
            w.wake()
        if self.listener is not None:
            await self.listener.close(self.config.server.shutdown_timeout)
        if self.ops_runner is not None:
            await self.ops_runner.cleanup()
        await self.upstreams.close()
        await self.signals.close()
        await self.backchannel.close()
        await self.revocation.close()
        if self.tokens is not None:
            await self.tokens.close()
        await self.store.close()
        await self.providers.close()
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
        (process/resources.py) rather than let the event loop reset connections silently."""
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
        """Return freed heap to the system now and then (process/resources.py: glibc keeps it)."""
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
            runtime, pipeline = self._build_snapshot(config)
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
        self.config, self.runtime, self.pipeline = config, runtime, pipeline
        self.keeper.cfg = config.sessions
        self.revocation.reconfigure(config.revocation)
        if self.listener is not None:
            self.listener.apply_limits(**listener_settings(config))
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
        for w in list(self.watches):
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

    # --- revocation ----------------------------------------------------------------------------
    def _open_certs(self) -> list[CertInfo]:
        if self.listener is None:
            return []
        return [c.cert for c in self.listener.connections if c.cert is not None]

    def _end_revoked(self, keys: set[str]) -> None:
        """Certificates just found revoked (here, by another replica, OCSP or a CRL): their
        keep-alive connections close (a request in progress is answered with Connection:
        close) and every open WebSocket re-decides now, which closes theirs with 1008."""
        if self.listener is not None:
            for conn in list(self.listener.connections):
                cert = conn.cert
                if cert is None or cert_key(cert.issuer, cert.serial) not in keys:
                    continue
                kind = "websocket" if conn.takeover is not None else "connection"
                self.metrics.revocations_enforced.labels(kind).inc()
                log.warning(
                    "certificate serial %x (%s) revoked: ending its %s from %s",
                    cert.serial, cert.subject, kind, conn.peer_ip,
                )  # fmt: skip
                if conn.takeover is None:
                    conn.shutdown()
        for w in list(self.watches):
            w.wake()

    # --- listener callbacks ------------------------------------------------------------------
    def _on_handshake(self, version: str | None, failure: str | None) -> None:
        if failure is None:
            self.metrics.handshakes.labels(version or "unknown").inc()
        else:
            self.metrics.handshake_failures.labels(failure).inc()

    # --- the request path --------------------------------------------------------------------
    # --- what the gateway's own endpoints use ------------------------------------------------
    def record_decision(self, ctx: RequestContext, decision: Decision) -> None:
        """Count and audit a decision taken outside the pipeline; raises AuditUnavailable."""
        self.recorder.record(ctx, decision)

    def record_outcome(
        self, ctx: RequestContext, stage: str, verdict: Verdict, reason: Reason, detail: str = ""
    ) -> None:
        """Audit and count an outcome of the gateway's own endpoints (raises AuditUnavailable)."""
        finding = Finding(stage, reason, verdict, detail=detail)
        self.record_decision(ctx, Decision(ctx.decision_id, verdict, reason, (finding,)))

    def refusal_decision(self, ctx: RequestContext, reason: Reason, detail: str) -> Decision:
        """A refusal decided outside the pipeline, with its one finding."""
        return refusal(ctx, reason, detail)

    def asserted_identity(self, ctx: RequestContext, decision: Decision) -> dict[str, str]:
        return asserted_identity(self.signer, ctx, decision)

    def audit_event(
        self, ctx: RequestContext, decision: Decision, request: object = None
    ) -> dict[str, Any]:
        return audit_event(ctx, decision, self.config.revision, mask_key=self.mask_key)

    async def ensure_device(self, ctx: RequestContext) -> None:
        """Register the presented certificate's device if this is its first contact."""
        cert = ctx.cert
        if cert is None or self.store.device(cert.device_id) is not None:
            return
        await self.store.register_device(
            new_device(cert, ctx.now, ctx.client_ip, approved=self.config.devices.auto_approve)
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
        checks["revocation"] = self.revocation.status()
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
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload_and_tell(gw))
    if lifeline is not None:
        watch_lifeline(lifeline, stop.set)
    summaries: asyncio.Task[None] | None = None
    if log_limit is not None:
        log_limit.on_suppressed = gw.metrics.log_lines_suppressed.inc
        summaries = asyncio.ensure_future(_log_summaries(log_limit))
    print(f"ztgateway listening on https://{config.server.host}:{gw.port}", flush=True)
    if gw.ops_port:
        print(f"ops listener on http://{config.ops.host}:{gw.ops_port}", flush=True)
    sdnotify.ready(_serving(gw), worker=worker)
    await stop.wait()
    log.info(
        "shutting down: finishing in-flight requests (up to %ss)", config.server.shutdown_timeout
    )
    sdnotify.stopping()
    await gw.stop()
    if summaries is not None and log_limit is not None:
        summaries.cancel()
        log_limit.summaries(final=True)


def _serving(gw: Gateway) -> str:
    return f"serving https://{gw.config.server.host}:{gw.port} (revision {gw.config.revision})"


def _reload_and_tell(gw: Gateway) -> None:
    """SIGHUP with the service manager told: RELOADING=1, then READY=1 once the new revision
    serves, or once the old one is known to go on serving (a refused reload keeps it)."""
    sdnotify.reloading(gw.clock)
    ok = gw.reload()
    status = _serving(gw) if ok else f"reload refused; {_serving(gw)}"
    sdnotify.ready(status, worker=gw.worker)


async def _log_summaries(limit: RateLimit) -> None:
    while True:
        await asyncio.sleep(limit.window)
        limit.summaries()


__all__ = ["Gateway", "TokenError", "serve"]
