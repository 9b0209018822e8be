"""Prometheus metrics, one registry per gateway (no module globals: two gateways can share a
process in tests). Label values come only from closed sets: route names from the configuration,
verdicts and reasons from their enums, handshake failure reasons from a fixed mapping.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_DECISION_BUCKETS = (
    0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
)  # fmt: skip


HANDSHAKE_FAILURE_REASONS = (
    "no_certificate",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "revoked",
    "bad_purpose",
    "crl_unavailable",
    "crl_expired",
    "verify_failed",
    "protocol_version",
    "no_shared_cipher",
    "plain_http",
    "not_tls",
    "client_alert",
    "tls_error",
    "timeout",
    "connection_lost",
    "unparseable_certificate",
    "other",
)
CRL_RESULTS = ("success", "unavailable", "invalid", "stale")
OCSP_RESULTS = (
    "good", "revoked", "unknown", "unavailable", "invalid", "signer", "stale", "nonce",
    "no_responder",
)  # fmt: skip
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "tls")
WEBAUTHN_RESULTS = (
    "success",
    "webauthn-invalid",
    "webauthn-origin-mismatch",
    "webauthn-challenge-invalid",
    "webauthn-credential-unknown",
    "webauthn-cloned",
    "webauthn-uv-required",
    "webauthn-credential-refused",
)
"""ztgw_webauthn_ceremonies' results: success, or the refusal's reason (decision.Reason)."""
CONNECTION_REFUSAL_REASONS = (
    "max_connections",
    "pending_handshakes",
    "pending_per_source",
    "fd_limit",
)


def _cache_children(metric: MetricWrapperBase) -> None:
    """Put a plain dict in front of `labels()`, which validates and takes a lock every call.

    The request path asks the same few children several times per request (issue 9's profile
    had `labels` among the top frames). Series are never removed here, so the cache is exact;
    it is only used for positional label values, which is all this code base passes.
    """
    children: dict[tuple[str, ...], Any] = {}
    original = metric.labels

    def labels(*values: str) -> Any:
        child = children.get(values)
        if child is None:
            child = children[values] = original(*values)
            if isinstance(child, Histogram):
                _bisect_observe(child)
        return child

    setattr(metric, "labels", labels)  # noqa: B010 - an instance override, on purpose


def _bisect_observe(histogram: Histogram) -> None:
    """`observe()` by binary search over the bucket bounds, not a Python loop over all of them.

    Four histograms are observed per proxied request; the library walks up to 16 bounds per
    observation. Same buckets, same sum, same locks (the values' own `inc`), so the exposition
    is unchanged; exemplars, which this code never passes, are not supported.
    """
    bounds = list(histogram._upper_bounds)
    buckets = histogram._buckets
    inc_sum = histogram._sum.inc

    def observe(amount: float, exemplar: dict[str, str] | None = None) -> None:
        inc_sum(amount)
        # The first bound >= amount (`le` is inclusive); +Inf is the last bound.
        buckets[bisect_left(bounds, amount)].inc(1)

    setattr(histogram, "observe", observe)  # noqa: B010 - an instance override, on purpose


class _WithoutCreated:
    """The registry as scrapers should see it: without the `_created` sample prometheus_client
    adds to every counter and histogram series (a third of the output, which Prometheus
    ignores in the text format). Filtered per registry, not with the library's process-wide
    switch, so nothing outside this gateway changes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class Metrics:
    def __init__(self) -> None:
        from . import __version__

        r = self.registry = CollectorRegistry(auto_describe=True)
        # The process behind the numbers: CPU, memory, file descriptors, start time
        # (process_*), the interpreter (python_info) and its garbage collector (python_gc_*).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        if GC_COLLECTOR is not None:
            GCCollector(registry=r)
        self.build_info = Gauge(
            "ztgw_build_info",
            "Always 1; the labels say which ztgateway and Python this process runs.",
            ["version", "python_version"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.requests = Counter(
            "ztgw_requests",
            "Requests decided, by route, verdict and reason.",
            ["route", "verdict", "reason"],
            registry=r,
        )
        self.would_deny = Counter(
            "ztgw_monitor_would_deny",
            "Requests a route in monitor mode forwarded although policy would refuse them.",
            ["route", "reason"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "ztgw_request_duration_seconds",
            "Time from request head to the end of the response, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decision_seconds = Histogram(
            "ztgw_decision_duration_seconds",
            "Time spent in the decision pipeline.",
            buckets=_DECISION_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "ztgw_upstream_duration_seconds",
            "Time until the upstream's response head, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "ztgw_upstream_errors",
            "Upstream failures by route and kind (connect, timeout, reset, tls).",
            ["route", "kind"],
            registry=r,
        )
        self.handshakes = Counter(
            "ztgw_tls_handshakes", "Completed TLS handshakes.", ["tls_version"], registry=r
        )
        self.handshake_failures = Counter(
            "ztgw_tls_handshake_failures",
            "Refused or failed TLS handshakes, by reason.",
            ["reason"],
            registry=r,
        )
        self.connections_open = Gauge(
            "ztgw_connections_open", "Open client connections.", registry=r
        )
        self.connections_rejected = Counter(
            "ztgw_connections_rejected",
            "Connections refused by the listener's budgets (established, pending handshakes, "
            "per source, file descriptors), by reason.",
            ["reason"],
            registry=r,
        )
        self.handshakes_pending = Gauge(
            "ztgw_handshakes_pending", "Connections whose TLS handshake is running.", registry=r
        )
        self.fd_limit = Gauge(
            "ztgw_fd_limit",
            "The process's file-descriptor soft limit (RLIMIT_NOFILE) after start-up raised it.",
            registry=r,
        )
        self.config_restart_required = Gauge(
            "ztgw_config_restart_required",
            "1 for each setting the configuration file changed since start-up that only a "
            "restart applies (ztgateway reload names them too).",
            ["setting"],
            registry=r,
        )
        self.audit_recovered = Counter(
            "ztgw_audit_recovered_events",
            "Audit events moved into the log from the journal of a process that died.",
            registry=r,
        )
        self.audit_checkpoints = Counter(
            "ztgw_audit_checkpoints",
            "Signed checkpoints this process appended to the audit chain.",
            registry=r,
        )
        self.log_lines_suppressed = Counter(
            "ztgw_log_lines_suppressed",
            "Repeated log lines held back by the rate limit (each summary says how many).",
            registry=r,
        )
        self.protocol_errors = Counter(
            "ztgw_http_protocol_errors",
            "Requests refused by the HTTP parser (malformed, smuggling-shaped, oversized).",
            ["reason"],
            registry=r,
        )
        self.slow_clients = Counter(
            "ztgw_header_timeouts",
            "Connections closed because the request head did not arrive in time (slowloris).",
            registry=r,
        )
        self.connection_timeouts = Counter(
            "ztgw_connection_timeouts",
            "Connections the HTTP protocol cut by a timer: header (slowloris), body (a slow "
            "upload), idle keep-alive, slow_reader (a full output buffer not read in time).",
            ["timer"],
            registry=r,
        )
        self.spoofed_headers = Counter(
            "ztgw_spoofed_headers",
            "Inbound identity or forwarding headers stripped from requests.",
            registry=r,
        )
        self.stage_errors = Counter(
            "ztgw_stage_errors", "Stages that raised; each became a DENY.", ["stage"], registry=r
        )
        self.cert_expiry = Gauge(
            "ztgw_certificate_expiry_timestamp_seconds",
            "Expiry of the gateway's certificates (server, client CA).",
            ["cert"],
            registry=r,
        )
        self.crl_next_update = Gauge(
            "ztgw_crl_next_update_timestamp_seconds",
            "When the client CA's CRL must be replaced.",
            registry=r,
        )
        self.tls_reloads = Counter(
            "ztgw_tls_reloads", "TLS material reloads by result.", ["result"], registry=r
        )
        # Live revocation (revocation/): label values from CRL_RESULTS / OCSP_RESULTS.
        self.crl_fetches = Counter(
            "ztgw_crl_fetches", "CRL fetches by result.", ["result"], registry=r
        )
        self.crl_stale = Gauge(
            "ztgw_crl_stale",
            "CRL sources without a CRL inside its validity: their certificates are refused.",
            registry=r,
        )
        self.ocsp_checks = Counter(
            "ztgw_ocsp_checks",
            "OCSP answers by result (cache hits not counted).",
            ["result"],
            registry=r,
        )
        self.ocsp_soft_failures = Counter(
            "ztgw_ocsp_soft_failures",
            "Requests let through on soft-fail routes while OCSP could not tell.",
            registry=r,
        )
        self.revocations_enforced = Counter(
            "ztgw_revocations_enforced",
            "Open connections and WebSockets ended because their certificate was revoked.",
            ["kind"],
            registry=r,
        )
        for result in CRL_RESULTS:
            self.crl_fetches.labels(result)
        for result in OCSP_RESULTS:
            self.ocsp_checks.labels(result)
        for kind in ("connection", "websocket"):
            self.revocations_enforced.labels(kind)
        self.audit_queue = Gauge(
            "ztgw_audit_queue_depth", "Audit events waiting to be written.", registry=r
        )
        self.audit_failures = Counter(
            "ztgw_audit_write_failures", "Failed audit batch writes.", registry=r
        )
        self.audit_unavailable = Counter(
            "ztgw_audit_unavailable",
            "Requests refused with 503 because the audit log could not accept them.",
            registry=r,
        )
        self.token_validations = Counter(
            "ztgw_token_validations",
            "Bearer token validations by issuer and result.",
            ["issuer", "result"],
            registry=r,
        )
        self.posture_reports = Counter(
            "ztgw_posture_reports",
            "Posture reports received, by result (compliant, noncompliant, refused).",
            ["result"],
            registry=r,
        )
        self.posture_failed_checks = Counter(
            "ztgw_posture_failed_checks",
            "Failed posture checks in accepted reports, by check.",
            ["check"],
            registry=r,
        )
        self.risk_score = Histogram(
            "ztgw_risk_score",
            "Risk score of decided requests, by route.",
            ["route"],
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
            registry=r,
        )
        self.risk_refusals = Counter(
            "ztgw_risk_refusals",
            "Step-ups and denials by risk, by the largest contributing signal.",
            ["route", "verdict", "signal"],
            registry=r,
        )
        self.step_ups = Counter(
            "ztgw_step_ups",
            "TOTP step-ups: issued (challenges), passed, failed.",
            ["result"],
            registry=r,
        )
        self.terminations = Counter(
            "ztgw_session_terminations",
            "Sessions terminated by the gateway, by route and reason.",
            ["route", "reason"],
            registry=r,
        )
        self.anomaly_score = Histogram(
            "ztgw_session_anomaly_score",
            "Session anomaly score after each request.",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
            registry=r,
        )
        self.mfa_enrollments = Counter(
            "ztgw_mfa_enrollments", "TOTP enrolments confirmed with a code.", registry=r
        )
        self.webauthn_ceremonies = Counter(
            "ztgw_webauthn_ceremonies",
            "WebAuthn ceremonies (register, authenticate) by result: success or the refusal's "
            "reason (webauthn-cloned, webauthn-origin-mismatch, ...).",
            ["ceremony", "result"],
            registry=r,
        )
        self.mfa_backup_checks = Counter(
            "ztgw_mfa_backup_checks",
            "Backup-code checks run (scrypt over the user's codes); attempts over the limit "
            "are refused before one runs.",
            ["result"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "ztgw_store_duration_seconds",
            "Durable state-store writes (device, posture, user, session), by operation.",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.store_write_errors = Counter(
            "ztgw_store_write_errors",
            "Failed durable state-store writes, by operation.",
            ["operation"],
            registry=r,
        )
        self.store_errors = Counter(
            "ztgw_store_errors",
            "Requests refused with 503 because the state store failed.",
            registry=r,
        )
        self.admin_calls = Counter(
            "ztgw_admin_calls", "Admin API calls by result (ok, refused).", ["result"], registry=r
        )
        self.logins = Counter(
            "ztgw_logins",
            "Browser sign-ins by provider and result (success or the failure reason).",
            ["provider", "result"],
            registry=r,
        )
        self.provider_refusals = Counter(
            "ztgw_provider_refusals",
            "Browser sessions refused on a route that does not accept the identity provider "
            "that signed them in, by route and provider.",
            ["route", "provider"],
            registry=r,
        )
        self.portal_views = Counter(
            "ztgw_portal_views",
            "Portal page views by page and outcome.",
            ["page", "outcome"],
            registry=r,
        )
        self.config_reloads = Counter(
            "ztgw_config_reloads", "Configuration reloads by result.", ["result"], registry=r
        )
        self.config_reload_ok = Gauge(
            "ztgw_config_last_reload_successful",
            "1 if the last configuration reload succeeded (or none was tried), else 0.",
            registry=r,
        )
        self.config_reload_ok.set(1)
        self.refusals = Counter(
            "ztgw_refusals",
            "Refused requests (deny, step-up, terminate) by route, deciding stage and reason.",
            ["route", "stage", "reason"],
            registry=r,
        )
        # Closed label sets start at zero, so increase() sees their first event (Prometheus
        # cannot tell a new series' first increment from its birth).
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
            self.tls_reloads.labels(result)
        for result in ("ok", "refused"):
            self.admin_calls.labels(result)
        for result in ("issued", "passed", "failed"):
            self.step_ups.labels(result)
        for ceremony in ("register", "authenticate"):
            for result in WEBAUTHN_RESULTS:
                self.webauthn_ceremonies.labels(ceremony, result)
        for reason in HANDSHAKE_FAILURE_REASONS:
            self.handshake_failures.labels(reason)
        for reason in CONNECTION_REFUSAL_REASONS:
            self.connections_rejected.labels(reason)
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:
                _cache_children(metric)
            elif isinstance(metric, Histogram):
                _bisect_observe(metric)

    def posture_accepted(self, compliant: bool, failed: Iterable[str]) -> None:
        """An accepted posture report (the device's agent or a management system's)."""
        self.posture_reports.labels("compliant" if compliant else "noncompliant").inc()
        for name in failed:
            self.posture_failed_checks.labels(name).inc()

    def prepare_routes(self, routes: list[str], stages: list[str]) -> None:
        """Create each route's and stage's series at zero (see the comment in __init__)."""
        for stage in stages:
            self.stage_errors.labels(stage)
        for route in routes:
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(route, kind)

    def watch_devices(self, states: Callable[[], list[str]]) -> None:
        """Devices by state, counted at scrape time from the store's memory."""
        self.registry.register(_DeviceCollector(states))

    def watch_sessions(self, active: Callable[[], dict[str, int]]) -> None:
        """Active sessions by kind (cookie, token), counted at scrape time."""
        self.registry.register(_SessionCollector(active))

    def watch_issuers(self, status: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Expose the JWKS caches' own counters at scrape time (no per-request cost)."""
        self.registry.register(_JwksCollector(status))

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


class _JwksCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        fetches = CounterMetricFamily(
            "ztgw_jwks_fetches", "JWKS fetch attempts by issuer.", labels=["issuer"]
        )
        failures = CounterMetricFamily(
            "ztgw_jwks_fetch_failures", "Failed JWKS fetches by issuer.", labels=["issuer"]
        )
        keys = GaugeMetricFamily(
            "ztgw_jwks_keys", "Usable keys held per issuer.", labels=["issuer"]
        )
        stale = GaugeMetricFamily(
            "ztgw_jwks_stale",
            "1 while an issuer's keys are too old to use (its tokens are refused).",
            labels=["issuer"],
        )
        for issuer, st in self._status().items():
            fetches.add_metric([issuer], float(st.get("fetches", 0)))
            failures.add_metric([issuer], float(st.get("fetch_failures", 0)))
            keys.add_metric([issuer], float(st.get("keys", 0)))
            stale.add_metric([issuer], 1.0 if st.get("stale") else 0.0)
        yield from (fetches, failures, keys, stale)


class _DeviceCollector(Collector):
    def __init__(self, states: Callable[[], list[str]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily("ztgw_devices", "Registered devices by state.", labels=["state"])
        counts = {"pending": 0, "approved": 0, "revoked": 0}
        for state in self._states():
            counts[state] = counts.get(state, 0) + 1
        for state, n in sorted(counts.items()):
            family.add_metric([state], float(n))
        yield family


class _SessionCollector(Collector):
    def __init__(self, active: Callable[[], dict[str, int]]) -> None:
        self._active = active

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(
            "ztgw_sessions_active", "Live sessions by kind.", labels=["kind"]
        )
        counts = {"cookie": 0, "token": 0, **self._active()}
        for kind, n in sorted(counts.items()):
            family.add_metric([kind], float(n))
        yield family
