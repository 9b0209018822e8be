"""The identity stage: the client certificate (the device) and the bearer token (the user).

Absent and invalid are different things (Oathkeeper, Starlette): no credential of a kind is no
finding, unless the route requires it; a present but bad credential is a DENY with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..context import Identity, RequestContext
from ..credentials.jwt import TokenError, VerifiedToken, check_binding
from ..decision import Finding, Reason, Verdict
from ..request.fetchmeta import ambient_refusal
from ..sessions import cookie_session_id, read_cookie

if TYPE_CHECKING:
    from ..config import ClaimMapping, RouteConfig
    from ..credentials.oidc import OIDCProviderConfig
    from ..edge.tls import CertInfo
    from ..runtime import Runtime

NAME = "identity"


def _deny(reason: Reason, detail: str = "") -> Finding:
    return Finding(NAME, reason, Verdict.DENY, detail=detail)


def _strings(value: Any, *, split: str | None = None) -> frozenset[str]:
    if isinstance(value, str):
        parts = value.split(split) if split is not None else value.replace(",", " ").split()
        return frozenset(p for p in parts if p)
    if isinstance(value, list | tuple):
        return frozenset(v for v in value if isinstance(v, str) and v)
    return frozenset()


def identity_from_token(
    token: VerifiedToken, mapping: ClaimMapping | None, device_id: str | None
) -> Identity:
    claims: Mapping[str, Any] = token.claims
    user_claim = mapping.user if mapping else "sub"
    user = claims.get(user_claim)
    email = claims.get(mapping.email if mapping else "email")
    verified = claims.get("email_verified")
    if verified is False or (isinstance(verified, str) and verified.lower() == "false"):
        # SECURITY: an address the IdP has not verified is anyone's to claim ("nOAuth"); an
        # upstream that keys accounts by e-mail must never see it (security review L6). The
        # OIDC sign-in path drops it the same way.
        email = None
    elif mapping is not None and mapping.require_email_verified and verified is not True:
        email = None
    scope_value = claims.get(mapping.scopes if mapping else "scope")
    if scope_value is None and (mapping is None or mapping.scopes == "scope"):
        scope_value = claims.get("scp")
    name = user if isinstance(user, str) and user else token.subject
    if mapping is not None and mapping.user_namespace:
        name = f"{mapping.user_namespace}:{name}"
    return Identity(
        user=name,
        source="token",
        email=email if isinstance(email, str) else None,
        groups=_strings(claims.get(mapping.groups if mapping else "groups")),
        roles=_strings(claims.get(mapping.roles if mapping else "roles")),
        scopes=_strings(scope_value, split=" " if isinstance(scope_value, str) else None),
        claims=dict(claims),
        issuer=token.issuer,
        token=token,
        device_id=device_id,
    )


def directory_user_refusal(user: str | None, namespaces: frozenset[str]) -> str | None:
    """Why a user name of the directory (certificate, OIDC, an issuer without a namespace) may
    not be believed: it spells another namespace's user ("partner:alice")."""
    if user and namespaces and ":" in user and user.partition(":")[0] in namespaces:
        return f"user {user!r} is in the name space of another identity source"
    return None


def provider_session_refusal(
    user: str,
    provider: OIDCProviderConfig | None,
    name: object,
    allowed: Sequence[str],
    label_of: Callable[[str], str] = str,
) -> Finding | None:
    """Why a browser session signed in by the provider `name` is not good on a route that
    accepts `allowed` (empty: every provider): a provider no longer configured, a user name
    outside that provider's name space, or a provider the route does not accept."""
    if provider is None and name is None:
        # A session record that names no provider (every sign-in records one): the
        # directory's, good only where the route does not choose providers.
        if allowed:
            return _deny(Reason.PROVIDER_NOT_ALLOWED, "the session names no provider")
        return None
    if provider is None:
        # Its provider was removed from the configuration: its sessions end with it.
        return _deny(Reason.SESSION_INVALID, f"provider {name!r} is not configured")
    ns = provider.user_namespace
    if ns and not user.startswith(ns + ":"):
        # Signed in before the provider's name space changed: sign in again (the old name
        # may be someone else's now).
        return _deny(Reason.SESSION_INVALID, f"user {user!r} is outside {ns!r}")
    if allowed and provider.name not in allowed:
        return _deny(
            Reason.PROVIDER_NOT_ALLOWED,
            f"signed in with {provider.label}; this application accepts "
            + ", ".join(label_of(n) for n in allowed),
        )
    return None


class IdentityStage:
    name = NAME

    def __init__(self, runtime: Runtime) -> None:
        self.revocations = runtime.revocations
        self.revocation = runtime.revocation
        self.tokens = runtime.tokens
        self.claim_maps = runtime.config.claim_maps
        self.providers = runtime.config.oidc
        self.metrics = runtime.metrics
        self.dry_run = runtime.dry_run
        self.namespaces = frozenset(
            m.user_namespace for m in self.claim_maps.values() if m.user_namespace
        ) | frozenset(p.user_namespace for p in self.providers.providers if p.user_namespace)
        self._identities: dict[tuple[str, str | None], Identity] = {}
        self._cert_identities: dict[CertInfo, Identity] = {}
        self.store = runtime.store
        self.cookie_name = runtime.config.sessions.cookie_name
        self.throttle = runtime.throttle

    def _label(self, name: str) -> str:
        provider = self.providers.get(name)
        return provider.label if provider is not None else name

    def _provider_refusal(
        self, user: str, extra: Mapping[str, Any], route: RouteConfig
    ) -> Finding | None:
        name = extra.get("provider")
        provider = self.providers.get(name) if isinstance(name, str) else None
        refusal = provider_session_refusal(
            user, provider, name, route.policy.providers, self._label
        )
        if (
            refusal is not None
            and refusal.reason is Reason.PROVIDER_NOT_ALLOWED
            and provider is not None
            and not self.dry_run
        ):
            self.metrics.provider_refusals.labels(route.name, provider.name).inc()
        return refusal

    async def check(self, ctx: RequestContext) -> Sequence[Finding]:
        route = ctx.route
        assert route is not None, "the request stage sets the route or denies"
        policy = route.policy
        cert = ctx.cert
        soft_failure: Finding | None = None
        if cert is not None:
            # SECURITY: re-checked per request against the newest CRL, so a keep-alive
            # connection or a resumed TLS session does not outlive a revocation.
            if self.revocations().is_revoked(cert.serial):
                return [_deny(Reason.CLIENT_CERT_REVOKED, f"serial {cert.serial:x}")]
            if self.revocation is not None and self.revocation.active:
                # Fetched CRLs, OCSP and revocations other replicas found (revocation/).
                status = await self.revocation.check(cert, policy.ocsp, ctx.now)
                if status is not None:
                    if status.verdict is not None:
                        return [status]
                    soft_failure = status
            now = ctx.now
            if now > cert.not_after:
                return [_deny(Reason.CLIENT_CERT_INVALID, "certificate expired")]
            if now < cert.not_before:
                return [_deny(Reason.CLIENT_CERT_INVALID, "certificate not yet valid")]
            if not cert.client_auth:
                return [_deny(Reason.CLIENT_CERT_INVALID, "no clientAuth extended key usage")]
            if cert.is_ca:
                # SECURITY: a CA's key signs certificates; one used to log in means a CA key
                # left its vault (or a sub-CA issued for another purpose). OpenSSL's client
                # purpose check lets a CA certificate through as a leaf.
                return [_deny(Reason.CLIENT_CERT_INVALID, "a CA certificate is not a client")]
        elif policy.require_client_cert:
            return [_deny(Reason.CLIENT_CERT_REQUIRED)]

        device_id = cert.device_id if cert else None
        token: VerifiedToken | None = None
        auth_values = ctx.headers.getall("Authorization", ())
        if len(auth_values) > 1:
            return [_deny(Reason.TOKEN_INVALID, "more than one Authorization header")]
        if auth_values:
            scheme, _, credential = auth_values[0].strip().partition(" ")
            if scheme.lower() != "bearer":
                if not route.forward_authorization:
                    return [_deny(Reason.TOKEN_INVALID, f"unsupported scheme {scheme[:16]!r}")]
                # The legacy app's own Authorization (e.g. Basic) passes through untouched.
            else:
                credential = credential.strip()
                if not credential:
                    return [_deny(Reason.TOKEN_INVALID, "empty bearer token")]
                if self.tokens is None:
                    return [_deny(Reason.TOKEN_ISSUER_UNKNOWN, "no issuers configured")]
                try:
                    token = self.tokens.remembered(credential, ctx.now)
                    if token is None:
                        # A signature to check: behind the throttle of invalid tokens.
                        wait = await self.throttle.wait(ctx.client_ip, ctx.now)
                        if wait:
                            ctx.retry_after = max(ctx.retry_after or 0.0, wait)
                            reason, why = Reason.CREDENTIALS_THROTTLED, "invalid tokens from here"
                            return [_deny(reason, why)]
                        token = await self.tokens.verify(credential, now=ctx.now)
                except TokenError as exc:
                    if exc.reason is not Reason.TOKEN_ISSUER_UNAVAILABLE:
                        await self.throttle.failed(ctx.client_ip, ctx.now)
                    return [_deny(exc.reason, exc.detail)]
                if policy.issuers and token.issuer not in policy.issuers:
                    return [
                        _deny(
                            Reason.TOKEN_ISSUER_UNKNOWN, f"issuer {token.issuer} not accepted here"
                        )
                    ]
                binding = check_binding(
                    token, cert.der if cert else None, required=policy.require_bound_token
                )
                if binding is not None:
                    return [_deny(binding)]
        people_sign_in = policy.login == "browsers" and ctx.browser
        if token is None and policy.require_token and not people_sign_in:
            # With login = "browsers", programs send a token and people sign in instead: a
            # browser is then identified only by a session from the identity provider (never
            # by its certificate alone, below), so Accept: text/html opens nothing to a program.
            return [_deny(Reason.TOKEN_REQUIRED)]

        session_identity = None
        if token is None and self.store is not None:
            cookie = read_cookie(ctx.headers.get("Cookie", ""), self.cookie_name)
            if cookie is not None:
                sid = cookie_session_id(cookie)
                session = self.store.session(sid) or await self.store.find_session(sid)
                if session is not None and session.extra.get("source") == "oidc":
                    # A browser signed in with an identity provider; the session stage
                    # re-verifies the session itself (revocation, expiry, device, drift).
                    refusal = self._provider_refusal(session.user, session.extra, route)
                    if refusal is not None:
                        return [refusal]
                    signed_by = session.extra.get("provider")
                    groups = session.extra.get("groups") or []
                    email = session.extra.get("email")
                    session_identity = Identity(
                        user=session.user,
                        source="session",
                        email=email if isinstance(email, str) else None,
                        groups=frozenset(g for g in groups if isinstance(g, str)),
                        device_id=device_id,
                        provider=signed_by if isinstance(signed_by, str) else None,
                    )
        if token is not None:
            # The claims of a cached token never change: map them once per token and device.
            key = (token.token_hash, device_id)
            cached = self._identities.get(key)
            if cached is None:
                mapping = self.claim_maps.get(token.issuer)
                cached = identity_from_token(token, mapping, device_id)
                if mapping is None or not mapping.user_namespace:
                    ambiguous = directory_user_refusal(cached.user, self.namespaces)
                    if ambiguous:
                        return [_deny(Reason.IDENTITY_AMBIGUOUS, ambiguous)]
                if len(self._identities) >= 10_000:
                    self._identities.clear()
                self._identities[key] = cached
            ctx.identity = cached
            return (soft_failure,) if soft_failure is not None else ()
        # SECURITY: the certificate is ambient: a navigation another site started never gets
        # its identity (not even the device id) from the certificate alone where the route
        # is strict; a session or token still counts (docs/security.md). A WebSocket's Origin
        # was held to the route's allow-list already.
        headers = ctx.headers
        ambient = (
            ambient_refusal(ctx.fetch, route.cross_site)
            if not ctx.websocket and ("Sec-Fetch-Site" in headers or "Origin" in headers)
            else None
        )
        if session_identity is not None:
            identity = session_identity
            provider = self.providers.get(identity.provider or "")
            if provider is not None and provider.user_namespace:
                # A namespaced provider's user ("partners:alice"), held to its provider's
                # name space above: no one else's.
                ctx.identity = identity
                return ()
        elif (
            cert is not None
            and policy.allow_cert_identity
            and cert.user
            and policy.login != "always"
            # SECURITY: a browser is told by its Fetch Metadata, not by the order of its
            # Accept header: a page's fetch() with "Accept: */*" is still a browser and is held
            # to sign-in (security review M2).
            and not (policy.login == "browsers" and ctx.browser)
        ):
            if ambient is not None:
                return [_deny(Reason.ORIGIN_DENIED, ambient)]
            # One per certificate: its fields never change (shared, like token identities).
            known = self._cert_identities.get(cert)
            if known is None:
                if len(self._cert_identities) >= 10_000:
                    self._cert_identities.clear()
                known = self._cert_identities[cert] = Identity(
                    user=cert.user, source="cert", email=cert.email, device_id=device_id
                )
            identity = known
        else:
            ctx.identity = Identity(
                user=None, source="none", device_id=None if ambient else device_id
            )
            return (soft_failure,) if soft_failure is not None else ()
        ambiguous = directory_user_refusal(identity.user, self.namespaces)
        if ambiguous:
            return [_deny(Reason.IDENTITY_AMBIGUOUS, ambiguous)]
        ctx.identity = identity
        # A soft-fail route's "OCSP could not tell" rides along: audited, not refused.
        return (soft_failure,) if soft_failure is not None else ()
