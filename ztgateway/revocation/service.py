"""The revocation service: one answer to "may this client certificate still be used?".

Asked by the identity stage for every request (so a keep-alive connection, a resumed TLS session
and the WebSocket relay's re-checks all get the newest answer), and ticked by the gateway every
`check_interval` to refresh CRLs before their nextUpdate, read revocations other replicas found,
and re-check the certificates of open connections whose OCSP answer ran out. A certificate found
revoked by either path is

- remembered in the store (`revoke_certificate`), so every replica and worker refuses it within
  one `check_interval` without asking anyone;
- ended where it is open: keep-alive connections are closed (a request in progress finishes with
  `Connection: close`) and WebSockets are woken to re-decide, which closes them with 1008.

What a refusal looks like: revoked → 403 `client-cert-revoked`; OCSP `unknown` → 403
`client-cert-status-unknown`; no usable answer (CRL stale or missing, responder down, a bad,
stale, wrongly signed or replayed answer) → 503 `client-cert-status-unavailable`. The route's
`ocsp = "soft-fail"` lets the last two through, counted (`ztgw_ocsp_soft_failures_total`) and
audited as an informational finding. A stale CRL is never soft: RFC 5280 §6.3.3.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509

from ..clock import Clock
from ..decision import Finding, Reason, Verdict
from ..edge.inline import in_task
from ..edge.tls import CertInfo, issued_by
from ..edge.tlsmaterial import TLSManager
from ..metrics import Metrics
from ..store.base import Store, StoreUnavailable
from .config import OCSPFailure, RevocationConfig
from .crl import CRLSet, distribution_points
from .ocsp import (
    OCSP_REQUEST_TYPE,
    OCSP_RESPONSE_TYPE,
    OCSPAnswer,
    OCSPError,
    OCSPStatus,
    build_request,
    responder_urls,
    verify_response,
)

log = logging.getLogger("ztgateway.revocation")
STAGE = "identity"
_ERROR_RETRY = 5.0
"""Seconds an OCSP failure is remembered before the responder is asked again (no storm of
requests at a responder that is down; a soft-fail route keeps answering meanwhile)."""


@functools.lru_cache(maxsize=8192)
def cert_key(issuer: str, serial: int) -> str:
    """The shared name of one certificate: its issuer (hashed, it is long) and serial.
    Cached: every request of a connection asks for the same one."""
    return f"{hashlib.sha256(issuer.encode()).hexdigest()[:16]}:{serial:x}"


@dataclass(frozen=True, slots=True)
class _Cached:
    answer: OCSPAnswer | None
    error: OCSPError | None
    expires: float


@dataclass(frozen=True, slots=True)
class _Parsed:
    cert: x509.Certificate
    issuer: x509.Certificate | None
    crl_urls: tuple[str, ...]
    ocsp_urls: tuple[str, ...]


def load_cas(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


class RevocationService:
    def __init__(
        self,
        cfg: RevocationConfig,
        *,
        tls: TLSManager,
        store: Store,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.cfg = cfg
        self._configured = cfg.enabled
        self.tls = tls
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.cas = load_cas(tls.cfg.client_ca)
        self.crls = CRLSet(cfg, self.cas, self._get, on_result=self._crl_result)
        self.revoked: dict[str, float] = {}
        """Known revoked certificates (this process or shared): key -> until."""
        self._ocsp: OrderedDict[str, _Cached] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[_Cached]] = {}
        self._parsed: OrderedDict[bytes, _Parsed] = OrderedDict()
        self._first_fetch: dict[str, asyncio.Future[bool]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.on_revoked: Callable[[set[str]], None] = lambda keys: None
        """Set by the gateway: end the open connections and WebSockets of these certificates."""
        self.open_certs: Callable[[], Iterable[CertInfo]] = lambda: ()

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.fetch_timeout),
            # CRL and OCSP over HTTP are signed objects; no cookies, no proxies from the env.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        await self.tick()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def reconfigure(self, cfg: RevocationConfig) -> None:
        """A reload's `[revocation]`: new URLs are fetched at the next tick, removed ones
        forgotten; the OCSP settings apply to the next answer."""
        if cfg == self.cfg:
            return
        learned = {u for u in self.crls.sources if u not in self.cfg.crl_urls}
        keep = set(cfg.crl_urls) | (learned if cfg.crl_distribution_points else set())
        for url in list(self.crls.sources):
            if url not in keep:
                del self.crls.sources[url]
        self.cfg = self.crls.cfg = cfg
        self._configured = cfg.enabled
        for url in cfg.crl_urls:
            self.crls.add(url)
        self._ocsp.clear()
        self._crls_changed(self.clock.time())

    def status(self) -> dict[str, object]:
        """For /readyz: not ready while a CRL source holds no valid CRL (its CA's
        certificates are refused here; another replica may still hold a fresh one)."""
        now = self.clock.time()
        stale = {s.url for s in self.crls.stale_sources(now)}
        return {
            "ok": not stale,
            "crl_sources": {
                s.url: {
                    "next_update": s.crl.next_update if s.crl else None,
                    "stale": s.url in stale,
                    "error": s.last_error,
                }
                for s in self.crls.sources.values()
            },
            "ocsp": self.cfg.ocsp,
            "ocsp_cached": len(self._ocsp),
            "known_revoked": len(self.revoked),
        }

    def update_cas(self) -> None:
        """The client CA bundle was reloaded."""
        self.cas = load_cas(self.tls.cfg.client_ca)
        self.crls.cas = self.cas
        self._parsed.clear()

    # --- HTTP --------------------------------------------------------------------------------
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise OSError("revocation service not started")
        return self._session

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}")
        limit = self.cfg.max_response_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise OSError(f"response larger than {limit} bytes")
        data = await resp.content.read(limit + 1)
        if len(data) > limit:
            raise OSError(f"response larger than {limit} bytes")
        return data

    async def _get(self, url: str) -> bytes:
        await in_task()  # aiohttp's timers need one; the data plane steps requests inline
        try:
            async with self._client().get(url, allow_redirects=False) as resp:
                return await self._read(resp)
        except aiohttp.ClientError as exc:
            raise OSError(str(exc) or type(exc).__name__) from exc

    async def _post(self, url: str, body: bytes) -> bytes:
        headers = {"Content-Type": OCSP_REQUEST_TYPE, "Accept": OCSP_RESPONSE_TYPE}
        await in_task()  # aiohttp's timers need one; the data plane steps requests inline
        try:
            async with self._client().post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                return await self._read(resp)
        except aiohttp.ClientError as exc:
            raise OSError(str(exc) or type(exc).__name__) from exc

    # --- the check -----------------------------------------------------------------------------
    def _parse(self, cert: CertInfo) -> _Parsed:
        parsed = self._parsed.get(cert.der)
        if parsed is None:
            c = x509.load_der_x509_certificate(cert.der)
            issuer = next((ca for ca in self.cas if issued_by(c, ca)), None)
            parsed = _Parsed(c, issuer, distribution_points(c), responder_urls(c))
            self._parsed[cert.der] = parsed
            if len(self._parsed) > 4096:
                self._parsed.popitem(last=False)
        return parsed

    @property
    def active(self) -> bool:
        """Whether a request must be checked at all: something is configured or known
        revoked (the identity stage skips the call otherwise: the data plane's hot path)."""
        return self._configured or bool(self.revoked)

    async def check(self, cert: CertInfo, mode: OCSPFailure | None, now: float) -> Finding | None:
        """None when the certificate may be used; otherwise the finding that says why not (or,
        on a soft-fail route, an informational finding the audit event carries)."""
        key = cert_key(cert.issuer, cert.serial)
        if key in self.revoked:
            return _revoked(cert, "revoked (shared)")
        cfg = self.cfg
        if cfg.crl_urls or cfg.crl_distribution_points:
            finding = await self._check_crls(cert, key, now)
            if finding is not None:
                return finding
        if not cfg.ocsp:
            return None
        # The cache hit is the common case: no await, no parsing (a few dict operations).
        cached = self._ocsp.get(key)
        if cached is None or cached.expires <= now:
            cached = await self._query_once(cert, self._parse(cert), key, now)
        else:
            self._ocsp.move_to_end(key)
        return self._ocsp_finding(cert, cached, mode or "hard-fail")

    async def _check_crls(self, cert: CertInfo, key: str, now: float) -> Finding | None:
        cdp = self._parse(cert).crl_urls if self.cfg.crl_distribution_points else ()
        for url in cdp:
            pending = self._first_fetch.get(url)
            if pending is None and url not in self.crls.sources:
                # First certificate naming this distribution point: fetch before deciding;
                # requests arriving meanwhile wait for the same fetch.
                pending = asyncio.ensure_future(self.crls.refresh(self.crls.add(url), now))
                self._first_fetch[url] = pending
                pending.add_done_callback(functools.partial(self._fetched, url))
            if pending is not None and await asyncio.shield(pending):
                self._crls_changed(now)
        relevant = [
            s
            for s in self.crls.sources.values()
            if s.url in cdp
            or (s.crl is not None and s.crl.issuer == cert.issuer)
            or (s.crl is None and s.url in self.cfg.crl_urls)
        ]
        for source in relevant:
            if source.crl is None or source.crl.stale(now):
                return Finding(
                    STAGE,
                    Reason.CLIENT_CERT_STATUS_UNAVAILABLE,
                    Verdict.DENY,
                    detail=f"no valid CRL from {source.url}: {source.last_error or 'stale'}",
                )
            if source.crl.issuer == cert.issuer and cert.serial in source.crl.revoked:
                await self._remember({key: cert.not_after}, now)
                return _revoked(cert, f"listed in the CRL from {source.url}")
        if self.cfg.crl_urls and not any(
            s.crl is not None and s.crl.issuer == cert.issuer for s in relevant
        ):
            return Finding(
                STAGE,
                Reason.CLIENT_CERT_STATUS_UNAVAILABLE,
                Verdict.DENY,
                detail=f"no configured CRL covers issuer {cert.issuer}",
            )
        return None

    def _fetched(self, url: str, _: asyncio.Future[bool]) -> None:
        self._first_fetch.pop(url, None)

    def _ocsp_finding(self, cert: CertInfo, cached: _Cached, mode: OCSPFailure) -> Finding | None:
        answer = cached.answer
        if answer is not None and answer.status is OCSPStatus.REVOKED:
            return _revoked(cert, "OCSP: revoked")
        if answer is not None and answer.status is OCSPStatus.GOOD:
            return None
        if answer is not None:
            reason, detail = Reason.CLIENT_CERT_STATUS_UNKNOWN, "OCSP: unknown to the responder"
        else:
            reason, detail = Reason.CLIENT_CERT_STATUS_UNAVAILABLE, f"OCSP: {cached.error}"
        if mode == "soft-fail":
            self.metrics.ocsp_soft_failures.inc()
            return Finding(STAGE, reason, None, detail=f"soft-fail: {detail}")
        return Finding(STAGE, reason, Verdict.DENY, detail=detail)

    async def _query_once(self, cert: CertInfo, parsed: _Parsed, key: str, now: float) -> _Cached:
        """One request per certificate at a time: concurrent requests share its answer."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_Cached] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            cached = await self._query(cert, parsed, key, now)
            future.set_result(cached)
            return cached
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[key]

    async def _query(self, cert: CertInfo, parsed: _Parsed, key: str, now: float) -> _Cached:
        urls = (self.cfg.ocsp_responder,) if self.cfg.ocsp_responder else parsed.ocsp_urls
        try:
            if not urls:
                raise OCSPError("no_responder", "no responder configured or named by the cert")
            if parsed.issuer is None:
                raise OCSPError("invalid", "issuer is not a client CA")
            nonce = os.urandom(16) if self.cfg.ocsp_nonce else None
            request = build_request(parsed.cert, parsed.issuer, nonce)
            try:
                der = await self._post(urls[0], request)
            except (OSError, TimeoutError) as exc:
                raise OCSPError("unavailable", f"{urls[0]}: {exc}") from exc
            try:
                answer = verify_response(
                    der,
                    parsed.cert,
                    parsed.issuer,
                    nonce=nonce,
                    require_nonce=self.cfg.ocsp_require_nonce,
                    now=self.clock.time(),
                    skew=self.cfg.clock_skew,
                    max_age=self.cfg.ocsp_max_age,
                )
            except (ValueError, TypeError) as exc:
                # Malformed in a way the parser only noticed late: not an answer either.
                raise OCSPError("invalid", f"unusable answer: {exc}") from exc
        except OCSPError as exc:
            self.metrics.ocsp_checks.labels(exc.result).inc()
            log.warning("OCSP check of serial %x failed (%s): %s", cert.serial, exc.result, exc)
            cached = _Cached(None, exc, now + min(_ERROR_RETRY, self.cfg.check_interval or 1.0))
            self._store_cached(key, cached)
            return cached
        self.metrics.ocsp_checks.labels(answer.status.value).inc()
        # Cached no longer than the answer is valid (RFC 6960 §4.2.2.1) nor than the cert.
        until = answer.next_update or (answer.this_update + self.cfg.ocsp_max_age)
        cached = _Cached(answer, None, min(until, cert.not_after))
        self._store_cached(key, cached)
        if answer.status is OCSPStatus.REVOKED:
            await self._remember({key: cert.not_after}, now)
        return cached

    def _store_cached(self, key: str, cached: _Cached) -> None:
        self._ocsp[key] = cached
        self._ocsp.move_to_end(key)
        while len(self._ocsp) > self.cfg.ocsp_cache_size:
            self._ocsp.popitem(last=False)

    # --- revocations: remember, share, enforce --------------------------------------------------
    async def _remember(self, found: dict[str, float], now: float) -> None:
        new = {k: u for k, u in found.items() if k not in self.revoked and u > now}
        if not new:
            return
        self.revoked.update(new)
        log.warning("client certificates found revoked: %s", ", ".join(sorted(new)))
        for k, until in new.items():
            try:
                await self.store.revoke_certificate(k, until, now)
            except StoreUnavailable as exc:
                # Still enforced here; other replicas learn it from their own CRL/OCSP checks.
                log.error("could not share the revocation of %s: %s", k, exc)
        self.on_revoked(set(new))

    def _crls_changed(self, now: float) -> None:
        self.tls.set_extra_crls(b"".join(crl.pem() for crl in self.crls.crls()))
        self._update_metrics(now)

    def _update_metrics(self, now: float) -> None:
        self.metrics.crl_stale.set(len(self.crls.stale_sources(now)))
        next_updates = [crl.next_update for crl in self.crls.crls()]
        file_next = self.tls.current.revocations.next_update
        if file_next is not None:
            next_updates.append(file_next)
        if next_updates:
            self.metrics.crl_next_update.set(min(next_updates))

    def _crl_result(self, result: str) -> None:
        self.metrics.crl_fetches.labels(result).inc()

    async def tick(self) -> None:
        """Refresh what is due, adopt shared revocations, re-check open connections."""
        now = self.clock.time()
        if await self.crls.refresh_due(now):
            self._crls_changed(now)
        self._update_metrics(now)
        found: dict[str, float] = {}
        try:
            shared = await self.store.revoked_certificates(now)
        except StoreUnavailable as exc:
            log.warning("could not read shared certificate revocations: %s", exc)
            shared = {}
        self.revoked = {k: u for k, u in self.revoked.items() if u > now}
        new_shared = {k: u for k, u in shared.items() if k not in self.revoked}
        if new_shared:
            self.revoked.update(new_shared)
            self.on_revoked(set(new_shared))
        seen: set[str] = set()
        file_crl = self.tls.current.revocations  # [tls] crl, reloaded when the file changes
        for cert in list(self.open_certs()):
            key = cert_key(cert.issuer, cert.serial)
            if key in seen or key in self.revoked:
                continue
            seen.add(key)
            if file_crl.is_revoked(cert.serial) and file_crl.issuer in ("", cert.issuer):
                found[key] = cert.not_after
            for crl in self.crls.crls():
                if crl.issuer == cert.issuer and cert.serial in crl.revoked:
                    found[key] = cert.not_after
            if self.cfg.ocsp and key not in found:
                cached = self._ocsp.get(key)
                if cached is not None and cached.expires > now:
                    continue
                parsed = self._parse(cert)
                cached = await self._query_once(cert, parsed, key, now)
                if cached.answer is not None and cached.answer.status is OCSPStatus.REVOKED:
                    found[key] = cert.not_after
        await self._remember(found, now)

    async def run(self) -> None:
        interval = self.cfg.check_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except Exception:  # the loop must outlive a bad tick
                log.exception("revocation tick failed")


def _revoked(cert: CertInfo, detail: str) -> Finding:
    return Finding(
        STAGE, Reason.CLIENT_CERT_REVOKED, Verdict.DENY, detail=f"serial {cert.serial:x} {detail}"
    )
