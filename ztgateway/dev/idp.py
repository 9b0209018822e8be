"""`ztgateway dev-idp`: a DEVELOPMENT-ONLY OpenID Provider, so the browser sign-in can be tried
after `make run` without an external identity provider.

It implements just enough of OpenID Connect for the gateway's relying party and for tests that
must fail the way a real provider would: discovery (OIDC Discovery §3), a JWKS with one ES256 key,
the authorization code flow with PKCE S256 *required* (RFC 7636), single-use codes bound to client,
redirect URI and verifier, client_secret_basic and client_secret_post, userinfo, and RP-initiated
logout. Users, password hashes (scrypt) and clients come from one TOML file.

It is not hardened for real users: everything lives in memory, there is no consent screen, no
account lockout and no key rotation. It refuses to listen on anything but loopback unless told
`--i-know-this-is-insecure`, and every page and its start-up log say DEVELOPMENT ONLY.

The users file and its password hashes are `idp_users.py`, the provider shapes (Keycloak, Entra,
Okta, Google) `idp_shapes.py`, the command line `commands/dev_idp.py`. The provider itself stays
one module: its endpoints share the in-memory state (pending authorizations, codes, sessions,
access tokens) and the rules that tie one flow together (a code is bound to the client, redirect
URI and PKCE verifier it was issued for; a session's logout reaches every client it signed in
to), and splitting it per endpoint would spread each of those rules over several files.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import html
import ipaddress
import logging
import re
import secrets
import socket
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import jwt as pyjwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ztgateway.clock import SYSTEM_CLOCK
from ztgateway.credentials.jwks import jwk_thumbprint
from ztgateway.dev.idp_shapes import GENERIC, Shape
from ztgateway.dev.idp_users import (
    DevClient,
    DevIdPConfig,
    DevUser,
    b64url,
    hash_password,
    load_devidp_file,
    verify_password,
)
from ztgateway.dev.ssf import (
    DevTransmitter,
    sid_for,
)
from ztgateway.dev.tokens import key_id, load_signing_key, public_jwks

logger = logging.getLogger(__name__)

BANNER: Final = "DEVELOPMENT ONLY: a test identity provider, never for real accounts"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 9200
DEFAULT_USERS_FILE: Final = "config/dev-idp-users.toml"

CODE_TTL: Final = 60.0  # RFC 6749 §4.1.2: "a maximum authorization code lifetime of 10 minutes
# is RECOMMENDED"; one minute is plenty for a redirect that happens at once.
AUTH_REQUEST_TTL: Final = 600.0
ID_TOKEN_TTL: Final = 300
ACCESS_TOKEN_TTL: Final = 3600
SESSION_TTL: Final = 8 * 3600.0
MAX_ENTRIES: Final = 10_000
MAX_LOGIN_FAILURES: Final = 5
ALGORITHM: Final = "ES256"

# RFC 7636 §4.1 / §4.2: the verifier's alphabet and length; an S256 challenge is 43 characters.
_VERIFIER_RE: Final = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_CHALLENGE_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")


_STYLE: Final = (
    "body{font-family:system-ui,sans-serif;max-width:30rem;margin:1.5rem auto;padding:0 1rem;"
    "line-height:1.5;color:#111}"
    ".dev{background:#8b0000;color:#fff;padding:.6rem 1rem;font-weight:bold;border-radius:4px}"
    "label{display:block;margin-top:1rem;font-weight:600}"
    "input{width:100%;padding:.6rem;font-size:1rem;box-sizing:border-box}"
    "button{margin-top:1.2rem;padding:.7rem 1.4rem;font-size:1rem}"
    ".error{color:#8b0000;font-weight:600}"
)
# SECURITY: a CSP that allows exactly our one inline style and nothing else: no scripts, no
# framing (clickjacking of the password form), no foreign form targets via <base>.
_CSP: Final = (
    "default-src 'none'; style-src 'sha256-"
    + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
    + "'; frame-ancestors 'none'; base-uri 'none'"
)
_PAGE_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "Content-Security-Policy": _CSP,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
)
# RFC 6749 §5.1: token responses must not be cached.
_NO_STORE: Final[Mapping[str, str]] = MappingProxyType(
    {"Cache-Control": "no-store", "Pragma": "no-cache"}
)

T = TypeVar("T")


def _rsa_jwks(public_key: rsa.RSAPublicKey) -> tuple[str, dict[str, Any]]:
    """(kid, JWK Set) for an RS256 key; the kid is its RFC 7638 thumbprint."""
    numbers = public_key.public_numbers()

    def b64(n: int) -> str:
        return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))

    required = {"e": b64(numbers.e), "kty": "RSA", "n": b64(numbers.n)}
    kid = jwk_thumbprint(required)
    return kid, {"keys": [{**required, "kid": kid, "use": "sig", "alg": "RS256"}]}


# -- in-memory state -------------------------------------------------------------------------


class _Expiring(Generic[T]):
    """A bounded map whose entries die after `ttl` seconds: no table here grows without limit."""

    def __init__(self, ttl: float, clock: Callable[[], float], max_entries: int = MAX_ENTRIES):
        self._ttl = ttl
        self._clock = clock
        self._max = max_entries
        self._items: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def put(self, key: str, value: T) -> None:
        now = self._clock()
        while self._items:
            created, _ = next(iter(self._items.values()))
            if now - created <= self._ttl:
                break
            self._items.popitem(last=False)
        self._items[key] = (now, value)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def get(self, key: str) -> T | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        if self._clock() - entry[0] > self._ttl:
            del self._items[key]
            return None
        return entry[1]

    def pop(self, key: str) -> T | None:
        value = self.get(key)
        self._items.pop(key, None)
        return value

    def remove_where(self, predicate: Callable[[T], bool]) -> None:
        for key in [k for k, (_, v) in self._items.items() if predicate(v)]:
            del self._items[key]


@dataclass(slots=True)
class _AuthRequest:
    client_id: str
    redirect_uri: str
    scope: tuple[str, ...]
    state: str | None
    nonce: str | None
    code_challenge: str
    failures: int = 0


@dataclass(frozen=True, slots=True)
class _Grant:
    client_id: str
    redirect_uri: str
    scope: tuple[str, ...]
    nonce: str | None
    code_challenge: str
    username: str
    auth_time: int
    session_id: str
    issued_at: float


@dataclass(frozen=True, slots=True)
class _Session:
    username: str
    auth_time: int


@dataclass(frozen=True, slots=True)
class _AccessToken:
    username: str
    client_id: str
    scope: tuple[str, ...]
    code: str


class _AuthorizeError(Exception):
    """An authorization error sent back to the client's redirect URI (RFC 6749 §4.1.2.1)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


# -- the provider ----------------------------------------------------------------------------


class DevIdP:
    """All endpoints and the in-memory state of one development OpenID Provider."""

    def __init__(
        self,
        config: DevIdPConfig,
        *,
        issuer: str,
        key: ec.EllipticCurvePrivateKey | None = None,
        clock: Callable[[], float] = SYSTEM_CLOCK.time,
        shape: Shape = GENERIC,
    ) -> None:
        parts = urlsplit(issuer)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"issuer must be an absolute http(s) URL, not {issuer!r}")
        if parts.query or parts.fragment:
            raise ValueError("issuer must not have a query or fragment (OIDC Discovery §3)")
        self.config = config
        self.issuer = issuer
        self.base_path = parts.path.rstrip("/")
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.shape = shape
        self._clock = clock
        self._key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if shape.algorithm == "RS256":
            # The real providers sign with RS256; an RSA key per start, like a rotation.
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.kid, self._jwks = _rsa_jwks(self._key.public_key())
        else:
            self._key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
            self.kid = key_id(self._key.public_key())
            self._jwks = public_jwks(self._key.public_key(), kid=self.kid)
        self._secret = secrets.token_bytes(32)
        secure = parts.scheme == "https"
        self._cookie_secure = secure
        # The __Host- prefix needs Secure; plain http is only for loopback development.
        self.session_cookie = "__Host-devidp-session" if secure else "devidp-session"
        self.csrf_cookie = "__Host-devidp-csrf" if secure else "devidp-csrf"
        self._requests: _Expiring[_AuthRequest] = _Expiring(AUTH_REQUEST_TTL, clock)
        self._codes: _Expiring[_Grant] = _Expiring(CODE_TTL, clock)
        self._used_codes: _Expiring[str] = _Expiring(CODE_TTL * 10, clock)
        self._tokens: _Expiring[_AccessToken] = _Expiring(ACCESS_TOKEN_TTL, clock)
        self._sessions: _Expiring[_Session] = _Expiring(SESSION_TTL, clock)
        # Which clients each session signed in to: they get a logout token when it ends.
        self._session_clients: _Expiring[set[str]] = _Expiring(SESSION_TTL, clock)
        self.transmitter = DevTransmitter(
            issuer=issuer,
            base_path=self.base_path,
            origin=self.origin,
            config=config.ssf,
            outgoing=config.outgoing,
            clock=clock,
        )
        # Unknown users are checked against this, so a wrong name costs as long as a wrong
        # password and the form does not reveal which accounts exist.
        self._dummy_hash = hash_password(secrets.token_urlsafe(16))

    def url(self, path: str) -> str:
        return self.issuer.rstrip("/") + path

    def endpoint_path(self, name: str) -> str | None:
        """Where the shape puts an endpoint (None: this provider has none)."""
        template = self.shape.endpoints.get(name)
        return None if template is None else template.format(issuer=self.base_path)

    def endpoint(self, name: str) -> str | None:
        path = self.endpoint_path(name)
        return None if path is None else self.origin + path

    def add_routes(self, app: web.Application) -> None:
        base = self.base_path
        app.router.add_get(base + "/.well-known/openid-configuration", self.discovery)
        for name, handler, methods in (
            ("jwks", self.jwks, ("GET",)),
            ("authorize", self.authorize, ("GET", "POST")),
            ("token", self.token, ("POST",)),
            ("userinfo", self.userinfo, ("GET", "POST")),
            ("end_session", self.end_session, ("GET", "POST")),
        ):
            path = self.endpoint_path(name)
            if path is not None:
                for method in methods:
                    app.router.add_route(method, path, handler)
        app.router.add_post(base + "/login", self.login)
        app.router.add_get(base + "/", self.index)
        self.transmitter.add_routes(app)

    # -- documents -------------------------------------------------------------------------

    async def discovery(self, request: web.Request) -> web.Response:
        """OIDC Discovery §3 metadata; `issuer` is exactly the configured issuer (§4.3)."""
        document = {
            "issuer": self.issuer,
            "authorization_endpoint": self.endpoint("authorize"),
            "token_endpoint": self.endpoint("token"),
            "userinfo_endpoint": self.endpoint("userinfo"),
            "jwks_uri": self.endpoint("jwks"),
            "end_session_endpoint": self.endpoint("end_session"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.shape.algorithm],
            "scopes_supported": list(self.shape.scopes),
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
            ],
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "nonce",
                "email",
                "email_verified",
                "name",
                "preferred_username",
                "groups",
                *self.shape.extra_claims_supported,
            ],
            "code_challenge_methods_supported": ["S256"],
            "prompt_values_supported": ["none", "login"],
            "authorization_response_iss_parameter_supported": True,
            # Back-Channel Logout 1.0 §2.1: logout tokens carry `sid` (and `sub`).
            "backchannel_logout_supported": True,
            "backchannel_logout_session_supported": True,
        }
        # A provider without RP-initiated logout (Google) does not announce the endpoint.
        return web.json_response({k: v for k, v in document.items() if v is not None})

    async def jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self._jwks, content_type="application/jwk-set+json")

    async def index(self, request: web.Request) -> web.Response:
        body = (
            "<p>This is the ztgateway development identity provider. Applications send you "
            "here to sign in.</p>"
            f"<p>Issuer: <code>{html.escape(self.issuer)}</code></p>"
        )
        return _page("Development identity provider", body)

    # -- authorization ---------------------------------------------------------------------

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        """The authorization endpoint (OIDC Core §3.1.2): GET or POST (§3.1.2.1)."""
        params = await _request_params(request)
        if params is None:
            return _page("Invalid request", "<p>A request parameter is repeated.</p>", 400)
        client = self.config.clients.get(params.get("client_id", ""))
        if client is None:
            return _page("Unknown application", "<p>The client_id is not registered.</p>", 400)
        redirect_uri = params.get("redirect_uri", "")
        # SECURITY: RFC 6749 §3.1.2.3 / RFC 9700 §4.1: exact string match against a registered
        # URI, and never redirect to an unverified one (§4.1.2.1): an error page instead.
        if redirect_uri not in client.redirect_uris:
            return _page(
                "Invalid redirect URI",
                "<p>The redirect_uri is not registered for this application.</p>",
                400,
            )
        state = params.get("state")
        try:
            auth = self._check_authorization_request(client, redirect_uri, params)
        except _AuthorizeError as exc:
            return self._redirect_error(redirect_uri, state, exc)
        prompt = set(params.get("prompt", "").split())
        session = self._current_session(request)
        if session is not None and "login" not in prompt:
            return self._issue_code(auth, session, request.cookies.get(self.session_cookie, ""))
        if "none" in prompt:
            # OIDC Core §3.1.2.6: prompt=none and no session.
            return self._redirect_error(
                redirect_uri, state, _AuthorizeError("login_required", "no session")
            )
        request_id = secrets.token_urlsafe(24)
        self._requests.put(request_id, auth)
        return self._login_form(request, request_id, client.client_id, error=None, username="")

    def _check_authorization_request(
        self, client: DevClient, redirect_uri: str, params: Mapping[str, str]
    ) -> _AuthRequest:
        if params.get("response_type") != "code":
            raise _AuthorizeError("unsupported_response_type", "only response_type=code")
        scope = tuple(params.get("scope", "").split())
        if "openid" not in scope:
            raise _AuthorizeError("invalid_scope", "the openid scope is required")
        # SECURITY: PKCE is mandatory here (RFC 9700 §2.1.1), and only S256: "plain" would put
        # the verifier itself in the browser's URL bar.
        challenge = params.get("code_challenge")
        if not challenge:
            raise _AuthorizeError("invalid_request", "PKCE code_challenge is required")
        if params.get("code_challenge_method") != "S256":
            raise _AuthorizeError("invalid_request", "code_challenge_method must be S256")
        if _CHALLENGE_RE.fullmatch(challenge) is None:
            raise _AuthorizeError("invalid_request", "malformed code_challenge")
        for name in ("request", "request_uri"):
            # OIDC Core §6: request objects are not supported.
            if name in params:
                raise _AuthorizeError(f"{name}_not_supported", f"{name} is not supported")
        return _AuthRequest(
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            scope=scope,
            state=params.get("state"),
            nonce=params.get("nonce"),
            code_challenge=challenge,
        )

    def _redirect_error(
        self, redirect_uri: str, state: str | None, exc: _AuthorizeError
    ) -> web.Response:
        params = {"error": exc.error, "error_description": exc.description}
        return self._redirect(redirect_uri, params, state)

    def _redirect(
        self, redirect_uri: str, params: dict[str, str], state: str | None
    ) -> web.Response:
        if state is not None:
            params["state"] = state
        # RFC 9207 §2: the issuer in the authorization response, against mix-up attacks.
        params["iss"] = self.issuer
        return _see_other(_append_query(redirect_uri, params))

    def _csrf_token(self, binder: str, request_id: str) -> str:
        message = b"\x00".join((b"devidp-login", binder.encode(), request_id.encode()))
        return b64url(hmac.new(self._secret, message, hashlib.sha256).digest())

    def _login_form(
        self,
        request: web.Request,
        request_id: str,
        client_id: str,
        *,
        error: str | None,
        username: str,
        status: int = 200,
    ) -> web.Response:
        # Login CSRF at the provider: the form token is bound to a cookie of this browser, so a
        # page elsewhere cannot post its own credentials into the victim's browser.
        binder = request.cookies.get(self.csrf_cookie) or ""
        new_binder = not binder or len(binder) > 64 or not binder.isascii()
        if new_binder:
            binder = secrets.token_urlsafe(24)
        error_html = (
            f'<p class="error" role="alert" id="login-error">{html.escape(error)}</p>'
            if error
            else ""
        )
        body = (
            f"<p>Sign in to continue to <strong>{html.escape(client_id)}</strong>.</p>"
            f"{error_html}"
            f'<form method="post" action="{html.escape(self.base_path + "/login")}">'
            f'<input type="hidden" name="request_id" value="{html.escape(request_id)}">'
            f'<input type="hidden" name="csrf_token" '
            f'value="{html.escape(self._csrf_token(binder, request_id))}">'
            '<label for="username">Username</label>'
            '<input id="username" name="username" autocomplete="username" required '
            f'autocapitalize="none" value="{html.escape(username)}">'
            '<label for="password">Password</label>'
            '<input id="password" name="password" type="password" '
            'autocomplete="current-password" required>'
            '<button type="submit">Sign in</button></form>'
        )
        response = _page("Sign in", body, status)
        if new_binder:
            response.set_cookie(
                self.csrf_cookie,
                binder,
                path="/",
                secure=self._cookie_secure,
                httponly=True,
                samesite="Lax",
            )
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        """The login form's POST: CSRF token, then the password, then a code for the client."""
        form = await request.post()
        request_id = form.get("request_id")
        token = form.get("csrf_token")
        username = form.get("username")
        password = form.get("password")
        if not isinstance(request_id, str) or not request_id:
            return _page("Bad request", "<p>The sign-in form is incomplete.</p>", 400)
        auth = self._requests.get(request_id)
        if auth is None:
            return _page(
                "Sign-in expired",
                "<p>This sign-in request has expired or was already used. Go back to the "
                "application and start again.</p>",
                400,
            )
        binder = request.cookies.get(self.csrf_cookie, "")
        if (
            not binder
            or not isinstance(token, str)
            or not binder.isascii()
            or not token.isascii()
            or not hmac.compare_digest(
                token.encode(), self._csrf_token(binder, request_id).encode()
            )
        ):
            return _page(
                "Request refused",
                "<p>The form's security token is missing or wrong. Go back to the application "
                "and start again.</p>",
                403,
            )
        if not isinstance(username, str) or not isinstance(password, str):
            return _page("Bad request", "<p>Username and password are required.</p>", 400)
        user = self.config.users.get(username)
        stored = user.password_hash if user is not None else self._dummy_hash
        ok = await asyncio.to_thread(verify_password, password, stored)
        if user is None or not ok:
            auth.failures += 1
            logger.info("dev-idp: failed sign-in for %r", username[:64])
            if auth.failures >= MAX_LOGIN_FAILURES:
                self._requests.pop(request_id)
                return _page(
                    "Too many attempts",
                    "<p>Too many wrong passwords. Go back to the application and start again.</p>",
                    429,
                )
            return self._login_form(
                request,
                request_id,
                auth.client_id,
                error="Wrong username or password.",
                username=username,
                status=401,
            )
        self._requests.pop(request_id)
        session_id = secrets.token_urlsafe(32)
        session = _Session(username=user.username, auth_time=int(self._clock()))
        self._sessions.put(session_id, session)
        logger.info("dev-idp: %s signed in for client %s", user.username, auth.client_id)
        response = self._issue_code(auth, session, session_id)
        response.set_cookie(
            self.session_cookie,
            session_id,
            path="/",
            secure=self._cookie_secure,
            httponly=True,
            samesite="Lax",
        )
        return response

    def _current_session(self, request: web.Request) -> _Session | None:
        session_id = request.cookies.get(self.session_cookie)
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None or session.username not in self.config.users:
            return None
        return session

    def _issue_code(self, auth: _AuthRequest, session: _Session, session_id: str) -> web.Response:
        code = secrets.token_urlsafe(32)
        clients = self._session_clients.get(session_id) or set()
        clients.add(auth.client_id)
        self._session_clients.put(session_id, clients)
        self._codes.put(
            code,
            _Grant(
                client_id=auth.client_id,
                redirect_uri=auth.redirect_uri,
                scope=auth.scope,
                nonce=auth.nonce,
                code_challenge=auth.code_challenge,
                username=session.username,
                auth_time=session.auth_time,
                session_id=session_id,
                issued_at=self._clock(),
            ),
        )
        return self._redirect(auth.redirect_uri, {"code": code}, auth.state)

    # -- token -----------------------------------------------------------------------------

    def _authenticate_client(
        self, request: web.Request, form: Mapping[str, str]
    ) -> tuple[DevClient | None, bool]:
        """RFC 6749 §2.3.1: client_secret_basic or client_secret_post, never both (§2.3)."""
        header = request.headers.get("Authorization")
        used_basic = header is not None
        if header is not None:
            if "client_secret" in form:
                return None, True
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic":
                return None, True
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None, True
            raw_id, sep, raw_secret = decoded.partition(":")
            if not sep:
                return None, True
            # The pair is form-urlencoded before Basic encoding (RFC 6749 §2.3.1).
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        else:
            client_id = form.get("client_id", "")
            secret = form.get("client_secret", "")
        client = self.config.clients.get(client_id)
        if client is None or not secret:
            return None, used_basic
        if not hmac.compare_digest(secret.encode(), client.client_secret.encode()):
            return None, used_basic
        return client, used_basic

    async def token(self, request: web.Request) -> web.Response:
        """The token endpoint (RFC 6749 §4.1.3, OIDC Core §3.1.3)."""
        form = await _request_params(request)
        if form is None:
            return _token_error("invalid_request", "a parameter is repeated or not text")
        client, used_basic = self._authenticate_client(request, form)
        if client is None:
            # RFC 6749 §5.2: 401 and a challenge when the client tried the Authorization header.
            headers = dict(_NO_STORE)
            if used_basic:
                headers["WWW-Authenticate"] = 'Basic realm="dev-idp"'
            return web.json_response(
                {"error": "invalid_client", "error_description": "client authentication failed"},
                status=401,
                headers=headers,
            )
        if form.get("grant_type") != "authorization_code":
            return _token_error("unsupported_grant_type", "only authorization_code")
        code = form.get("code", "")
        # SECURITY: RFC 6749 §4.1.2: a code is single-use. It is removed on first presentation,
        # whatever the outcome, and a second presentation revokes what the first one obtained.
        grant = self._codes.pop(code) if code else None
        if grant is None:
            issued = self._used_codes.pop(code) if code else None
            if issued is not None:
                self._tokens.remove_where(lambda t: t.code == code)
                logger.warning("dev-idp: authorization code reused; its tokens are revoked")
            return _token_error("invalid_grant", "unknown, expired or already used code")
        self._used_codes.put(code, grant.username)
        if grant.client_id != client.client_id:
            return _token_error("invalid_grant", "the code was issued to another client")
        # RFC 6749 §4.1.3: redirect_uri must be identical to the one of the authorization request.
        if form.get("redirect_uri") != grant.redirect_uri:
            return _token_error("invalid_grant", "redirect_uri does not match")
        verifier = form.get("code_verifier", "")
        # RFC 7636 §4.6: BASE64URL(SHA256(code_verifier)) must equal the stored challenge.
        if _VERIFIER_RE.fullmatch(verifier) is None:
            return _token_error("invalid_grant", "code_verifier is missing or malformed")
        challenge = b64url(hashlib.sha256(verifier.encode("ascii")).digest())
        if not hmac.compare_digest(challenge.encode(), grant.code_challenge.encode()):
            return _token_error("invalid_grant", "code_verifier does not match")
        user = self.config.users.get(grant.username)
        if user is None:
            return _token_error("invalid_grant", "the user no longer exists")
        access_token = secrets.token_urlsafe(32)
        self._tokens.put(
            access_token,
            _AccessToken(
                username=user.username, client_id=client.client_id, scope=grant.scope, code=code
            ),
        )
        id_token = self._id_token(user, grant, access_token)
        return web.json_response(
            {
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": ACCESS_TOKEN_TTL,
                "scope": " ".join(grant.scope),
                "id_token": id_token,
            },
            headers=_NO_STORE,
        )

    def _user_claims(self, user: DevUser, scope: tuple[str, ...], client_id: str) -> dict[str, Any]:
        return self.shape.claims(user, scope, client_id)

    def _id_token(self, user: DevUser, grant: _Grant, access_token: str) -> str:
        now = int(self._clock())
        claims = self._user_claims(user, grant.scope, grant.client_id)
        claims.update(
            {
                "iss": self.issuer,
                "aud": grant.client_id,
                "iat": now,
                "exp": now + ID_TOKEN_TTL,
                "auth_time": grant.auth_time,
                # OIDC Core §3.1.3.8: left half of SHA-256 of the access token, for ES256.
                "at_hash": b64url(hashlib.sha256(access_token.encode()).digest()[:16]),
                "sid": sid_for(grant.session_id),
            }
        )
        if grant.nonce is not None:
            claims["nonce"] = grant.nonce
        return pyjwt.encode(
            claims,
            self._key,
            algorithm=self.shape.algorithm,
            headers={"kid": self.kid, "typ": "JWT"},
        )

    async def userinfo(self, request: web.Request) -> web.Response:
        """OIDC Core §5.3, with the access token as a Bearer token (RFC 6750 §2.1)."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        token = self._tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        user = self.config.users.get(token.username) if token is not None else None
        if token is None or user is None:
            return web.json_response(
                {"error": "invalid_token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"', **_NO_STORE},
            )
        return web.json_response(
            self._user_claims(user, token.scope, token.client_id), headers=_NO_STORE
        )

    # -- logout ----------------------------------------------------------------------------

    def _hinted_client(self, hint: str) -> str | None:
        """The client an id_token_hint of ours was issued to; expiry is irrelevant for a hint."""
        try:
            claims = pyjwt.decode(
                hint,
                self._key.public_key(),
                algorithms=[self.shape.algorithm],
                issuer=self.issuer,
                options={"verify_aud": False, "verify_exp": False, "require": ["aud", "iss"]},
            )
        except pyjwt.PyJWTError:
            return None
        aud = claims.get("aud")
        return aud if isinstance(aud, str) else None

    async def end_session(self, request: web.Request) -> web.StreamResponse:
        """RP-Initiated Logout 1.0 §2: end our session, then go back only to a registered URI."""
        params = await _request_params(request) or {}
        session_id = request.cookies.get(self.session_cookie)
        if session_id:
            ended = self._sessions.pop(session_id)
            if ended is not None:
                await self._backchannel_logout(session_id, ended)
        client_id = params.get("client_id")
        hint = params.get("id_token_hint")
        hinted = self._hinted_client(hint) if hint else None
        if hint and hinted is None:
            client_id = None  # an invalid hint: sign out, but redirect nowhere
        elif hinted is not None:
            # §2: a client_id that contradicts the hint's audience is an error, not a choice.
            client_id = hinted if client_id in (None, hinted) else None
        client = self.config.clients.get(client_id) if client_id else None
        target = params.get("post_logout_redirect_uri")
        if client is not None and target and target in client.post_logout_redirect_uris:
            location = target
            if "state" in params:
                location = _append_query(target, {"state": params["state"]})
            response = _see_other(location)
        else:
            response = _page(
                "Signed out",
                "<p>You are signed out of the development identity provider. "
                "You can close this page.</p>",
            )
        response.del_cookie(self.session_cookie, path="/")
        return response

    async def _backchannel_logout(self, session_id: str, session: _Session) -> None:
        """Back-Channel Logout 1.0 §2.5: a logout token to every client this session signed
        in to that registered a `backchannel_logout_uri` (sent before the browser moves on, so
        the person is signed out everywhere by the time the page says so)."""
        user = self.config.users.get(session.username)
        for client_id in sorted(self._session_clients.pop(session_id) or ()):
            client = self.config.clients.get(client_id)
            if client is None or client.backchannel_logout_uri is None or user is None:
                continue
            sub = str(self._user_claims(user, ("openid",), client_id)["sub"])
            token = self.transmitter.logout_token(
                self._key,
                self.kid,
                self.shape.algorithm,
                client_id=client_id,
                sub=sub,
                sid=sid_for(session_id),
            )
            status = await self.transmitter.send_logout(client.backchannel_logout_uri, token)
            logger.info("dev-idp: back-channel logout of %s to %s: %s", sub, client_id, status)


async def _request_params(request: web.Request) -> dict[str, str] | None:
    """Query (GET) or form (POST) parameters; None when one is repeated, which RFC 6749 §3.1
    and §3.2 make an invalid request (a repeated parameter is ambiguous between parsers)."""
    source = await request.post() if request.method == "POST" else request.query
    params: dict[str, str] = {}
    for key, value in source.items():
        if not isinstance(value, str) or key in params:
            return None
        params[key] = value
    return params


def _see_other(location: str) -> web.Response:
    # 303: after a POST (the login form) the browser must GET the target (RFC 9110 §15.4.4).
    return web.Response(status=303, headers={**_PAGE_HEADERS, "Location": location})


def _token_error(error: str, description: str) -> web.Response:
    return web.json_response(
        {"error": error, "error_description": description}, status=400, headers=_NO_STORE
    )


def _append_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query.extend(params.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def _page(title: str, body_html: str, status: int = 200) -> web.Response:
    """Every page carries the DEVELOPMENT ONLY banner; callers escape what they interpolate."""
    text = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)} · dev IdP (DEVELOPMENT ONLY)</title>"
        f"<style>{_STYLE}</style></head><body>"
        f'<p class="dev" role="note">{html.escape(BANNER)}</p>'
        f"<main><h1>{html.escape(title)}</h1>{body_html}</main></body></html>"
    )
    return web.Response(
        text=text, status=status, content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS
    )


# -- application and server ------------------------------------------------------------------

DEVIDP_KEY: Final = web.AppKey("ztgateway_devidp", DevIdP)


def create_devidp_app(
    users_file: Path,
    *,
    issuer: str,
    key_file: Path | None = None,
    clock: Callable[[], float] = SYSTEM_CLOCK.time,
    shape: Shape = GENERIC,
) -> web.Application:
    """The dev IdP as an aiohttp application; the DevIdP object is at `app[DEVIDP_KEY]`.

    Raises ConfigError for a bad users file and ValueError for a bad issuer or key file.
    """
    config = load_devidp_file(users_file)
    key = load_signing_key(key_file) if key_file is not None else None
    idp = DevIdP(config, issuer=issuer, key=key, clock=clock, shape=shape)
    app = web.Application()
    app[DEVIDP_KEY] = idp
    idp.add_routes(app)

    async def announce(app: web.Application) -> None:
        logger.warning("dev-idp: %s (issuer %s, shaped like %s)", BANNER, idp.issuer, shape.name)

    app.on_startup.append(announce)
    return app


def is_loopback_host(host: str) -> bool:
    """Whether binding `host` keeps the dev IdP off the network (names other than localhost
    could resolve anywhere, so they count as not loopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    address = host.strip("[]")
    family = socket.AF_INET
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(address).version == 6:
            family = socket.AF_INET6
    if address == "localhost":
        address = "127.0.0.1"
    return socket.create_server((address, port), family=family, reuse_port=False)


async def start_devidp(
    host: str,
    port: int,
    users_file: Path,
    *,
    issuer: str | None = None,
    key_file: Path | None = None,
    clock: Callable[[], float] = SYSTEM_CLOCK.time,
    allow_insecure_bind: bool = False,
    shape: Shape = GENERIC,
) -> tuple[web.AppRunner, int, str]:
    """Start the dev IdP; returns its runner (call `cleanup()`), the bound port and the issuer.

    With port 0 the socket is bound first, so the default issuer (`http://host:port`) names the
    real port. Refuses non-loopback addresses unless `allow_insecure_bind`.
    """
    if not is_loopback_host(host) and not allow_insecure_bind:
        raise ValueError(
            f"refusing to serve the development IdP on non-loopback address {host!r} "
            "(use --i-know-this-is-insecure)"
        )
    sock = _bind(host, port)
    try:
        bound_port = int(sock.getsockname()[1])
        if issuer is None:
            shown = f"[{host.strip('[]')}]" if ":" in host else host
            issuer = f"http://{shown}:{bound_port}{shape.issuer_path}"
        app = create_devidp_app(
            users_file, issuer=issuer, key_file=key_file, clock=clock, shape=shape
        )
    except BaseException:
        sock.close()
        raise
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    return runner, bound_port, issuer
