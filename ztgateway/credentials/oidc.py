"""The OpenID Connect relying party: browser sign-in by authorization code flow with PKCE.

One `OIDCClient` per configured provider. It learns the provider's endpoints from its discovery
document, starts a login attempt (`begin`) and completes it from the provider's redirect
(`finish`), returning the verified identity. The gateway owns routes, cookies and pages; this
module owns every check that makes the callback trustworthy:

- `state` is random, single-use and short-lived, and kept server-side together with a hash of a
  value the caller puts in a short-lived cookie: a callback is accepted only from the browser that
  started the attempt, which defeats login CSRF (RFC 6749 §10.12, RFC 9700 §4.7), and a replayed
  or stale callback is refused;
- PKCE S256 (RFC 7636) binds the authorization code to this attempt, so an intercepted code is
  useless to anyone else (RFC 9700 §2.1.1);
- the ID token is verified by the same strict verifier as bearer tokens (`TokenVerifier`): the
  signature with the provider's JWKS and only asymmetric algorithms the provider announces, the
  issuer exactly, our client id in the audience, the times with leeway; then the `nonce`, `azp`
  and `at_hash` of OIDC Core §3.1.3.7-§3.1.3.8.

Pending attempts are kept by a `PendingLogins` (the gateway's is its shared store, so a sign-in
started on one worker or replica may come back to another), expiring with `max_auth_age` and
bounded per source (the device that started them): one client looping on "sign in" only ever
evicts its own attempts, never everyone else's (issue 18, I5).

Why one module of about a thousand lines: every check in `OIDCClient` guards the same callback,
and the threat (a forged, replayed or cross-browser callback) is read best in one place;
discovery, the attempt store and the token checks split apart would each see only part of it.
The token verifier (jwt.py), the keys (jwks.py) and the provider list (providers.py) are their
own modules.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import ssl
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

from ztgateway.clock import SYSTEM_CLOCK
from ztgateway.credentials.jwt import IssuerConfig, TokenError, TokenVerifier
from ztgateway.decision import Reason
from ztgateway.edge.inline import in_task

logger = logging.getLogger(__name__)

# SECURITY: RFC 8725 §3.1-§3.2: only asymmetric algorithms, intersected with what the provider
# announces; "none" and HS* (which would make the client secret a signing key shared with every
# holder of it) are never accepted for ID tokens.
SAFE_ID_TOKEN_ALGORITHMS: Final = ("ES256", "PS256", "RS256", "EdDSA")
# OIDC Core §3.1.3.8 with the EdDSA errata: the at_hash digest is the hash of the signature
# algorithm (SHA-512 for Ed25519).
_AT_HASH_DIGESTS: Final[Mapping[str, Callable[[bytes], Any]]] = MappingProxyType(
    {
        "RS256": hashlib.sha256,
        "PS256": hashlib.sha256,
        "ES256": hashlib.sha256,
        "EdDSA": hashlib.sha512,
    }
)
MAX_DOCUMENT_BYTES: Final = 1 << 20
# How often a failed discovery may be retried by incoming logins: an IdP that is down is not
# hammered by every browser that arrives, and one that comes back is picked up quickly.
DISCOVERY_RETRY_SECONDS: Final = 5.0
# A provider error code is echoed into the audit detail only in this shape (RFC 6749 §4.1.2.1:
# error codes are %x20-21 / %x23-5B / %x5D-7E); anything else is attacker-chosen noise.
_MAX_ERROR_CHARS: Final = 64
_COOKIE_LABEL: Final = b"ztgw-oidc-login-v1"


class OIDCReason(enum.StrEnum):
    """Why a login failed: a closed vocabulary, so metrics labels stay bounded."""

    STATE_INVALID = "state-invalid"  # missing, unknown, replayed, expired, or not this browser's
    NONCE_INVALID = "nonce-invalid"
    CODE_EXCHANGE_FAILED = "code-exchange-failed"
    ID_TOKEN_INVALID = "id-token-invalid"  # noqa: S105 - a reason code, not a password
    PROVIDER_UNAVAILABLE = "provider-unavailable"
    LOGIN_DENIED = "login-denied"  # the provider answered error=...


class OIDCError(Exception):
    """A login attempt failed. `detail` is for the log and audit, never for the browser."""

    def __init__(self, reason: OIDCReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class OIDCClaims:
    """Which ID token claims carry the user name, e-mail and groups.

    A name is a claim, or a dotted path into nested claims when no claim has that exact name
    (`realm_access.roles`: Keycloak's realm roles; a namespaced claim such as
    `https://example.com/groups` is found by its exact name first).
    """

    user: str = "sub"
    email: str = "email"
    groups: str = "groups"


def claim_at(claims: Mapping[str, Any], name: str) -> Any:
    """The claim `name`, else the value at its dotted path; None when neither exists."""
    if name in claims:
        return claims[name]
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(value: object, what: str, *, allow_http: bool) -> str:
    """An absolute http(s) URL without fragment; plain http only for loopback development."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute http(s) URL, not {value!r}")
    # SECURITY: RFC 9700 §2.6 / OIDC Discovery §3: endpoints are https; plain http is tolerated
    # only on loopback (the dev IdP), where nothing crosses a network.
    if parts.scheme == "http" and not (allow_http and _is_loopback(parts.hostname)):
        raise ValueError(f"{what} must use https (http only on loopback), not {value!r}")
    if parts.fragment or "#" in value:
        raise ValueError(f"{what} must not have a fragment")
    return value


@dataclass(frozen=True, slots=True)
class OIDCProviderConfig:
    """One OpenID Provider this gateway signs browsers in with. Validated at construction.

    `max_auth_age` is how long a login attempt (its `state`) stays valid: long enough to type a
    password and a second factor at the provider, short enough that a leaked callback URL dies.
    """

    name: str
    issuer: str
    client_id: str
    client_secret: str = field(repr=False)
    redirect_uri: str
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    ca_file: Path | None = None
    claims: OIDCClaims = field(default_factory=OIDCClaims)
    leeway: float = 30.0
    max_auth_age: float = 600.0
    timeout: float = 10.0
    max_pending: int = 10_000
    max_pending_per_device: int = 5
    required_claims: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Sign-in is refused unless each claim (or dotted path) equals, or as a list contains,
    one of its values: `hd = ["example.com"]` keeps a Google sign-in to one Workspace domain."""
    display_name: str = ""
    """What the sign-in chooser calls this provider ("" = its name)."""
    user_namespace: str = ""
    """"": this provider's users (and groups) are the directory's, the same people as the
    client certificates' UIDs. Otherwise they are "<namespace>:<user>" (and its groups
    "<namespace>:<group>"): never the same as another provider's "alice" (docs/oidc.md)."""
    accept_unlabelled: bool = False
    """Finish login attempts stored without a provider name (written by a gateway version that
    had only the one `[oidc]` provider): only the single-provider form sets it, so a rolling
    upgrade does not fail the sign-ins in flight."""

    @property
    def label(self) -> str:
        return self.display_name or self.name

    @property
    def callback_path(self) -> str:
        """The path of `redirect_uri`: where this provider's callbacks arrive."""
        return urlsplit(self.redirect_uri).path or "/"

    def qualify(self, name: str) -> str:
        """A user or group name of this provider as the gateway knows it (its namespace)."""
        return f"{self.user_namespace}:{name}" if self.user_namespace else name

    def __post_init__(self) -> None:
        where = f"oidc provider {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("oidc provider name must be a non-empty string")
        _check_url(self.issuer, f"{where}: 'issuer'", allow_http=True)
        # OIDC Discovery §3 ("issuer"): no query or fragment.
        if urlsplit(self.issuer).query:
            raise ValueError(f"{where}: 'issuer' must not have a query")
        if not isinstance(self.client_id, str) or not self.client_id:
            raise ValueError(f"{where}: 'client_id' must be a non-empty string")
        if not isinstance(self.client_secret, str) or not self.client_secret:
            raise ValueError(f"{where}: 'client_secret' must be a non-empty string")
        _check_url(self.redirect_uri, f"{where}: 'redirect_uri'", allow_http=True)
        if not isinstance(self.scopes, tuple) or not all(
            isinstance(s, str) and s and " " not in s for s in self.scopes
        ):
            raise ValueError(f"{where}: 'scopes' must be a tuple of scope tokens")
        # OIDC Core §3.1.2.1: without "openid" the request is plain OAuth and no ID token comes.
        if "openid" not in self.scopes:
            raise ValueError(f"{where}: 'scopes' must include 'openid'")
        for attr in ("user", "email", "groups"):
            if not getattr(self.claims, attr):
                raise ValueError(f"{where}: claim name for {attr!r} must not be empty")
        if self.leeway < 0:
            raise ValueError(f"{where}: 'leeway' must not be negative")
        if (
            self.max_auth_age <= 0
            or self.timeout <= 0
            or self.max_pending <= 0
            or self.max_pending_per_device <= 0
        ):
            raise ValueError(
                f"{where}: 'max_auth_age', 'timeout', 'max_pending', 'max_pending_per_device' "
                "must be positive"
            )
        if self.ca_file is not None and urlsplit(self.issuer).scheme != "https":
            raise ValueError(f"{where}: 'ca_file' needs an https 'issuer'")


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """The parts of the discovery document (OIDC Discovery §3) this client relies on."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: tuple[str, ...]
    token_auth_method: str
    end_session_endpoint: str | None
    userinfo_endpoint: str | None
    iss_parameter: bool = False
    """RFC 9207 §3: the provider puts `iss` in its authorization responses, so one without it
    (or with another issuer) did not come from this provider."""


@dataclass(frozen=True, slots=True)
class LoginStart:
    """Where to send the browser, and the value to set in a short-lived `__Host-` cookie.

    The cookie binds this browser to the attempt: the caller sets it (Secure, HttpOnly,
    SameSite=Lax so it rides along the provider's top-level redirect back, Path=/, Max-Age =
    `max_auth_age`) and passes it back to `finish`.
    """

    authorization_url: str
    state: str
    cookie_value: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class LoginResult:
    """A verified sign-in: who, from the ID token's claims, and where the user wanted to go."""

    subject: str
    user: str
    email: str | None
    groups: tuple[str, ...]
    claims: Mapping[str, Any]
    id_token: str = field(repr=False)
    return_to: str


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """One login attempt between `begin` and `finish` (only a hash of the cookie is kept)."""

    nonce: str
    code_verifier: str
    cookie_hash: bytes
    return_to: str
    created: float
    provider: str = ""
    """The provider the attempt was started with; "" in attempts stored by older versions."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "nonce": self.nonce,
                "code_verifier": self.code_verifier,
                "cookie_hash": _b64url(self.cookie_hash),
                "return_to": self.return_to,
                "created": self.created,
                "provider": self.provider,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PendingLogin:
        d = json.loads(text)
        return cls(
            nonce=str(d["nonce"]),
            code_verifier=str(d["code_verifier"]),
            cookie_hash=base64.urlsafe_b64decode(str(d["cookie_hash"]) + "=="),
            return_to=str(d["return_to"]),
            created=float(d["created"]),
            provider=str(d.get("provider", "")),
        )


class PendingLogins(Protocol):
    """Where login attempts wait for their callback. `take` is single-use (atomic get and
    delete); `put` keeps at most `per_source` attempts per source, evicting that source's
    oldest."""

    async def put(
        self, state: str, pending: PendingLogin, *, source: str, expires: float, per_source: int
    ) -> None: ...
    async def take(self, state: str, source: str, now: float) -> PendingLogin | None: ...
    def count(self) -> int | None: ...
    def clear(self) -> None: ...


class MemoryPendingLogins:
    """In one process's memory: for a single process (and the unit tests). Bounded overall by
    `max_pending` too, oldest first."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._pending: OrderedDict[str, tuple[PendingLogin, str, float]] = OrderedDict()

    async def put(
        self, state: str, pending: PendingLogin, *, source: str, expires: float, per_source: int
    ) -> None:
        now = pending.created
        # Insertion order is creation order, so expired attempts are all at the front.
        while self._pending:
            first, (_, _, until) = next(iter(self._pending.items()))
            if until > now:
                break
            del self._pending[first]
        mine = [s for s, (_, src, _) in self._pending.items() if src == source]
        for old in mine[: max(0, len(mine) - per_source + 1)]:
            del self._pending[old]
        self._pending[state] = (pending, source, expires)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    async def take(self, state: str, source: str, now: float) -> PendingLogin | None:
        entry = self._pending.get(state)
        if entry is None or entry[1] != source:
            return None
        del self._pending[state]
        return entry[0] if entry[2] > now else None

    def count(self) -> int | None:
        return len(self._pending)

    def clear(self) -> None:
        self._pending.clear()


class LoginStore(Protocol):
    """The part of the gateway's Store that keeps login attempts (store/base.py)."""

    async def put_pending_login(
        self, state: str, source: str, data: str, expires: float, per_source: int
    ) -> None: ...
    async def take_pending_login(self, state: str, source: str, now: float) -> str | None: ...


class StorePendingLogins:
    """Login attempts in the gateway's shared store: every worker and replica finishes what
    another started."""

    def __init__(self, store: LoginStore) -> None:
        self.store = store

    async def put(
        self, state: str, pending: PendingLogin, *, source: str, expires: float, per_source: int
    ) -> None:
        await self.store.put_pending_login(state, source, pending.to_json(), expires, per_source)

    async def take(self, state: str, source: str, now: float) -> PendingLogin | None:
        data = await self.store.take_pending_login(state, source, now)
        return PendingLogin.from_json(data) if data is not None else None

    def count(self) -> int | None:
        return None  # kept by the store; not counted per process

    def clear(self) -> None:
        pass  # the store's rows belong to every process, and expire on their own


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 §4.2 S256: BASE64URL(SHA256(ASCII(code_verifier)))."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def safe_return_path(value: str | None) -> str | None:
    """`value` if it is a path on this origin, else None: the one check against open redirects.

    Accepts "/x?y" but not "//evil", "/\\evil" (browsers treat a backslash as a slash), a scheme,
    a fragment-only or relative reference, or control characters (header splitting).
    """
    if not value or len(value) > 2048 or not value.startswith("/"):
        return None
    if value.startswith(("//", "/\\")) or "\\" in value:
        return None
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in value):
        return None
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return None
    return value


def _append_query(url: str, params: Mapping[str, str]) -> str:
    """Add parameters, keeping any query the endpoint already has (RFC 6749 §3.1)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query.extend(params.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def _provider_error_text(value: str) -> str:
    text = value[:_MAX_ERROR_CHARS]
    if all(0x20 <= ord(c) <= 0x7E and c not in '"\\' for c in text):
        return text
    return "<malformed error code>"


def _client_basic_auth(client_id: str, client_secret: str) -> str:
    """RFC 6749 §2.3.1: id and secret are form-urlencoded *before* Basic encoding."""
    pair = f"{urlencode({'': client_id})[1:]}:{urlencode({'': client_secret})[1:]}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


class OIDCClient:
    """The relying party for one provider: `begin` a login, `finish` it from the callback.

    `session_factory` returns the application's shared aiohttp session (used, never closed);
    without it the client opens its own at `start` (no cookie jar: RFC 8725 §3.10). `secret` keys
    the MAC on the login cookie and `pending` keeps the attempts: the gateway passes a key every
    process derives alike (keys.py) and its shared store; when omitted, a random key and this
    process's memory, which suits one process only.
    """

    def __init__(
        self,
        cfg: OIDCProviderConfig,
        *,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = SYSTEM_CLOCK.time,
        secret: bytes | None = None,
        pending: PendingLogins | None = None,
    ) -> None:
        if secret is not None and len(secret) < 32:
            raise ValueError("the login cookie secret must be at least 32 bytes")
        self.cfg = cfg
        self._session_factory = session_factory
        self._own_session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._metadata: ProviderMetadata | None = None
        self._verifier: TokenVerifier | None = None
        self._discovery_lock = asyncio.Lock()
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        self._ssl: ssl.SSLContext | None = None
        self._pending: PendingLogins = (
            pending if pending is not None else MemoryPendingLogins(cfg.max_pending)
        )
        self._closed = False

    async def __aenter__(self) -> OIDCClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def metadata(self) -> ProviderMetadata | None:
        """The validated discovery document, once fetched."""
        return self._metadata

    async def discovered(self) -> ProviderMetadata:
        """The discovery document, fetched now if it has not been (OIDCError if it cannot):
        what the back-channel logout endpoint verifies logout tokens with (signals/)."""
        return await self._ensure_discovered()

    def _session(self) -> aiohttp.ClientSession:
        if self._session_factory is not None:
            return self._session_factory()
        if self._own_session is None:
            raise RuntimeError("OIDCClient used before start()")
        return self._own_session

    async def start(self) -> None:
        """Open the HTTP session and try discovery once; a provider that is down is only logged.

        Logins are refused with `provider-unavailable` until discovery succeeds; `begin` retries
        at most every DISCOVERY_RETRY_SECONDS.
        """
        if self.cfg.ca_file is not None and self._ssl is None:
            self._ssl = await asyncio.to_thread(
                ssl.create_default_context, cafile=str(self.cfg.ca_file)
            )
        if self._session_factory is None and self._own_session is None:
            self._own_session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        try:
            await self._ensure_discovered()
        except OIDCError as exc:
            logger.warning(
                "oidc provider %s: discovery failed, will retry on login: %s",
                self.cfg.name,
                exc.detail,
            )

    async def close(self) -> None:
        self._closed = True
        verifier, self._verifier = self._verifier, None
        if verifier is not None:
            await verifier.close()
        session, self._own_session = self._own_session, None
        if session is not None:
            await session.close()
        self._pending.clear()

    def status(self) -> dict[str, Any]:
        """For /readyz and logs: whether logins can start, and why not."""
        return {
            "discovered": self._metadata is not None,
            "last_error": self._last_error,
            "pending_logins": self._pending.count(),
            "jwks": (
                self._verifier.jwks_status().get(self._issuer_name)
                if self._verifier is not None
                else None
            ),
        }

    @property
    def _issuer_name(self) -> str:
        return f"oidc:{self.cfg.name}"

    # -- discovery ---------------------------------------------------------------------------

    async def _ensure_discovered(self) -> ProviderMetadata:
        metadata = self._metadata
        if metadata is not None:
            return metadata
        async with self._discovery_lock:
            return await self._discover_locked()

    async def _discover_locked(self) -> ProviderMetadata:
        # Another caller may have finished discovery while this one waited for the lock.
        if self._metadata is not None:
            return self._metadata
        now = self._clock()
        if (
            self._last_attempt is not None
            and now - self._last_attempt < DISCOVERY_RETRY_SECONDS
            and self._last_error is not None
        ):
            raise OIDCError(OIDCReason.PROVIDER_UNAVAILABLE, self._last_error)
        self._last_attempt = now
        try:
            metadata = await self._discover()
            try:
                issuer_config = self._issuer_config(metadata)
            except ValueError as exc:
                raise OIDCError(OIDCReason.PROVIDER_UNAVAILABLE, f"discovery: {exc}") from exc
        except OIDCError as exc:
            self._last_error = exc.detail
            raise
        verifier = TokenVerifier(
            [issuer_config],
            clock=self._clock,
            session_factory=self._session,
            # An ID token is presented once; caching it would only keep claims around.
            cache_size=0,
        )
        await verifier.start()
        self._verifier = verifier
        self._metadata = metadata
        self._last_error = None
        logger.info(
            "oidc provider %s: discovered %s (algorithms %s)",
            self.cfg.name,
            metadata.issuer,
            ",".join(metadata.algorithms),
        )
        return metadata

    def _issuer_config(self, metadata: ProviderMetadata) -> IssuerConfig:
        https_keys = urlsplit(metadata.jwks_uri).scheme == "https"
        return IssuerConfig(
            name=self._issuer_name,
            issuer=self.cfg.issuer,
            # OIDC Core §3.1.3.7 item 3: our client_id must be among the audiences.
            audiences=(self.cfg.client_id,),
            algorithms=metadata.algorithms,
            jwks_url=metadata.jwks_uri,
            jwks_ca_file=self.cfg.ca_file if https_keys else None,
            leeway=self.cfg.leeway,
            # OIDC Core §3.1.3.7 item 10: an ID token is minted at the code exchange, so one
            # issued longer ago than a login attempt may last is not from this login.
            max_token_age=self.cfg.max_auth_age + self.cfg.leeway,
            jwks_timeout=self.cfg.timeout,
        )

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        await in_task()  # aiohttp's timers need one
        try:
            # SECURITY: no redirects: the configured issuer is the trust anchor, and a redirect
            # would let whoever answers at that URL send us elsewhere.
            async with self._session().get(
                url,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
                allow_redirects=False,
                ssl=self._ssl if self._ssl is not None else True,
                headers={"Accept": "application/json"},
            ) as response:
                body = await self._read_limited(response, url)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OIDCError(
                OIDCReason.PROVIDER_UNAVAILABLE, f"{what} {url}: {type(exc).__name__}: {exc}"
            ) from exc
        if status != 200:
            raise OIDCError(OIDCReason.PROVIDER_UNAVAILABLE, f"{what} {url}: HTTP {status}")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise OIDCError(OIDCReason.PROVIDER_UNAVAILABLE, f"{what} {url}: not JSON") from exc
        if not isinstance(document, dict):
            raise OIDCError(OIDCReason.PROVIDER_UNAVAILABLE, f"{what} {url}: not a JSON object")
        return document

    @staticmethod
    async def _read_limited(response: aiohttp.ClientResponse, url: str) -> bytes:
        length = response.content_length
        if length is not None and length > MAX_DOCUMENT_BYTES:
            raise aiohttp.ClientPayloadError(f"{url}: larger than {MAX_DOCUMENT_BYTES} bytes")
        body = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > MAX_DOCUMENT_BYTES:
                raise aiohttp.ClientPayloadError(f"{url}: larger than {MAX_DOCUMENT_BYTES} bytes")
        return bytes(body)

    async def _discover(self) -> ProviderMetadata:
        # OIDC Discovery §4: the issuer without its trailing slash, plus the well-known path.
        url = self.cfg.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self._get_json(url, "discovery")
        try:
            return self._parse_metadata(doc)
        except ValueError as exc:
            raise OIDCError(OIDCReason.PROVIDER_UNAVAILABLE, f"discovery {url}: {exc}") from exc

    def _parse_metadata(self, doc: Mapping[str, Any]) -> ProviderMetadata:
        # SECURITY: OIDC Discovery §4.3: the issuer in the document must be exactly the one we
        # asked for, or a provider could speak for another (and its tokens would carry that iss).
        if doc.get("issuer") != self.cfg.issuer:
            raise ValueError(f"issuer {doc.get('issuer')!r} is not exactly {self.cfg.issuer!r}")
        # Plain http endpoints are accepted only when the issuer itself is a loopback http one.
        allow_http = urlsplit(self.cfg.issuer).scheme == "http"

        def endpoint(name: str, *, required: bool) -> str | None:
            value = doc.get(name)
            if value is None and not required:
                return None
            return _check_url(value, f"{name!r}", allow_http=allow_http)

        algorithms_raw = doc.get("id_token_signing_alg_values_supported")
        if not isinstance(algorithms_raw, list):
            raise ValueError("'id_token_signing_alg_values_supported' is missing")
        algorithms = tuple(a for a in SAFE_ID_TOKEN_ALGORITHMS if a in algorithms_raw)
        if not algorithms:
            raise ValueError(
                f"no acceptable ID token algorithm in {algorithms_raw!r} "
                f"(accepted: {', '.join(SAFE_ID_TOKEN_ALGORITHMS)})"
            )
        response_types = doc.get("response_types_supported")
        if isinstance(response_types, list) and "code" not in response_types:
            raise ValueError("the provider does not support response_type=code")
        # RFC 8414 §2: an explicit list without S256 means PKCE would be ignored or refused.
        pkce = doc.get("code_challenge_methods_supported")
        if isinstance(pkce, list) and "S256" not in pkce:
            raise ValueError("the provider does not support PKCE S256")
        # OIDC Discovery §3: the default is client_secret_basic.
        auth_methods = doc.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
        if not isinstance(auth_methods, list):
            raise ValueError("'token_endpoint_auth_methods_supported' is not a list")
        if "client_secret_basic" in auth_methods:
            auth_method = "client_secret_basic"
        elif "client_secret_post" in auth_methods:
            auth_method = "client_secret_post"
        else:
            raise ValueError("the provider supports neither client_secret_basic nor _post")
        authorization = endpoint("authorization_endpoint", required=True)
        token = endpoint("token_endpoint", required=True)
        jwks = endpoint("jwks_uri", required=True)
        assert authorization is not None and token is not None and jwks is not None
        return ProviderMetadata(
            issuer=self.cfg.issuer,
            authorization_endpoint=authorization,
            token_endpoint=token,
            jwks_uri=jwks,
            algorithms=algorithms,
            token_auth_method=auth_method,
            end_session_endpoint=endpoint("end_session_endpoint", required=False),
            userinfo_endpoint=endpoint("userinfo_endpoint", required=False),
            iss_parameter=doc.get("authorization_response_iss_parameter_supported") is True,
        )

    # -- the login attempt -------------------------------------------------------------------

    def _cookie_mac(self, state: str, binder: str) -> str:
        parts = [_COOKIE_LABEL, state.encode("ascii"), binder.encode("ascii")]
        if not self.cfg.accept_unlabelled:
            # Several providers share the key: a cookie is good for its own provider only.
            parts.append(self.cfg.name.encode("utf-8"))
        message = b"\x00".join(parts)
        return _b64url(hmac.new(self._secret, message, hashlib.sha256).digest())

    async def begin(self, return_to: str, *, source: str = "-") -> LoginStart:
        """Start a login attempt that will bring the browser back to `return_to` (a local path).

        `source` names who started it (the gateway passes the device): each source keeps at
        most `max_pending_per_device` attempts, its oldest evicted first. Raises ValueError for
        a `return_to` that is not a same-origin path, and OIDCError (`provider-unavailable`)
        when the provider's discovery document cannot be had.
        """
        if self._closed:
            raise RuntimeError("OIDCClient is closed")
        checked = safe_return_path(return_to)
        if checked is None:
            raise ValueError("return_to must be a path on this origin")
        metadata = await self._ensure_discovered()
        now = self._clock()
        # 256 bits each: unguessable (RFC 6749 §10.10 asks for at least 128).
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        # RFC 7636 §4.1: 43-128 characters of the unreserved set; 64 random bytes give 86.
        code_verifier = secrets.token_urlsafe(64)
        binder = secrets.token_urlsafe(32)
        cookie_value = f"{binder}.{self._cookie_mac(state, binder)}"
        # Only a hash is kept, so a dump of the pending table does not hand out usable cookies.
        cookie_hash = hashlib.sha256(cookie_value.encode("ascii")).digest()
        await self._pending.put(
            state,
            PendingLogin(
                nonce=nonce,
                code_verifier=code_verifier,
                cookie_hash=cookie_hash,
                return_to=checked,
                created=now,
                provider=self.cfg.name,
            ),
            source=source,
            expires=now + self.cfg.max_auth_age,
            # Bounded per source: a flood of started logins evicts the flooder's own oldest
            # attempts, never another device's sign-in in flight.
            per_source=self.cfg.max_pending_per_device,
        )
        params = {
            "response_type": "code",
            "client_id": self.cfg.client_id,
            "redirect_uri": self.cfg.redirect_uri,
            "scope": " ".join(self.cfg.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": pkce_challenge(code_verifier),
            "code_challenge_method": "S256",
        }
        return LoginStart(
            authorization_url=_append_query(metadata.authorization_endpoint, params),
            state=state,
            cookie_value=cookie_value,
        )

    async def _take_pending(
        self, state: str | None, cookie_value: str | None, source: str
    ) -> PendingLogin:
        if not state or not state.isascii():
            raise OIDCError(OIDCReason.STATE_INVALID, "the callback has no usable state")
        # SECURITY: login CSRF (RFC 6749 §10.12, RFC 9700 §4.7.1): the state must come back to
        # the browser that started the attempt, proven by the cookie we asked it to keep. The
        # cookie's MAC is checked before the attempt table is touched, so a callback from
        # another browser (or a leaked callback URL) can neither probe nor burn the attempt.
        if not cookie_value or not cookie_value.isascii():
            raise OIDCError(OIDCReason.STATE_INVALID, "no login cookie for this state")
        binder, _, mac = cookie_value.partition(".")
        expected_mac = self._cookie_mac(state, binder)
        if not hmac.compare_digest(mac.encode("ascii"), expected_mac.encode("ascii")):
            raise OIDCError(OIDCReason.STATE_INVALID, "the login cookie is not for this state")
        # SECURITY: RFC 9700 §4.7.1 / RFC 6749 §10.12: state is single-use; from here on it is
        # gone whatever follows, so a replayed callback is worthless.
        now = self._clock()
        pending = await self._pending.take(state, source, now)
        if pending is None:
            raise OIDCError(OIDCReason.STATE_INVALID, "unknown, replayed, expired or evicted state")
        # SECURITY: RFC 9700 §4.4 (mix-up): an attempt started with one provider is finished
        # only by that provider's client, at that provider's redirect URI; a state that comes
        # back at another provider's callback is refused (and is spent).
        if pending.provider != self.cfg.name and not (
            pending.provider == "" and self.cfg.accept_unlabelled
        ):
            raise OIDCError(
                OIDCReason.STATE_INVALID,
                f"the login attempt was started with provider {pending.provider or '?'!r}",
            )
        if now - pending.created > self.cfg.max_auth_age:
            raise OIDCError(OIDCReason.STATE_INVALID, "the login attempt expired")
        # Defence in depth: only the very cookie handed out at begin() (kept as a hash) counts,
        # even for someone who learnt the MAC secret.
        presented = hashlib.sha256(cookie_value.encode("ascii")).digest()
        if not hmac.compare_digest(presented, pending.cookie_hash):
            raise OIDCError(OIDCReason.STATE_INVALID, "the login cookie is not the one issued")
        return pending

    async def finish(
        self,
        *,
        state: str | None,
        code: str | None,
        error: str | None,
        cookie_value: str | None,
        source: str = "-",
        iss: str | None = None,
    ) -> LoginResult:
        """Complete a login from the callback's query and the login cookie, or raise OIDCError.

        Nothing in the callback is believed before its state is matched to this browser's
        attempt (and to the `source` that began it); then a provider error is `login-denied`,
        and otherwise the code is exchanged and the ID token verified.
        """
        if self._closed:
            raise RuntimeError("OIDCClient is closed")
        pending = await self._take_pending(state, cookie_value, source)
        metadata = await self._ensure_discovered()
        # SECURITY: RFC 9207 §2.4 / RFC 9700 §4.4.2: with several providers, the authorization
        # response names its issuer; it must be this attempt's provider (required when the
        # provider says it sends it), so a response mixed up with another provider's is refused
        # before its code goes anywhere.
        if iss is not None and iss != self.cfg.issuer:
            raise OIDCError(OIDCReason.STATE_INVALID, "the response's iss is another provider")
        if iss is None and metadata.iss_parameter:
            raise OIDCError(OIDCReason.STATE_INVALID, "the response has no iss (RFC 9207)")
        if error is not None:
            raise OIDCError(
                OIDCReason.LOGIN_DENIED, f"provider error {_provider_error_text(error)!r}"
            )
        if not code:
            raise OIDCError(OIDCReason.CODE_EXCHANGE_FAILED, "the callback has no code")
        tokens = await self._exchange(metadata, code, pending.code_verifier)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise OIDCError(OIDCReason.CODE_EXCHANGE_FAILED, "the token response has no id_token")
        access_token = tokens.get("access_token")
        claims, algorithm = await self._verify_id_token(id_token)
        self._check_oidc_claims(
            claims,
            algorithm,
            nonce=pending.nonce,
            access_token=access_token if isinstance(access_token, str) else None,
        )
        return self._result(claims, id_token, pending.return_to)

    async def _exchange(
        self, metadata: ProviderMetadata, code: str, code_verifier: str
    ) -> dict[str, Any]:
        """The token request of RFC 6749 §4.1.3 with the PKCE verifier (RFC 7636 §4.5)."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.cfg.redirect_uri,
            "code_verifier": code_verifier,
        }
        headers = {"Accept": "application/json"}
        if metadata.token_auth_method == "client_secret_basic":  # noqa: S105 - a method name
            headers["Authorization"] = _client_basic_auth(
                self.cfg.client_id, self.cfg.client_secret
            )
        else:
            form["client_id"] = self.cfg.client_id
            form["client_secret"] = self.cfg.client_secret
        url = metadata.token_endpoint
        await in_task()  # aiohttp's timers need one
        try:
            async with self._session().post(
                url,
                data=form,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
                allow_redirects=False,
                ssl=self._ssl if self._ssl is not None else True,
            ) as response:
                body = await self._read_limited(response, url)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OIDCError(
                OIDCReason.PROVIDER_UNAVAILABLE, f"token endpoint: {type(exc).__name__}: {exc}"
            ) from exc
        if status >= 500:
            raise OIDCError(OIDCReason.PROVIDER_UNAVAILABLE, f"token endpoint: HTTP {status}")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            document = None
        if status != 200:
            # RFC 6749 §5.2: invalid_grant is also how a reused or expired code is reported.
            code_text = document.get("error") if isinstance(document, dict) else None
            shown = _provider_error_text(code_text) if isinstance(code_text, str) else "-"
            raise OIDCError(
                OIDCReason.CODE_EXCHANGE_FAILED, f"token endpoint: HTTP {status}, error {shown!r}"
            )
        if not isinstance(document, dict):
            raise OIDCError(OIDCReason.CODE_EXCHANGE_FAILED, "token response is not a JSON object")
        return document

    async def _verify_id_token(self, id_token: str) -> tuple[dict[str, Any], str]:
        verifier = self._verifier
        if verifier is None:
            raise OIDCError(OIDCReason.PROVIDER_UNAVAILABLE, "the provider is not discovered")
        try:
            verified = await verifier.verify(id_token)
        except TokenError as exc:
            if exc.reason is Reason.TOKEN_ISSUER_UNAVAILABLE:
                raise OIDCError(OIDCReason.PROVIDER_UNAVAILABLE, exc.detail) from exc
            raise OIDCError(
                OIDCReason.ID_TOKEN_INVALID, f"{exc.reason.value}: {exc.detail}"
            ) from exc
        return dict(verified.claims), verified.algorithm

    def _check_oidc_claims(
        self,
        claims: Mapping[str, Any],
        algorithm: str,
        *,
        nonce: str,
        access_token: str | None,
    ) -> None:
        """The OIDC Core §3.1.3.7 checks that a plain JWT verifier does not know about."""
        # OIDC Core §3.1.3.7 item 11 / §15.5.2: the nonce ties the ID token to this attempt.
        presented = claims.get("nonce")
        if not isinstance(presented, str) or not hmac.compare_digest(
            presented.encode("utf-8"), nonce.encode("utf-8")
        ):
            raise OIDCError(OIDCReason.NONCE_INVALID, "the ID token's nonce is not this login's")
        # OIDC Core §3.1.3.7 items 4-5: with several audiences azp must be present, and when
        # present it must be us (a token issued to another client is not ours to accept).
        aud = claims.get("aud")
        azp = claims.get("azp")
        if isinstance(aud, list) and len(aud) > 1 and azp is None:
            raise OIDCError(OIDCReason.ID_TOKEN_INVALID, "several audiences and no azp")
        if azp is not None and azp != self.cfg.client_id:
            raise OIDCError(OIDCReason.ID_TOKEN_INVALID, "azp is another client")
        # OIDC Core §3.1.3.8 / §3.2.2.9: when at_hash is present it must match the access token.
        at_hash = claims.get("at_hash")
        if at_hash is not None:
            digest = _AT_HASH_DIGESTS.get(algorithm)
            if access_token is None or digest is None or not isinstance(at_hash, str):
                raise OIDCError(OIDCReason.ID_TOKEN_INVALID, "at_hash cannot be checked")
            full = digest(access_token.encode("ascii", "replace")).digest()
            expected = _b64url(full[: len(full) // 2])
            if not hmac.compare_digest(at_hash.encode("utf-8"), expected.encode("ascii")):
                raise OIDCError(OIDCReason.ID_TOKEN_INVALID, "at_hash does not match")

    def _result(self, claims: dict[str, Any], id_token: str, return_to: str) -> LoginResult:
        mapping = self.cfg.claims
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise OIDCError(OIDCReason.ID_TOKEN_INVALID, "'sub' is not a non-empty string")
        for name, accepted in self.cfg.required_claims:
            value = claim_at(claims, name)
            values = value if isinstance(value, list) else [value]
            if not any(isinstance(v, str) and v in accepted for v in values):
                raise OIDCError(
                    OIDCReason.LOGIN_DENIED,
                    f"claim {name!r} is not one of the accepted values ({', '.join(accepted)})",
                )
        user = claim_at(claims, mapping.user)
        if not isinstance(user, str) or not user:
            raise OIDCError(
                OIDCReason.ID_TOKEN_INVALID, f"user claim {mapping.user!r} is not a string"
            )
        email = claim_at(claims, mapping.email)
        if email is not None and not isinstance(email, str):
            raise OIDCError(
                OIDCReason.ID_TOKEN_INVALID, f"email claim {mapping.email!r} is not a string"
            )
        # OIDC Core §5.1: an address the provider says it has not verified is not forwarded
        # as the user's e-mail (it could be anyone's).
        if claims.get("email_verified") is False:
            email = None
        raw_groups = claim_at(claims, mapping.groups)
        overage = claims.get("_claim_names")
        if raw_groups is None and isinstance(overage, Mapping) and mapping.groups in overage:
            # Entra ID's groups overage (more groups than fit a token): the token names a Graph
            # endpoint instead of the groups. Signing in with no groups would look like a
            # policy refusal everywhere; say what to change instead.
            raise OIDCError(
                OIDCReason.ID_TOKEN_INVALID,
                f"the provider left the {mapping.groups!r} claim out (groups overage): emit only "
                "the groups assigned to the application (docs/oidc.md, Entra ID)",
            )
        if raw_groups is None:
            groups: tuple[str, ...] = ()
        elif isinstance(raw_groups, str):
            groups = (raw_groups,)
        elif isinstance(raw_groups, list) and all(isinstance(g, str) and g for g in raw_groups):
            groups = tuple(dict.fromkeys(raw_groups))
        else:
            raise OIDCError(
                OIDCReason.ID_TOKEN_INVALID,
                f"groups claim {mapping.groups!r} is not a list of strings",
            )
        return LoginResult(
            subject=subject,
            user=user,
            email=email or None,
            groups=groups,
            claims=MappingProxyType(claims),
            id_token=id_token,
            return_to=return_to,
        )

    # -- logout ------------------------------------------------------------------------------

    def logout_url(self, id_token_hint: str | None, post_logout_redirect_uri: str) -> str | None:
        """The provider's RP-initiated logout URL (OIDC RP-Initiated Logout 1.0 §2), or None.

        None when the provider has no `end_session_endpoint` (or is not discovered yet): the
        caller then only ends the gateway session. `post_logout_redirect_uri` must be registered
        at the provider; `client_id` is sent too so the provider can check it without a hint.
        """
        metadata = self._metadata
        if metadata is None or metadata.end_session_endpoint is None:
            return None
        params = {"client_id": self.cfg.client_id}
        if id_token_hint:
            params["id_token_hint"] = id_token_hint
        if post_logout_redirect_uri:
            params["post_logout_redirect_uri"] = post_logout_redirect_uri
        return _append_query(metadata.end_session_endpoint, params)
