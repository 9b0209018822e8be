"""DEVELOPMENT ONLY: the dev IdP as a Shared Signals transmitter and back-channel logout sender
(`ztgateway dev-ssf send`, in commands/dev_ssf.py, makes it send an event).

The dev IdP (dev/idp.py) mounts `DevTransmitter`'s routes:
- `GET  {issuer}/.well-known/ssf-configuration`: transmitter metadata (SSF 1.0 §7.1);
- `GET  {issuer}/ssf/jwks`: the public key its SETs are signed with (a key of its own, apart
  from the ID token key);
- `POST {issuer}/ssf/poll`: the RFC 8936 poll endpoint (`Authorization: Bearer <poll_token>`);
- `POST {issuer}/ssf/send`: make one SET and push it (RFC 8935) to `push_url`, or queue it for
  the poll endpoint (`Authorization: Bearer <control_token>`; what `dev-ssf send` calls).
When a person signs out at the dev IdP, it POSTs a logout token (Back-Channel Logout 1.0) to
each client's `backchannel_logout_uri` that the session signed in to.

Configured in the dev IdP's users file:

    [ssf]
    audience = "https://127.0.0.1:8443"                 # the receiver (the gateway)
    push_url = "https://127.0.0.1:8443/.ztgw/ssf/events" # omit to queue for polling only
    poll_token = "..."                                  # at least 16 characters
    control_token = "..."

    [outgoing]                                          # TLS for pushes and logout tokens
    ca_file = "certs/ca.pem"                            # trusts the gateway's certificate
    client_cert = "certs/clients/dev-idp.pem"           # the gateway asks for one (mTLS)
    client_key = "certs/clients/dev-idp.key"
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import ssl
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import jwt as pyjwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from ztgateway.configreader import Table
from ztgateway.dev.tokens import key_id, public_jwks

logger = logging.getLogger(__name__)

CAEP: Final = "https://schemas.openid.net/secevent/caep/event-type/"
RISC: Final = "https://schemas.openid.net/secevent/risc/event-type/"
SSF: Final = "https://schemas.openid.net/secevent/ssf/event-type/"
BACKCHANNEL_LOGOUT: Final = "http://schemas.openid.net/event/backchannel-logout"
EVENT_TYPES: Final = {
    "session-revoked": CAEP + "session-revoked",
    "credential-change": CAEP + "credential-change",
    "assurance-level-change": CAEP + "assurance-level-change",
    "device-compliance-change": CAEP + "device-compliance-change",
    "account-disabled": RISC + "account-disabled",
    "account-enabled": RISC + "account-enabled",
    "credential-compromise": RISC + "credential-compromise",
    "verification": SSF + "verification",
}
SUBJECT_FORMATS: Final = ("iss_sub", "email", "opaque")
LOGOUT_TOKEN_TTL: Final = 120  # Back-Channel Logout §4: "preferably at most two minutes"
MAX_QUEUE: Final = 1000
TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class OutgoingTLS:
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.client_cert is not None and self.client_key is not None:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


@dataclass(frozen=True, slots=True)
class DevSSFConfig:
    audience: str
    push_url: str | None
    poll_token: str
    control_token: str


def load_outgoing(root: Table) -> OutgoingTLS:
    t = root.table("outgoing")
    # Not required to exist yet: `make run` issues the dev IdP's certificate after checking
    # this file; a missing one fails the delivery (logged), not the IdP's start.
    out = OutgoingTLS(
        ca_file=t.path("ca_file", must_exist=False),
        client_cert=t.path("client_cert", must_exist=False),
        client_key=t.path("client_key", must_exist=False),
    )
    if (out.client_cert is None) != (out.client_key is None):
        t.fail("client_cert", "client_cert and client_key go together")
    t.done()
    return out


def load_ssf(root: Table) -> DevSSFConfig | None:
    if not root.has("ssf"):
        return None
    t = root.table("ssf")
    cfg = DevSSFConfig(
        audience=t.text("audience", required=True),
        push_url=t.text("push_url"),
        poll_token=t.text("poll_token", required=True),
        control_token=t.text("control_token", required=True),
    )
    for key in ("poll_token", "control_token"):
        if len(getattr(cfg, key)) < 16:
            t.fail(key, "must be at least 16 characters")
    t.done()
    return cfg


def subject_id(fmt: str, sub: str, *, issuer: str, email: str | None) -> dict[str, str]:
    """An RFC 9493 Subject Identifier for a dev IdP user."""
    if fmt == "iss_sub":
        return {"format": "iss_sub", "iss": issuer, "sub": sub}
    if fmt == "email":
        return {"format": "email", "email": email or sub}
    return {"format": "opaque", "id": sub}


def event_payload(name: str, now: int, *, status: str | None = None) -> dict[str, Any]:
    """The event's members as CAEP 1.0 §3 / RISC 1.0 §2 define them."""
    base: dict[str, Any] = {"event_timestamp": now}
    if name == "session-revoked":
        base.update(initiating_entity="admin", reason_admin={"en": "dev-ssf send"})
    elif name == "credential-change":
        base.update(credential_type="password", change_type="update")
    elif name == "assurance-level-change":
        base.update(
            namespace="NIST-AAL",
            current_level="nist-aal1",
            previous_level="nist-aal2",
            change_direction="decrease",
        )
    elif name == "device-compliance-change":
        current = status or "not-compliant"
        previous = "compliant" if current == "not-compliant" else "not-compliant"
        base.update(current_status=current, previous_status=previous)
    elif name == "account-disabled":
        base = {"reason": "hijacking"}
    elif name == "credential-compromise":
        base.update(credential_type="password")
    elif name == "verification":
        base = {"state": secrets.token_urlsafe(8)}
    return base


class DevTransmitter:
    """The dev IdP's transmitter side: a SET key, a poll queue, outgoing deliveries."""

    def __init__(
        self,
        *,
        issuer: str,
        base_path: str,
        origin: str,
        config: DevSSFConfig | None,
        outgoing: OutgoingTLS,
        clock: Callable[[], float],
    ) -> None:
        self.issuer = issuer
        self.base_path = base_path
        self.origin = origin
        self.config = config
        self.outgoing = outgoing
        self._clock = clock
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.kid = key_id(self._key.public_key())
        self.jwks = public_jwks(self._key.public_key(), kid=self.kid)
        self.queue: OrderedDict[str, str] = OrderedDict()
        """SETs waiting for the receiver's poll, by jti (RFC 8936 §2.1: until acknowledged)."""
        self.acknowledged: list[str] = []
        self.errors: dict[str, Any] = {}
        self._http: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        base = self.base_path
        app.router.add_get(base + "/.well-known/ssf-configuration", self.metadata)
        app.router.add_get(base + "/ssf/jwks", self.jwks_handler)
        app.router.add_post(base + "/ssf/poll", self.poll)
        app.router.add_post(base + "/ssf/send", self.send_handler)
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.outgoing.context()),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._http

    async def metadata(self, request: web.Request) -> web.Response:
        url = self.origin + self.base_path
        return web.json_response(
            {
                "spec_version": "1_0",
                "issuer": self.issuer,
                "jwks_uri": url + "/ssf/jwks",
                "delivery_methods_supported": [
                    "urn:ietf:rfc:8935",
                    "urn:ietf:rfc:8936",
                ],
                "default_subjects": "ALL",
            }
        )

    async def jwks_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.jwks, content_type="application/jwk-set+json")

    # -- making SETs -----------------------------------------------------------------------
    def make_set(
        self,
        event: str,
        subject: dict[str, Any],
        *,
        status: str | None = None,
        audience: str | None = None,
        jti: str | None = None,
        iat: int | None = None,
    ) -> tuple[str, str]:
        """A signed SET (RFC 8417, SSF 1.0 §4.1: `typ` secevent+jwt, `sub_id`, one event)."""
        if self.config is None and audience is None:
            raise ValueError("no [ssf] audience configured")
        now = int(self._clock()) if iat is None else iat
        jti = jti or secrets.token_urlsafe(16)
        claims = {
            "iss": self.issuer,
            "aud": audience or (self.config.audience if self.config else ""),
            "iat": now,
            "jti": jti,
            "sub_id": subject,
            "events": {EVENT_TYPES[event]: event_payload(event, now, status=status)},
        }
        token = pyjwt.encode(
            claims, self._key, algorithm="ES256", headers={"kid": self.kid, "typ": "secevent+jwt"}
        )
        return jti, token

    async def push(self, token: str) -> tuple[int, str]:
        """RFC 8935 §2: POST the SET; the receiver's status and body."""
        assert self.config is not None and self.config.push_url is not None
        async with self.http().post(
            self.config.push_url,
            data=token.encode("ascii"),
            headers={"Content-Type": "application/secevent+jwt", "Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        ) as resp:
            return resp.status, await resp.text()

    def enqueue(self, jti: str, token: str) -> None:
        self.queue[jti] = token
        while len(self.queue) > MAX_QUEUE:
            self.queue.popitem(last=False)

    # -- endpoints -------------------------------------------------------------------------
    def _authorised(self, request: web.Request, token: str) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.encode()
        )

    async def poll(self, request: web.Request) -> web.Response:
        """RFC 8936 §2: acknowledge what the receiver lists, return what is still queued."""
        if self.config is None or not self._authorised(request, self.config.poll_token):
            return web.json_response({"err": "authentication_failed"}, status=401)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return web.json_response({"err": "invalid_request"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"err": "invalid_request"}, status=400)
        for jti in body.get("ack") or []:
            if self.queue.pop(str(jti), None) is not None:
                self.acknowledged.append(str(jti))
        for jti, error in (body.get("setErrs") or {}).items():
            if self.queue.pop(str(jti), None) is not None:
                self.errors[str(jti)] = error
        limit = body.get("maxEvents", 100)
        limit = limit if isinstance(limit, int) and limit >= 0 else 100
        sets = dict(list(self.queue.items())[:limit])
        return web.json_response({"sets": sets, "moreAvailable": len(self.queue) > len(sets)})

    async def send_handler(self, request: web.Request) -> web.Response:
        """What `dev-ssf send` asks for: one event about one subject, pushed or queued."""
        if self.config is None or not self._authorised(request, self.config.control_token):
            return web.json_response({"error": "a control token is required"}, status=401)
        if request.content_type != "application/json":
            return web.json_response({"error": "send application/json"}, status=415)
        try:
            body = await request.json()
            event = str(body["event"])
            subject = body["subject"]
            delivery = str(body.get("delivery", "push" if self.config.push_url else "poll"))
            status = body.get("status")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return web.json_response({"error": "event and subject are required"}, status=400)
        if event not in EVENT_TYPES or not isinstance(subject, dict):
            return web.json_response(
                {"error": f"event must be one of {sorted(EVENT_TYPES)}"}, status=400
            )
        jti, token = self.make_set(
            event, subject, status=status if isinstance(status, str) else None
        )
        if delivery == "poll":
            self.enqueue(jti, token)
            return web.json_response({"jti": jti, "delivery": "poll", "queued": len(self.queue)})
        if self.config.push_url is None:
            return web.json_response({"error": "no push_url configured"}, status=400)
        try:
            status_code, text = await self.push(token)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return web.json_response({"jti": jti, "error": f"push failed: {exc}"}, status=502)
        return web.json_response(
            {"jti": jti, "delivery": "push", "receiver_status": status_code, "receiver_body": text}
        )

    # -- back-channel logout ---------------------------------------------------------------
    def logout_token(
        self, key: Any, kid: str, algorithm: str, *, client_id: str, sub: str, sid: str
    ) -> str:
        """Back-Channel Logout 1.0 §2.4, explicitly typed (`logout+jwt`), signed with the
        provider's ID token key (the relying party verifies it with the provider's JWKS)."""
        now = int(self._clock())
        claims = {
            "iss": self.issuer,
            "aud": client_id,
            "iat": now,
            "exp": now + LOGOUT_TOKEN_TTL,
            "jti": secrets.token_urlsafe(16),
            "sub": sub,
            "sid": sid,
            "events": {BACKCHANNEL_LOGOUT: {}},
        }
        return pyjwt.encode(
            claims, key, algorithm=algorithm, headers={"kid": kid, "typ": "logout+jwt"}
        )

    async def send_logout(self, uri: str, token: str) -> int | None:
        """POST it (§2.5); the relying party's status, None when it could not be reached."""
        try:
            async with self.http().post(
                uri, data={"logout_token": token}, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
            ) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            logger.warning("dev-idp: back-channel logout to %s failed: %s", uri, exc)
            return None


def sid_for(session_id: str) -> str:
    """The `sid` the dev IdP puts in ID tokens and logout tokens for one of its sessions."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]
