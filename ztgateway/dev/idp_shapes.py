"""The dev IdP dressed as a real provider: Keycloak, Microsoft Entra ID, Okta or Google.

DEVELOPMENT ONLY. Each shape copies what differs between those providers and matters to the
gateway's relying party, as their own documentation describes it: where the issuer and the
endpoints live, the signing algorithm (RS256, as all four use), which claims carry the user
and the groups and in what form, and whether RP-initiated logout exists. docs/oidc.md gives
the gateway's configuration for each real provider; tests/e2e/test_idp_shapes.py signs in
through the matching shape with exactly that configuration.

| shape    | issuer path           | user claim           | groups claim                         | logout |
|----------|-----------------------|----------------------|--------------------------------------|--------|
| generic  | /                     | sub (= user name)    | groups: names                        | yes    |
| keycloak | /realms/demo          | preferred_username   | groups: "/name" (full group path)    | yes    |
| entra    | /{tenant}/v2.0        | preferred_username   | groups: object ids; overage > 200    | yes    |
| okta     | /oauth2/default       | preferred_username   | groups: names, with the groups scope | yes    |
| google   | /                     | email (sub: number)  | none (hd: Workspace domain)          | no     |
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

ENTRA_TENANT: Final = "72f988bf-0000-4000-8000-00000000c0de"
ENTRA_GROUP_LIMIT: Final = 200
"""Entra ID puts at most 200 groups in a JWT; beyond that it sends an overage pointer instead
(`_claim_names`/`_claim_sources`, Microsoft identity platform: "groups overage claim")."""
_NAMESPACE: Final = uuid.UUID("6f1d6c55-8a0b-4c1e-9d7a-7a3e8c2b1f00")


class ShapedUser(Protocol):
    @property
    def username(self) -> str: ...
    @property
    def email(self) -> str | None: ...
    @property
    def name(self) -> str: ...
    @property
    def groups(self) -> tuple[str, ...]: ...


def stable_uuid(kind: str, name: str) -> str:
    """A fixed id per name, like a real provider's object ids (same user, same id)."""
    return str(uuid.uuid5(_NAMESPACE, f"{kind}:{name}"))


def _digits(text: str, n: int) -> str:
    return str(int.from_bytes(hashlib.sha256(text.encode()).digest(), "big"))[:n]


ClaimMaker = Callable[[ShapedUser, tuple[str, ...], str], dict[str, Any]]


def _generic(user: ShapedUser, scope: tuple[str, ...], client_id: str) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": user.username, "groups": list(user.groups)}
    if "profile" in scope:
        claims["name"] = user.name
        claims["preferred_username"] = user.username
    if "email" in scope and user.email:
        claims["email"] = user.email
        claims["email_verified"] = True
    return claims


def _keycloak(user: ShapedUser, scope: tuple[str, ...], client_id: str) -> dict[str, Any]:
    # Keycloak: sub is the user's UUID; the "Group Membership" mapper with its default
    # "Full group path" on sends "/admins"; realm roles are nested under realm_access.
    claims: dict[str, Any] = {
        "sub": stable_uuid("keycloak-user", user.username),
        "typ": "ID",
        "azp": client_id,
        "preferred_username": user.username,
        "groups": [f"/{g}" for g in user.groups],
        "realm_access": {"roles": ["default-roles-demo", "offline_access", *user.groups]},
    }
    if "profile" in scope:
        claims["name"] = user.name
    if "email" in scope and user.email:
        claims["email"] = user.email
        claims["email_verified"] = True
    return claims


def _entra(user: ShapedUser, scope: tuple[str, ...], client_id: str) -> dict[str, Any]:
    # Entra ID v2.0: sub is pairwise (per application), oid the user's object id, the UPN in
    # preferred_username; groups are object ids (GUIDs), and past the limit an overage pointer.
    pairwise = hashlib.sha256(f"{user.username}:{client_id}".encode()).digest()
    oid = stable_uuid("entra-user", user.username)
    upn = user.email or f"{user.username}@contoso.example"
    claims: dict[str, Any] = {
        "sub": base64.urlsafe_b64encode(pairwise).rstrip(b"=").decode()[:43],
        "oid": oid,
        "tid": ENTRA_TENANT,
        "ver": "2.0",
        "preferred_username": upn,
    }
    if "profile" in scope:
        claims["name"] = user.name
    if "email" in scope and user.email:
        claims["email"] = (
            user.email
        )  # an optional claim in Entra: added in the app's token configuration
    groups = [stable_uuid("entra-group", g) for g in user.groups]
    if len(groups) > ENTRA_GROUP_LIMIT:
        claims["_claim_names"] = {"groups": "src1"}
        claims["_claim_sources"] = {
            "src1": {"endpoint": f"https://graph.microsoft.com/v1.0/users/{oid}/getMemberObjects"}
        }
    else:
        claims["groups"] = groups
    return claims


def _okta(user: ShapedUser, scope: tuple[str, ...], client_id: str) -> dict[str, Any]:
    # Okta custom authorization server: the login (an e-mail address) in preferred_username,
    # groups by name when the "groups" claim is configured and its scope asked for.
    login = user.email or f"{user.username}@example.okta"
    claims: dict[str, Any] = {
        "sub": "00u" + hashlib.sha256(user.username.encode()).hexdigest()[:17],
        "ver": 1,
        "amr": ["pwd"],
        "idp": "00o1okta0000000000x7",
        "preferred_username": login,
    }
    if "profile" in scope:
        claims["name"] = user.name
    if "email" in scope and user.email:
        claims["email"] = user.email
        claims["email_verified"] = True
    if "groups" in scope:
        claims["groups"] = list(user.groups)
    return claims


def _google(user: ShapedUser, scope: tuple[str, ...], client_id: str) -> dict[str, Any]:
    # Google: a numeric sub, the address in email; no groups at all, and "hd" names the
    # Workspace domain (absent for consumer accounts).
    claims: dict[str, Any] = {
        "sub": _digits(user.username, 21),
        "azp": client_id,
        "email": user.email or f"{user.username}@gmail.com",
        "email_verified": True,
    }
    domain = claims["email"].rsplit("@", 1)[-1]
    if domain != "gmail.com":
        claims["hd"] = domain
    if "profile" in scope:
        claims["name"] = user.name
    return claims


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    issuer_path: str
    """Appended to http://host:port to make the issuer."""
    endpoints: Mapping[str, str | None]
    """authorize, token, jwks, userinfo, end_session: paths from the origin ({issuer} is the
    issuer's path); None: the provider has no such endpoint."""
    algorithm: str
    claims: ClaimMaker
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    extra_claims_supported: tuple[str, ...] = field(default=())


def _under_issuer(**paths: str | None) -> dict[str, str | None]:
    return {k: (None if v is None else "{issuer}" + v) for k, v in paths.items()}


GENERIC: Final = Shape(
    "generic",
    "",
    _under_issuer(
        authorize="/authorize",
        token="/token",
        jwks="/jwks.json",
        userinfo="/userinfo",
        end_session="/end_session",
    ),
    "ES256",
    _generic,
    ("openid", "email", "profile", "groups"),
)
SHAPES: Final[Mapping[str, Shape]] = {
    "generic": GENERIC,
    "keycloak": Shape(
        "keycloak",
        "/realms/demo",
        _under_issuer(
            authorize="/protocol/openid-connect/auth",
            token="/protocol/openid-connect/token",
            jwks="/protocol/openid-connect/certs",
            userinfo="/protocol/openid-connect/userinfo",
            end_session="/protocol/openid-connect/logout",
        ),
        "RS256",
        _keycloak,
        ("openid", "email", "profile", "roles", "offline_access"),
        ("realm_access", "azp", "typ"),
    ),
    "entra": Shape(
        "entra",
        f"/{ENTRA_TENANT}/v2.0",
        {
            "authorize": f"/{ENTRA_TENANT}/oauth2/v2.0/authorize",
            "token": f"/{ENTRA_TENANT}/oauth2/v2.0/token",
            "jwks": f"/{ENTRA_TENANT}/discovery/v2.0/keys",
            "userinfo": "/oidc/userinfo",
            "end_session": f"/{ENTRA_TENANT}/oauth2/v2.0/logout",
        },
        "RS256",
        _entra,
        ("openid", "email", "profile", "offline_access"),
        ("oid", "tid", "ver", "_claim_names", "_claim_sources"),
    ),
    "okta": Shape(
        "okta",
        "/oauth2/default",
        _under_issuer(
            authorize="/v1/authorize",
            token="/v1/token",
            jwks="/v1/keys",
            userinfo="/v1/userinfo",
            end_session="/v1/logout",
        ),
        "RS256",
        _okta,
        ("openid", "email", "profile", "groups", "offline_access"),
        ("ver", "amr", "idp"),
    ),
    "google": Shape(
        "google",
        "",
        {
            "authorize": "/o/oauth2/v2/auth",
            "token": "/token",
            "jwks": "/oauth2/v3/certs",
            "userinfo": "/v1/userinfo",
            "end_session": None,
        },
        "RS256",
        _google,
        ("openid", "email", "profile"),
        ("hd", "azp"),
    ),
}
