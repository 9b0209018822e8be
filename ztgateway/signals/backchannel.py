"""OpenID Connect Back-Channel Logout 1.0: the provider says a person signed out there.

The provider POSTs a logout token (a signed JWT, §2.4) to `/.ztgw/oidc/backchannel-logout`; the
gateway validates it as §2.6 asks and ends the matching sessions on every worker and replica
(their WebSockets close with 1008 on the revocation):
1. signed by the provider's key (from its discovery document's `jwks_uri`), with an algorithm it
   announced, `iss` the provider, `aud` this client, `iat` recent, `exp` not passed (required
   since the specification's errata set 1);
2. `events` holds `http://schemas.openid.net/event/backchannel-logout` with an object value;
3. `sid`, `sub` or both are present; a `nonce` is refused (it would make an ID token
   acceptable as a logout token, §2.6 step 5);
4. the `jti` was not received before (§2.6 step 6), checked in the shared store;
5. sessions signed in through this provider end: with `sid`, the one sign-in session of that
   provider session (and of that `sub`, when both are given); with `sub` alone, all of them.
The answer is 200 (and `Cache-Control: no-store`) or 400 with an `error` (§2.8).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ..context import RequestContext
from ..credentials.jwks import JwksCache
from ..credentials.oidc import OIDCClient, OIDCError
from ..credentials.providers import SignInProviders
from ..decision import Reason, Verdict
from ..store.base import Session
from .events import BACKCHANNEL_LOGOUT
from .receiver import ACCEPTED, REPLAYED, Receipt
from .tokens import (
    INVALID_ISSUER,
    INVALID_REQUEST,
    KEYS_UNAVAILABLE,
    LOGOUT_TYPE,
    SignalTokenError,
    SignedTokenVerifier,
    TokenRules,
    peek_claim,
    peek_issuer,
)

if TYPE_CHECKING:
    from ..config import OIDCConfig
    from .receiver import SignalReceiver

MAX_AGE: Final = 600.0
"""Logout tokens are sent the moment the person signs out; an older one is refused, and its
`jti` is remembered this long (Back-Channel Logout §4: short-lived, to limit replay)."""
SOURCE: Final = "backchannel_logout"


class BackchannelLogout:
    """Logout tokens of every configured provider: each is verified by the provider its `iss`
    (and, when two providers share an issuer, its `aud`) names, and ends only sessions that
    provider signed in."""

    def __init__(
        self,
        receiver: SignalReceiver,
        providers: Callable[[], SignInProviders],
        config: OIDCConfig,
    ) -> None:
        self.receiver = receiver
        self._providers = providers
        self.config = config
        # provider name -> (its jwks_uri when built, the verifier)
        self._verifiers: dict[str, tuple[str, SignedTokenVerifier]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.config.providers) and self.config.backchannel_logout

    async def close(self) -> None:
        for _, verifier in self._verifiers.values():
            await verifier.keys.close()

    def provider_for(self, token: str) -> OIDCClient:
        iss = peek_issuer(token)
        candidates = [c for c in self._providers() if c.cfg.issuer == iss]
        if len(candidates) > 1:
            # Two clients at one provider: the token's audience says which one it is for.
            aud = peek_claim(token, "aud")
            audiences = aud if isinstance(aud, list) else [aud]
            candidates = [c for c in candidates if c.cfg.client_id in audiences]
        if len(candidates) != 1:
            raise SignalTokenError(INVALID_ISSUER, f"no [oidc] provider has issuer {iss!r}")
        return candidates[0]

    async def verifier(self, client: OIDCClient) -> SignedTokenVerifier:
        provider = client.cfg
        try:
            metadata = await client.discovered()
        except OIDCError as exc:
            raise SignalTokenError(KEYS_UNAVAILABLE, f"provider discovery: {exc.detail}") from exc
        held = self._verifiers.get(provider.name)
        if held is not None and held[0] == metadata.jwks_uri:
            return held[1]
        receiver = self.receiver
        keys = JwksCache(
            name=f"oidc-logout:{provider.name}",
            url=metadata.jwks_uri,
            file=None,
            ca_file=provider.ca_file if metadata.jwks_uri.startswith("https:") else None,
            refresh_interval=60.0,
            max_age=3600.0,
            timeout=provider.timeout,
            clock=receiver.clock.time,
            session=lambda: receiver.http,
        )
        await keys.start()
        verifier = SignedTokenVerifier(
            TokenRules(
                issuer=provider.issuer,
                audience=provider.client_id,
                algorithms=metadata.algorithms,
                # §2.4 recommends `typ: logout+jwt`; providers that predate it send a plain
                # JWT, which the `events` and `nonce` checks below keep apart from ID tokens.
                types=(LOGOUT_TYPE, "jwt", None),
                required=("iss", "aud", "iat", "exp", "jti", "events"),
                leeway=provider.leeway,
                max_age=MAX_AGE,
            ),
            keys,
            receiver.clock.time,
        )
        self._verifiers[provider.name] = (metadata.jwks_uri, verifier)
        if held is not None:
            await held[1].keys.close()
        return verifier

    async def receive(self, token: str, ctx: RequestContext) -> Receipt:
        """Raises AuditUnavailable and StoreUnavailable (answered 503)."""
        receiver = self.receiver
        name = "-"
        try:
            client = self.provider_for(token)
            name = client.cfg.name
            verifier = await self.verifier(client)
            claims = await verifier.verify(token)
            sid, sub = _check_claims(claims)
        except SignalTokenError as exc:
            return receiver.refuse(
                ctx, exc.code, exc.detail, source=SOURCE, name=name, via="backchannel"
            )
        jti = str(claims["jti"])
        receiver.ensure_auditable()
        key = (
            "logoutjti:"
            + hashlib.sha256(f"{verifier.rules.issuer}\0{jti}".encode()).hexdigest()[:48]
        )
        if not await receiver.store.claim_once(key, MAX_AGE + verifier.rules.leeway, ctx.now):
            return receiver.refuse(
                ctx,
                REPLAYED,
                f"jti {jti!r} was already received",
                source=SOURCE,
                name=name,
                via="backchannel",
                jti=jti,
            )
        await receiver.store.caught_up()  # a sign-in elsewhere a moment ago counts too
        matching = self._sessions(name, sid, sub, ctx.now)
        ended = await receiver.enforcer.terminate(matching, "back-channel logout", ctx.now)
        receiver.metrics.logout_tokens.labels(ACCEPTED).inc()
        receiver.metrics.sessions_ended.labels(SOURCE).inc(len(ended))
        users = sorted({s.user for s in matching})
        summary = f"back-channel logout from {name}: {len(ended)} sessions ended"
        receiver.record(
            ctx,
            Verdict.ALLOW,
            Reason.SIGNAL_ACCEPTED,
            summary,
            {
                "source": SOURCE,
                "transmitter": name,
                "via": "backchannel",
                "iss": verifier.rules.issuer,
                "jti": jti,
                "sid": sid,
                "sub": sub,
                "users": users,
                "sessions_ended": ended,
            },
        )
        return Receipt(ACCEPTED, summary, ctx.decision_id, jti)

    def _sessions(
        self, provider: str, sid: str | None, sub: str | None, now: float
    ) -> list[Session]:
        """The live sessions this provider signed in, of that provider session and person."""
        out = []
        for s in self.receiver.store.sessions():
            extra = s.extra
            if s.revoked or s.expires_at <= now or extra.get("provider") != provider:
                continue
            if sid is not None and extra.get("sid") != sid:
                continue
            if sub is not None and extra.get("sub") != sub:
                continue
            out.append(s)
        return out


def _check_claims(claims: dict[str, Any]) -> tuple[str | None, str | None]:
    """§2.6 steps 3 to 5 (the signature, iss, aud, iat and exp were checked already)."""
    events = claims.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_LOGOUT), dict):
        raise SignalTokenError(
            INVALID_REQUEST, f"'events' has no {BACKCHANNEL_LOGOUT} member with an object value"
        )
    if "nonce" in claims:
        raise SignalTokenError(INVALID_REQUEST, "a logout token must not contain a nonce")
    sid, sub = claims.get("sid"), claims.get("sub")
    if sid is not None and (not isinstance(sid, str) or not sid):
        raise SignalTokenError(INVALID_REQUEST, "'sid' is not a non-empty string")
    if sub is not None and (not isinstance(sub, str) or not sub):
        raise SignalTokenError(INVALID_REQUEST, "'sub' is not a non-empty string")
    if sid is None and sub is None:
        raise SignalTokenError(INVALID_REQUEST, "neither 'sid' nor 'sub' is present")
    return sid, sub
