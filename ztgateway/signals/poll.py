"""Poll-based SET delivery (RFC 8936): the gateway asks the transmitter for its events.

Every `poll_interval` one process of all the workers and replicas polls (a lease per interval,
claimed in the shared store, so N workers do not poll N times); a missed lease is taken by
whichever process comes next. A poll acknowledges what the previous one received (`ack`),
reports the SETs it refused (`setErrs`, with RFC 8935's error codes, RFC 8936 §2.4) and asks for
more at once while the transmitter says `moreAvailable`. A SET that could not be processed for a
fault on our side (keys or store unavailable) is neither acknowledged nor refused: the
transmitter delivers it again. A SET already received (by another process, or a redelivery)
is acknowledged: it was acted on once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from ..audit import AuditUnavailable
from ..context import RequestContext
from ..store.base import StoreUnavailable
from .tokens import KEYS_UNAVAILABLE

if TYPE_CHECKING:
    from .receiver import SignalReceiver, Transmitter

log = logging.getLogger("ztgateway.signals.poll")
MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
MAX_ROUNDS: Final = 20
"""Polls in one interval while the transmitter has more (a bound, not a target)."""


class PollError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Poller:
    def __init__(self, receiver: SignalReceiver, transmitter: Transmitter) -> None:
        self.receiver = receiver
        self.transmitter = transmitter
        self.cfg = transmitter.cfg
        self._ssl: ssl.SSLContext | None = None
        self.acks: list[str] = []
        self.errors: dict[str, dict[str, str]] = {}
        self.polls = 0

    async def run(self) -> None:
        cfg = self.cfg
        if cfg.poll_ca is not None:
            self._ssl = await asyncio.to_thread(ssl.create_default_context, cafile=str(cfg.poll_ca))
        while True:
            try:
                if await self._lease():
                    await self.cycle()
            except StoreUnavailable as exc:
                log.warning("ssf %s: poll skipped, store unavailable: %s", cfg.name, exc)
            except Exception:  # the poller must outlive one bad round
                log.exception("ssf %s: poll round failed", cfg.name)
            await asyncio.sleep(cfg.poll_interval)

    async def _lease(self) -> bool:
        clock = self.receiver.clock
        now = clock.time()
        slot = int(now // self.cfg.poll_interval)
        return await self.receiver.store.claim_once(
            f"sigpoll:{self.cfg.name}:{slot}", self.cfg.poll_interval * 2, now
        )

    async def cycle(self) -> None:
        """Poll until the transmitter has no more, then send what is left to acknowledge."""
        metrics = self.receiver.metrics
        for _ in range(MAX_ROUNDS):
            try:
                body = await self._post(self.cfg.poll_max_events)
            except PollError as exc:
                metrics.poll_failures.labels(self.cfg.name, exc.reason).inc()
                log.warning("ssf %s: poll failed: %s", self.cfg.name, exc)
                return
            # These were delivered in the request that just succeeded.
            self.acks, self.errors = [], {}
            metrics.last_delivery.labels(self.cfg.name).set(self.receiver.clock.time())
            await self._process(body["sets"])
            if not body["more"]:
                break
        if self.acks or self.errors:
            try:
                await self._post(0)  # RFC 8936 §2.4: acknowledge only
                self.acks, self.errors = [], {}
            except PollError as exc:
                metrics.poll_failures.labels(self.cfg.name, exc.reason).inc()

    async def _process(self, sets: dict[str, str]) -> None:
        receiver = self.receiver
        for jti, token in sets.items():
            ctx = RequestContext.synthetic(
                method="POLL", path="/.ztgw/ssf/poll", client_ip="", clock=receiver.clock
            )
            try:
                receipt = await receiver.receive(
                    token, ctx, via="poll", transmitter=self.transmitter
                )
            except (AuditUnavailable, StoreUnavailable) as exc:
                log.warning("ssf %s: SET %s left for redelivery: %s", self.cfg.name, jti, exc)
                continue
            if receipt.result == KEYS_UNAVAILABLE:
                continue
            if receipt.jti is not None and receipt.jti != jti:
                self.errors[jti] = {
                    "err": "invalid_request",
                    "description": "the SET's jti is not the member name it was delivered under",
                }
            elif receipt.ok or receipt.result == "replayed":
                self.acks.append(jti)
            else:
                self.errors[jti] = {"err": receipt.result, "description": receipt.description[:200]}

    async def _post(self, max_events: int) -> dict[str, Any]:
        cfg = self.cfg
        assert cfg.poll_url is not None
        request: dict[str, Any] = {"maxEvents": max_events, "returnImmediately": True}
        if self.acks:
            request["ack"] = self.acks
        if self.errors:
            request["setErrs"] = self.errors
        headers = {"Accept": "application/json"}
        if cfg.poll_token is not None:
            headers["Authorization"] = f"Bearer {cfg.poll_token}"
        self.polls += 1
        try:
            async with self.receiver.http.post(
                cfg.poll_url,
                json=request,
                headers=headers,
                ssl=self._ssl if self._ssl is not None else True,
                timeout=aiohttp.ClientTimeout(total=cfg.poll_timeout),
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    raise PollError("status", f"HTTP {resp.status}")
                raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PollError("unreachable", f"{type(exc).__name__}: {exc}") from exc
        if len(raw) > MAX_RESPONSE_BYTES:
            raise PollError("invalid_response", f"more than {MAX_RESPONSE_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise PollError("invalid_response", "not JSON") from exc
        sets = doc.get("sets") if isinstance(doc, dict) else None
        if not isinstance(sets, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in sets.items()
        ):
            raise PollError("invalid_response", "'sets' is not an object of jti -> SET")
        return {"sets": sets, "more": doc.get("moreAvailable") is True}
