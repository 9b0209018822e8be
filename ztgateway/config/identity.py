"""Who a request can be: `[issuers.NAME]` (bearer JWTs and their claim mappings), `[oidc]`
(browser sign-in providers), `[assertion]` (the identity the gateway signs for upstreams) and
`[keys]` (the root of the gateway's own keys)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from yarl import URL

from ..configreader import Table
from ..credentials.jwt import IssuerConfig
from ..credentials.oidc import OIDCClaims, OIDCProviderConfig
from .listener import ServerConfig


@dataclass(frozen=True, slots=True)
class ClaimMapping:
    """Which token claims carry the user, email, groups, roles and scopes, per issuer."""

    user: str = "sub"
    email: str = "email"
    groups: str = "groups"
    roles: str = "roles"
    scopes: str = "scope"
    require_email_verified: bool = False
    """Take the e-mail only with `email_verified: true`; by default only `false` drops it."""
    user_namespace: str = ""
    """"" : the issuer's users are the directory's (the client certificates' and the OIDC
    provider's): "alice" is one person whichever of them says so. Otherwise its users are
    "<namespace>:<user>", never the same as anyone else's (security review L8)."""


@dataclass(frozen=True, slots=True)
class AssertionConfig:
    key: Path | None
    ttl: int = 60
    issuer: str = ""
    also_publish: tuple[Path, ...] = ()
    """Keys published in /.ztgw/jwks.json beside the signing key: the next one before a
    rotation, the previous one after it (docs/deploy.md)."""


@dataclass(frozen=True, slots=True)
class KeysConfig:
    """Where the root of the gateway's own keys comes from (keys.py); neither: the store."""

    file: Path | None = None
    env: str = "ZTGW_GATEWAY_KEY"


@dataclass(frozen=True, slots=True)
class OIDCConfig:
    """Browser sign-in: the providers people sign in with, in the configuration's order (none
    when no [oidc] section is configured)."""

    providers: tuple[OIDCProviderConfig, ...] = ()
    post_logout_path: str = "/.ztgw/signed-out"
    backchannel_logout: bool = True
    """Accept the provider's logout tokens at /.ztgw/oidc/backchannel-logout (docs/signals.md)."""

    @property
    def provider(self) -> OIDCProviderConfig | None:
        """The first provider (the only one in the single-provider form), or None."""
        return self.providers[0] if self.providers else None

    def get(self, name: str) -> OIDCProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.providers)


def parse_issuers(
    tables: dict[str, Table], claim_maps: dict[str, ClaimMapping]
) -> tuple[IssuerConfig, ...]:
    out = []
    implicit: list[str] = []
    for name, t in tables.items():
        c = t.table("claims")
        d = ClaimMapping()
        claim_maps[name] = ClaimMapping(
            user=c.text("user", d.user),
            email=c.text("email", d.email),
            groups=c.text("groups", d.groups),
            roles=c.text("roles", d.roles),
            scopes=c.text("scopes", d.scopes),
            require_email_verified=t.flag("require_email_verified", False),
            user_namespace=_namespace(t, implicit),
        )
        c.done()
        jwks_url = t.text("jwks_url")
        jwks_file = t.path("jwks_file")
        if (jwks_url is None) == (jwks_file is None):
            t.fail("jwks_url", "exactly one of jwks_url and jwks_file must be set")
        if jwks_url is not None and URL(jwks_url).scheme not in ("http", "https"):
            t.fail("jwks_url", "must be an http(s) URL")
        audiences = t.str_list("audiences")
        if not audiences:
            t.fail("audiences", "at least one audience is required")
        algorithms = t.str_list("algorithms", ("ES256",))
        try:
            issuer = IssuerConfig(
                name=name,
                issuer=t.text("issuer", required=True),
                audiences=audiences,
                algorithms=algorithms,
                jwks_url=jwks_url,
                jwks_file=jwks_file,
                jwks_ca_file=t.path("jwks_ca"),
                leeway=t.duration("leeway", 30.0, min=0.0, max=600.0),
                max_token_age=t.duration("max_token_age", None, min=1.0),
                refresh_interval=t.duration("refresh_interval", 60.0, min=1.0),
                jwks_max_age=t.duration("jwks_max_age", 3600.0, min=1.0),
                jwks_timeout=t.duration("jwks_timeout", 5.0, min=0.1),
            )
        except ValueError as exc:
            t.fail("algorithms", str(exc))
        t.done()
        out.append(issuer)
    return tuple(out)


_NAMESPACE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def _namespace(t: Table, implicit: list[str]) -> str:
    """An issuer's user namespace. Two issuers that could mint the same `sub` for different
    people must not both fall into the directory's names unnoticed: sharing it is stated."""
    value: str | None = t.text("user_namespace")
    if value is None:
        if implicit:
            t.fail(
                "user_namespace",
                f"issuers {implicit[0]!r} and this one would share user names: give each its "
                'own user_namespace, or user_namespace = "" to each that speaks for the '
                "directory's users",
            )
        implicit.append(t.where.rpartition(".")[2])
        return ""
    if value and not _NAMESPACE.match(value):
        t.fail("user_namespace", "lower-case letters, digits, '.', '-' and '_'")
    return value


def parse_assertion(t: Table) -> AssertionConfig:
    cfg = AssertionConfig(
        key=t.path("key"),
        ttl=int(t.duration("ttl", 60, min=5, max=3600)),
        issuer=t.text("issuer", ""),
        also_publish=_key_files(t, "also_publish"),
    )
    t.done()
    return cfg


def _key_files(t: Table, name: str) -> tuple[Path, ...]:
    from ..forward.assertion import load_public_keys

    paths = []
    for i, value in enumerate(t.str_list(name)):
        path = (t.file.parent / value).resolve()
        if not path.exists():
            t.fail(f"{name}[{i}]", f"file not found: {path}")
        try:
            load_public_keys([path])
        except ValueError as exc:
            t.fail(f"{name}[{i}]", str(exc))
        paths.append(path)
    return tuple(paths)


def claim_values(t: Table) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`claim = "value"` or `claim = ["a", "b"]` for every claim the table names."""
    out = []
    for name in list(t.data):
        value = t.data[name]
        values = (value,) if isinstance(value, str) else value
        if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
            t.fail(name, "must be a string or a list of strings")
        t._read.add(name)
        out.append((name, tuple(values)))
    t.done()
    return tuple(out)


_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


# Sub-tables of the single-provider form: not provider names in the several-providers form.
_OIDC_RESERVED = frozenset({"claims", "required_claims"})


LEGACY_CALLBACK_PATH = "/.ztgw/oidc/callback"


def parse_oidc(t: Table, server: ServerConfig, issuer_namespaces: dict[str, str]) -> OIDCConfig:
    """`[oidc]` with `issuer` is the single-provider form (kept: one provider, its name from
    `name`, its users the directory's); otherwise each `[oidc.NAME]` table is a provider."""
    if not t.data:
        t.done()
        return OIDCConfig()
    post_logout_path = t.text("post_logout_path", "/.ztgw/signed-out")
    # Every provider's logout tokens (OIDC Back-Channel Logout 1.0; signals/backchannel.py).
    backchannel = t.flag("backchannel_logout", True)
    if t.has("issuer"):
        provider = _oidc_provider(t, t.text("name", "oidc"), server, legacy=True)
        t.done()
        _check_providers(t, [provider], set(), issuer_namespaces)
        return OIDCConfig(
            providers=(provider,),
            post_logout_path=post_logout_path,
            backchannel_logout=backchannel,
        )
    providers: list[OIDCProviderConfig] = []
    defaulted: set[str] = set()
    for name in list(t.data):
        if name in ("post_logout_path", "backchannel_logout"):
            continue
        if not isinstance(t.data[name], dict):
            t.fail(
                name,
                "unknown key: set `issuer` (and the rest) for one provider, or give each "
                "provider its own [oidc.NAME] table",
            )
        if name in _OIDC_RESERVED or not _PROVIDER_NAME.match(name):
            t.fail(
                name,
                "a provider's name is lower-case letters, digits, '-' and '_' (at most 32; "
                f"not {', '.join(sorted(_OIDC_RESERVED))}): it is in URLs and metrics labels",
            )
        pt = t.table(name)
        if not pt.has("user_namespace"):
            defaulted.add(name)
        providers.append(_oidc_provider(pt, name, server, legacy=False))
        pt.done()
    t.done()
    if not providers:
        t.fail("", "no provider: add an [oidc.NAME] table (or remove [oidc])")
    _check_providers(t, providers, defaulted, issuer_namespaces)
    return OIDCConfig(
        providers=tuple(providers),
        post_logout_path=post_logout_path,
        backchannel_logout=backchannel,
    )


def _check_providers(
    t: Table,
    providers: list[OIDCProviderConfig],
    defaulted: set[str],
    issuer_namespaces: dict[str, str],
) -> None:
    """Two providers never share users, nor callbacks (RFC 9700 §4.4.2: a distinct redirect
    URI per provider is the defence against mix-up attacks)."""
    namespaces: dict[str, str] = {}
    paths: dict[str, str] = {}
    for p in providers:
        if not p.callback_path.startswith(LEGACY_CALLBACK_PATH):
            t.fail(
                f"{p.name}.redirect_uri",
                f"the gateway answers callbacks under {LEGACY_CALLBACK_PATH} only, not at "
                f"{p.callback_path!r}",
            )
        other = namespaces.get(p.user_namespace)
        if other is not None:
            what = (
                "the directory's users"
                if not p.user_namespace
                else f"user_namespace {p.user_namespace!r}"
            )
            t.fail(
                f"{p.name}.user_namespace",
                f"providers {other!r} and {p.name!r} would share {what}: at most one provider "
                'speaks for the directory (user_namespace = ""), the others need their own',
            )
        namespaces[p.user_namespace] = p.name
        issuer = issuer_namespaces.get(p.user_namespace) if p.user_namespace else None
        if issuer is not None and p.name in defaulted:
            # An issuer's namespace is shared only when the configuration says so.
            t.fail(
                f"{p.name}.user_namespace",
                f"issuer {issuer!r} has user_namespace {p.user_namespace!r} too: set "
                f'user_namespace = "{p.user_namespace}" here if they are the same people, '
                "or another name",
            )
        other = paths.get(p.callback_path)
        if other is not None:
            t.fail(
                f"{p.name}.redirect_uri",
                f"the same callback path as provider {other!r}: each provider needs its own "
                "redirect_uri (RFC 9700 §4.4.2)",
            )
        paths[p.callback_path] = p.name


def _oidc_provider(
    t: Table, name: str, server: ServerConfig, *, legacy: bool
) -> OIDCProviderConfig:
    secret = t.text("client_secret")
    secret_file = t.path("client_secret_file")
    secret_env = t.text("client_secret_env")
    if sum(x is not None for x in (secret, secret_file, secret_env)) != 1:
        t.fail(
            "client_secret",
            "set exactly one of client_secret, client_secret_file, client_secret_env",
        )
    if secret_file is not None:
        secret = secret_file.read_text().strip()
    elif secret_env is not None:
        import os

        secret = os.environ.get(secret_env, "")
        if not secret:
            t.fail("client_secret_env", f"environment variable {secret_env} is not set")
    public = (
        server.public_url.rstrip("/")
        if server.public_url
        else f"https://{server.host}:{server.port}"
    )
    claims_t = t.table("claims")
    claims = OIDCClaims(
        user=claims_t.text("user", "sub"),
        email=claims_t.text("email", "email"),
        groups=claims_t.text("groups", "groups"),
    )
    claims_t.done()
    # The single-provider form keeps its callback and its users (the directory's); each named
    # provider has a callback of its own and, unless told otherwise, a name space of its own.
    callback = LEGACY_CALLBACK_PATH if legacy else f"{LEGACY_CALLBACK_PATH}/{name}"
    namespace: str = t.text("user_namespace", "" if legacy else name)
    if namespace and not _NAMESPACE.match(namespace):
        t.fail("user_namespace", "lower-case letters, digits, '.', '-' and '_'")
    display: str = t.text("display_name", "")
    if len(display) > 64 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in display):
        t.fail("display_name", "at most 64 printable characters")
    try:
        return OIDCProviderConfig(
            name=name,
            issuer=t.text("issuer", required=True),
            client_id=t.text("client_id", required=True),
            client_secret=str(secret),
            redirect_uri=t.text("redirect_uri", public + callback),
            scopes=t.str_list("scopes", ("openid", "email", "profile")),
            ca_file=t.path("ca_file"),
            claims=claims,
            leeway=t.duration("leeway", 30.0, min=0.0),
            max_auth_age=t.duration("max_auth_age", 600.0, min=10.0),
            max_pending_per_device=t.integer("max_pending_per_device", 5, min=1, max=100),
            required_claims=claim_values(t.table("required_claims")),
            display_name=display,
            user_namespace=namespace,
            accept_unlabelled=legacy,
        )
    except ValueError as exc:
        t.fail("", str(exc))
