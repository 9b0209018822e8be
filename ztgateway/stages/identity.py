"""The identity stage: the client certificate (the device) and the bearer token (the user).

Absent and invalid are different things (Oathkeeper, Starlette): no credential of a kind is no
finding, unless the route requires it; a present but bad credential is a DENY with its reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..context import Identity, RequestContext
from ..credentials.jwt import TokenError, VerifiedToken, check_binding
from ..decision import Finding, Reason, Verdict
from .session import cookie_session_id, read_cookie

if TYPE_CHECKING:
    from ..config import ClaimMapping
    from ..runtime import Runtime
    from ..tls import CertInfo

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
    scope_value = claims.get(mapping.scopes if mapping else "scope")
    if scope_value is None and (mapping is None or mapping.scopes == "scope"):
        scope_value = claims.get("scp")
    return Identity(
        user=user if isinstance(user, str) and user else token.subject,
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


class IdentityStage:
    name = NAME

    def __init__(self, runtime: Runtime) -> None:
        self.revocations = runtime.revocations
        self.tokens = runtime.tokens
        self.claim_maps = runtime.config.claim_maps
        self._identities: dict[tuple[str, str | None], Identity] = {}
        self._cert_identities: dict[CertInfo, Identity] = {}
        self.store = runtime.store
        self.cookie_name = runtime.config.sessions.cookie_name

    async def check(self, ctx: RequestContext) -> Sequence[Finding]:
        route = ctx.route
        assert route is not None, "the request stage sets the route or denies"
        policy = route.policy
        cert = ctx.cert
        if cert is not None:
            # SECURITY: re-checked per request against the newest CRL, so a keep-alive
            # connection or a resumed TLS session does not outlive a revocation.
            if self.revocations().is_revoked(cert.serial):
                return [_deny(Reason.CLIENT_CERT_REVOKED, f"serial {cert.serial:x}")]
            now = ctx.now
            if now > cert.not_after:
                return [_deny(Reason.CLIENT_CERT_INVALID, "certificate expired")]
            if now < cert.not_before:
                return [_deny(Reason.CLIENT_CERT_INVALID, "certificate not yet valid")]
            if not cert.client_auth:
                return [_deny(Reason.CLIENT_CERT_INVALID, "no clientAuth extended key usage")]
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
                    token = await self.tokens.verify(credential, now=ctx.now)
                except TokenError as exc:
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
        if token is None and policy.require_token:
            return [_deny(Reason.TOKEN_REQUIRED)]

        session_identity = None
        if token is None and self.store is not None:
            cookie = read_cookie(ctx.headers.get("Cookie", ""), self.cookie_name)
            if cookie is not None:
                sid = cookie_session_id(cookie)
                session = self.store.session(sid) or await self.store.find_session(sid)
                if session is not None and session.extra.get("source") == "oidc":
                    # A browser signed in with the identity provider; the session stage
                    # re-verifies the session itself (revocation, expiry, device, drift).
                    groups = session.extra.get("groups") or []
                    email = session.extra.get("email")
                    session_identity = Identity(
                        user=session.user,
                        source="session",
                        email=email if isinstance(email, str) else None,
                        groups=frozenset(g for g in groups if isinstance(g, str)),
                        device_id=device_id,
                    )
        if token is not None:
            # The claims of a cached token never change: map them once per token and device.
            key = (token.token_hash, device_id)
            cached = self._identities.get(key)
            if cached is None:
                cached = identity_from_token(token, self.claim_maps.get(token.issuer), device_id)
                if len(self._identities) >= 10_000:
                    self._identities.clear()
                self._identities[key] = cached
            ctx.identity = cached
        elif session_identity is not None:
            ctx.identity = session_identity
        elif (
            cert is not None
            and policy.allow_cert_identity
            and cert.user
            and policy.login != "always"
            and not (policy.login == "browsers" and ctx.wants_html)
        ):
            # One per certificate: its fields never change (shared, like token identities).
            identity = self._cert_identities.get(cert)
            if identity is None:
                if len(self._cert_identities) >= 10_000:
                    self._cert_identities.clear()
                identity = self._cert_identities[cert] = Identity(
                    user=cert.user, source="cert", email=cert.email, device_id=device_id
                )
            ctx.identity = identity
        else:
            ctx.identity = Identity(user=None, source="none", device_id=device_id)
        return ()
