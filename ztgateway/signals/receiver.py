"""The Shared Signals receiver: one path from a Security Event Token to its effect.

Whether a SET was pushed (RFC 8935, endpoints.py) or polled (RFC 8936, poll.py), it goes through
`SignalReceiver.receive()`, in this order:

1. the transmitter, chosen by the token's `iss` (or the one polled), verifies it: its JWKS, its
   algorithms, `typ` secevent+jwt, `aud` = this receiver, `iat` within `max_event_age`
   (tokens.py); the events and their subjects are parsed (events.py, subjects.py);
2. the audit log must be able to take the event (fail closed: nothing is acted on that could
   not be accounted for);
3. the `jti` is claimed in the store, so a SET is acted on once by one process of all the
   workers and replicas, and a replay within `max_event_age` is refused;
4. the events act (actions.py), and the outcome is audited (`ztgw.signal` events, with the
   sessions ended, users asked to step up, devices updated) and counted (metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from ..audit import AuditUnavailable
from ..clock import Clock
from ..context import RequestContext
from ..credentials.jwks import JwksCache
from ..credentials.oidc import OIDCProviderConfig
from ..decision import Decision, Finding, Reason, Verdict
from ..decisions import Recorder, audit_event
from ..store.base import Store
from .actions import Effect, Enforcer
from .config import TransmitterConfig
from .events import COMPLIANCE_STATES, LOCKING, Action, classify, step_up_applies
from .metrics import UNKNOWN, SignalMetrics
from .subjects import Matcher, Subject, SubjectError, devices, parse_subject
from .tokens import (
    INVALID_ISSUER,
    INVALID_REQUEST,
    SET_TYPE,
    SignalTokenError,
    SignedTokenVerifier,
    TokenRules,
    numeric_date,
    peek_issuer,
)

if TYPE_CHECKING:
    from .poll import Poller

log = logging.getLogger("ztgateway.signals")
SIGNAL_TYPE: Final = "ztgw.signal"
STAGE: Final = "signals"
MAX_EVENTS: Final = 10
"""Events per SET (SSF 1.0 §4.1 sends exactly one; a few are tolerated, never thousands)."""
ACCEPTED: Final = "accepted"
REPLAYED: Final = "replayed"


@dataclass(frozen=True, slots=True)
class Receipt:
    """What became of one token: `result` is `accepted`, `replayed` or an RFC 8935 code."""

    result: str
    description: str
    decision_id: str
    jti: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == ACCEPTED


@dataclass(frozen=True, slots=True)
class ParsedEvent:
    uri: str
    label: str
    action: Action
    payload: dict[str, Any]
    subject: Subject | None
    at: float
    """When it happened: the event's `event_timestamp` (CAEP), the SET's `toe`, else `iat`."""


class Transmitter:
    """One `[signals.NAME]`: its configuration, its keys, its verifier."""

    def __init__(
        self,
        cfg: TransmitterConfig,
        clock: Clock,
        http: Callable[[], aiohttp.ClientSession | None],
    ) -> None:
        self.cfg = cfg
        self.keys = JwksCache(
            name=f"ssf:{cfg.name}",
            url=cfg.jwks_url,
            file=cfg.jwks_file,
            ca_file=cfg.jwks_ca,
            refresh_interval=60.0,
            max_age=3600.0,
            timeout=5.0,
            clock=clock.time,
            session=http,
        )
        self.verifier = SignedTokenVerifier(
            TokenRules(
                issuer=cfg.issuer,
                audience=cfg.audience,
                algorithms=cfg.algorithms,
                types=(SET_TYPE,),
                required=("iss", "aud", "iat", "jti", "events"),
                leeway=cfg.leeway,
                max_age=cfg.max_event_age,
            ),
            self.keys,
            clock.time,
        )


def replay_key(issuer: str, jti: str) -> str:
    """One key per (issuer, jti): RFC 8417 §2.2 makes a jti unique per issuer only."""
    return "sigjti:" + hashlib.sha256(f"{issuer}\0{jti}".encode()).hexdigest()[:48]


class SignalReceiver:
    """Holds the transmitters, receives their SETs, polls the ones that are polled."""

    def __init__(
        self,
        transmitters: tuple[TransmitterConfig, ...],
        *,
        store: Store,
        recorder: Recorder,
        clock: Clock,
        providers: Sequence[OIDCProviderConfig] = (),
    ) -> None:
        self.store = store
        self.recorder = recorder
        self.clock = clock
        # Sessions name the provider that signed them in; the transmitter whose issuer is a
        # provider's speaks for that provider's people, in its user namespace.
        self._provider_issuers = MappingProxyType({p.name: p.issuer for p in providers})
        self._namespaces = {p.issuer: p.user_namespace for p in providers}
        self.metrics = SignalMetrics(recorder.metrics.registry)
        self.enforcer = Enforcer(store)
        self._http: aiohttp.ClientSession | None = None
        self.transmitters = {
            t.name: Transmitter(t, clock, lambda: self._http) for t in transmitters
        }
        self._by_issuer = {t.cfg.issuer: t for t in self.transmitters.values()}
        self._pollers: list[Poller] = []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            # RFC 8725 §3.10 spirit: no cookies between the gateway and a transmitter.
            self._http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._http

    async def start(self) -> None:
        from .poll import Poller

        if self.transmitters:
            _ = self.http
        self.metrics.prepare(
            [(t.cfg.name, t.cfg.delivery, t.cfg.max_silence) for t in self.transmitters.values()],
            self.clock.time(),
        )
        for t in self.transmitters.values():
            await t.keys.start()
            if t.cfg.delivery == "poll":
                poller = Poller(self, t)
                self._pollers.append(poller)
                self._tasks.append(asyncio.ensure_future(poller.run()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for t in self.transmitters.values():
            await t.keys.close()
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    # --- receiving ------------------------------------------------------------------------
    def transmitter_for(self, token: str) -> Transmitter:
        iss = peek_issuer(token)
        t = self._by_issuer.get(iss)
        if t is None:
            raise SignalTokenError(INVALID_ISSUER, f"no [signals] transmitter has issuer {iss!r}")
        return t

    async def receive(
        self, token: str, ctx: RequestContext, *, via: str, transmitter: Transmitter | None = None
    ) -> Receipt:
        """Verify, claim, act, audit and count one SET. Raises AuditUnavailable (nothing was
        done) and StoreUnavailable (answer 503: the transmitter retries)."""
        name = transmitter.cfg.name if transmitter is not None else UNKNOWN
        try:
            t = transmitter or self.transmitter_for(token)
            name = t.cfg.name
            claims = await t.verifier.verify(token)
            events = parse_events(claims, t.cfg.leeway, self.clock.time())
        except SignalTokenError as exc:
            return self.refuse(ctx, exc.code, exc.detail, source="ssf", name=name, via=via)
        jti = str(claims["jti"])
        self.ensure_auditable()
        if not await self.store.claim_once(
            replay_key(t.cfg.issuer, jti), t.cfg.max_event_age + t.cfg.leeway, ctx.now
        ):
            return self.refuse(
                ctx,
                REPLAYED,
                f"jti {jti!r} was already received",
                source="ssf",
                name=name,
                via=via,
                jti=jti,
            )
        if any(e.action in (Action.TERMINATE, Action.STEP_UP, Action.ENABLE) for e in events):
            # A session started on another worker or replica a moment ago must be seen too.
            await self.store.caught_up()
        applied = []
        for event in events:
            effect = await self._act(t, event, jti, ctx.now)
            self.metrics.events.labels(name, event.label, event.action.value).inc()
            applied.append(
                {
                    "type": event.uri,
                    "event": event.label,
                    "action": event.action.value,
                    "subject": event.subject.describe() if event.subject else None,
                    "at": event.at,
                    **effect.to_json(),
                }
            )
        self.metrics.sets.labels(name, via, ACCEPTED).inc()
        self.metrics.last_delivery.labels(name).set(self.clock.time())
        summary = "; ".join(_summary(e) for e in applied)
        self.record(
            ctx,
            Verdict.ALLOW,
            Reason.SIGNAL_ACCEPTED,
            summary,
            {
                "source": "ssf",
                "transmitter": name,
                "via": via,
                "iss": t.cfg.issuer,
                "jti": jti,
                "events": applied,
            },
        )
        return Receipt(ACCEPTED, summary, ctx.decision_id, jti)

    async def _act(self, t: Transmitter, event: ParsedEvent, jti: str, now: float) -> Effect:
        effect = Effect()
        subject = event.subject
        if subject is None:
            return effect
        matcher = self.matcher(t)
        why = f"{event.label} from {t.cfg.name}"
        if event.action is Action.TERMINATE:
            sessions = matcher.sessions(subject, self.store.sessions(), now)
            if event.label in LOCKING:
                # Known users only: a name no request ever carried gets no record.
                known = {u for u in matcher.named_users(subject) if self.store.user(u)}
                effect.users_locked = await self.enforcer.lock(
                    [*known, *(s.user for s in sessions)], self._lock_reason(t, subject), now
                )
            effect.sessions_ended = await self.enforcer.terminate(sessions, why, now)
            self.metrics.sessions_ended.labels("ssf").inc(len(effect.sessions_ended))
        elif event.action is Action.ENABLE:
            # The accounts this transmitter locked for this subject, found by the lock's reason:
            # their sessions, which named them, may be long gone from memory.
            reason = self._lock_reason(t, subject)
            locked = [u.user for u in self.store.users() if u.lock_reason == reason]
            effect.users_unlocked = await self.enforcer.unlock(locked, reason)
        elif event.action is Action.STEP_UP and step_up_applies(event.label, event.payload):
            sessions = matcher.sessions(subject, self.store.sessions(), now)
            # NumericDate is usually whole seconds: a session started within the event's second
            # may be from before it, so the whole second counts as before (fail closed).
            since = event.at + 1.0 if event.at == int(event.at) else event.at
            effect.users_stepped_up = await self.enforcer.require_step_up(
                sessions, why, min(since, now)
            )
            self.metrics.step_ups.inc(len(effect.users_stepped_up))
        elif event.action is Action.DEVICE_POSTURE:
            previous = event.payload.get("previous_status")
            effect.devices_updated = await self.enforcer.device_compliance(
                devices(subject, self.store.devices()),
                status=str(event.payload["current_status"]),
                previous=previous if isinstance(previous, str) else None,
                transmitter=t.cfg.name,
                jti=jti,
                at=min(event.at, now),
                received=now,
            )
        return effect

    def matcher(self, t: Transmitter) -> Matcher:
        return Matcher(
            t.cfg.subject_issuers,
            self._provider_issuers,
            self._namespaces.get(t.cfg.issuer, ""),
        )

    @staticmethod
    def _lock_reason(t: Transmitter, subject: Subject) -> str:
        """Names the transmitter and the subject: `account-enabled` lifts exactly this lock."""
        who = ", ".join(sorted(i.describe() for i in subject.user)) or "-"
        return f"account disabled at {t.cfg.name} (RISC, {who})"[:500]

    # --- recording ------------------------------------------------------------------------
    def ensure_auditable(self) -> None:
        if not self.recorder.audit.healthy:
            # SECURITY: nothing is acted on that the audit log could not record.
            self.recorder.metrics.audit_unavailable.inc()
            raise AuditUnavailable("audit log is failing")

    def refuse(
        self,
        ctx: RequestContext,
        result: str,
        detail: str,
        *,
        source: str,
        name: str,
        via: str,
        jti: str | None = None,
    ) -> Receipt:
        if source == "ssf":
            self.metrics.sets.labels(name, via, result).inc()
        else:
            self.metrics.logout_tokens.labels(result).inc()
        log.warning("%s from %s refused: %s: %s", source, name, result, detail)
        reason = Reason.SIGNAL_REPLAYED if result == REPLAYED else Reason.SIGNAL_INVALID
        signal = {"source": source, "transmitter": name, "via": via, "error": result, "jti": jti}
        with contextlib.suppress(AuditUnavailable):  # counted; the refusal stands either way
            self.record(ctx, Verdict.DENY, reason, f"{result}: {detail}", signal)
        return Receipt(result, detail, ctx.decision_id, jti)

    def record(
        self, ctx: RequestContext, verdict: Verdict, reason: Reason, detail: str, signal: Any
    ) -> None:
        """One `ztgw.signal` audit event in the decision-log shape, so `audit search` finds
        it by decision id, reason or verdict like any other (raises AuditUnavailable)."""
        rec = self.recorder
        decision = Decision(
            ctx.decision_id,
            verdict,
            reason,
            (Finding(STAGE, reason, verdict, detail=detail[:500]),),
        )
        if ctx.method != "POLL":
            rec.count(ctx, decision)
        self.ensure_auditable()
        event = audit_event(ctx, decision, rec.revision(), mask_key=rec.mask_key())
        event["type"] = SIGNAL_TYPE
        event["signal"] = signal
        try:
            rec.audit.record(event)
        except AuditUnavailable:
            rec.metrics.audit_unavailable.inc()
            raise


def _summary(applied: dict[str, Any]) -> str:
    parts = [applied["event"]]
    for key, what in (
        ("sessions_ended", "sessions ended"),
        ("users_stepped_up", "users to step up"),
        ("devices_updated", "devices updated"),
        ("users_locked", "users locked"),
        ("users_unlocked", "users unlocked"),
    ):
        if applied[key]:
            parts.append(f"{len(applied[key])} {what}")
    return ", ".join(parts)


def parse_events(claims: dict[str, Any], leeway: float, now: float) -> list[ParsedEvent]:
    """RFC 8417 §2.2 `events`, with each event's subject (SSF 1.0 §4.1: `sub_id` in the SET;
    CAEP drafts before it put `subject` in the event) and what it asks for."""
    events = claims.get("events")
    if not isinstance(events, dict) or not events:
        raise SignalTokenError(INVALID_REQUEST, "'events' is not a non-empty JSON object")
    if len(events) > MAX_EVENTS:
        raise SignalTokenError(INVALID_REQUEST, f"more than {MAX_EVENTS} events in one SET")
    if "sub" in claims and "sub_id" not in claims and not isinstance(claims["sub"], str):
        raise SignalTokenError(INVALID_REQUEST, "'sub' is not a string")
    iat = numeric_date(claims, "iat") or now
    toe = numeric_date(claims, "toe")
    top = claims.get("sub_id")
    out = []
    for uri, payload in events.items():
        if not isinstance(payload, dict):
            raise SignalTokenError(INVALID_REQUEST, f"event {uri!r} is not a JSON object")
        label, action = classify(uri)
        doc = top if top is not None else payload.get("subject")
        where = "sub_id" if top is not None else f"events[{label}].subject"
        subject = None
        try:
            if doc is not None:
                subject = parse_subject(doc, where)
        except SubjectError as exc:
            raise SignalTokenError(INVALID_REQUEST, str(exc)) from exc
        if subject is None and action in (
            Action.TERMINATE,
            Action.STEP_UP,
            Action.DEVICE_POSTURE,
            Action.ENABLE,
        ):
            raise SignalTokenError(INVALID_REQUEST, f"{label}: no subject (sub_id)")
        if (
            action is Action.DEVICE_POSTURE
            and payload.get("current_status") not in COMPLIANCE_STATES
        ):
            raise SignalTokenError(
                INVALID_REQUEST, f"{label}: current_status must be one of {COMPLIANCE_STATES}"
            )
        try:
            at = numeric_date(payload, "event_timestamp") or toe or iat
        except SignalTokenError as exc:
            raise SignalTokenError(INVALID_REQUEST, f"{label}: {exc.detail}") from exc
        if at > now + leeway:
            raise SignalTokenError(INVALID_REQUEST, f"{label}: event_timestamp is in the future")
        out.append(ParsedEvent(uri, label, action, payload, subject, at))
    return out
