"""WebAuthn (security keys and passkeys) as a second factor: the two ceremonies, bound to the
store, the configured relying party and the injectable clock.

The cryptography and the parsing (CBOR, COSE keys, attestation statements, client data,
authenticator data, signatures) are py_webauthn's (docs/dependencies.md); this module decides
what the gateway accepts (W3C Web Authentication Level 2, §7.1 registration, §7.2 assertion):

- The RP ID and the accepted origins come from configuration (`[webauthn]`, or the host of
  `[server] public_url`), never from the request's Host: an assertion a phishing site obtained
  for its own origin, or for a sibling host, is refused as `webauthn-origin-mismatch` (§7.2
  steps 13 and 15).
- A challenge is single-use and bound to the browser session that asked for it: it is kept in
  the store (the sign-in's pending-login table, so every worker and replica sees it) under the
  session, taken (deleted) by the first answer, and refused after `challenge_ttl` by the
  gateway's clock (§13.4.3).
- The sign counter must grow (§7.2 step 21; §6.1.1): it is advanced by compare-and-set in the
  store after the signature verified, so a cloned authenticator (or a replayed assertion) is
  refused as `webauthn-cloned` on every replica, and the credential is left as it was.
- User verification is required where the route asks for it (`require_user_verification`), or
  everywhere with `[webauthn] user_verification = "required"` (§7.2 step 17).

Attestation is not requested ("none", §5.4.7): the gateway trusts the person who signed in with
the identity provider to choose their authenticator, as TOTP trusts their app.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import (
    base64url_to_bytes,
    bytes_to_base64url,
    parse_authentication_credential_json,
    parse_authenticator_data,
    parse_client_data_json,
    parse_registration_credential_json,
)
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from ..config import WebAuthnConfig
from ..decision import Reason
from ..store.base import Store, WebAuthnCredential

MAX_CREDENTIAL_JSON = 16 * 1024
"""An answer from `navigator.credentials.create()/get()` is a few KiB (attestation none)."""
MAX_NAME = 64
_CHALLENGES_PER_SESSION = 4
_TRANSPORTS = frozenset(t.value for t in AuthenticatorTransport)
# What a malformed answer raises in the parsers (JSON, base64url, CBOR, structures).
_MALFORMED = (WebAuthnException, ValueError, KeyError, TypeError, AttributeError)


class WebAuthnRefused(Exception):
    """A ceremony's answer that the gateway does not accept (reason: closed vocabulary)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Challenge:
    """What the gateway asked for, as kept in the store until the answer (or expiry)."""

    purpose: str  # "register" | "authenticate"
    user: str
    challenge: bytes
    user_verification: bool

    def to_json(self) -> str:
        return json.dumps(
            {
                "purpose": self.purpose,
                "user": self.user,
                "challenge": bytes_to_base64url(self.challenge),
                "uv": self.user_verification,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Challenge:
        data = json.loads(text)
        return cls(
            str(data["purpose"]),
            str(data["user"]),
            base64url_to_bytes(str(data["challenge"])),
            bool(data["uv"]),
        )


@dataclass(frozen=True, slots=True)
class Verified:
    """A passed authentication ceremony."""

    credential: WebAuthnCredential
    user_verified: bool


class WebAuthn:
    """The relying party: options out, answers verified, credentials kept in the store."""

    def __init__(
        self, cfg: Callable[[], WebAuthnConfig], store: Store, user_handle_key: bytes
    ) -> None:
        self._cfg = cfg  # the running configuration's (a reload swaps it)
        self.store = store
        self._handle_key = user_handle_key

    @property
    def cfg(self) -> WebAuthnConfig:
        return self._cfg()

    @property
    def available(self) -> bool:
        return self.cfg.enabled

    def user_handle(self, user: str) -> bytes:
        """The WebAuthn user.id (§5.4.3): opaque, no personal data, stable for the user; a MAC
        of the name under a key of the gateway's root, so no dictionary reverses it."""
        return hmac.new(self._handle_key, user.encode(), hashlib.sha256).digest()

    def _uv(self, required: bool) -> bool:
        return required or self.cfg.user_verification == "required"

    # --- challenges ------------------------------------------------------------------------
    @staticmethod
    def _slot(purpose: str, binding: str) -> tuple[str, str]:
        # One outstanding challenge per session and purpose: asking again replaces it.
        return f"webauthn:{purpose}:{binding}", f"webauthn:{binding}"

    async def _keep(self, challenge: Challenge, binding: str, now: float) -> None:
        state, source = self._slot(challenge.purpose, binding)
        await self.store.put_pending_login(
            state,
            source,
            challenge.to_json(),
            now + self.cfg.challenge_ttl,
            _CHALLENGES_PER_SESSION,
        )

    async def _take(self, purpose: str, user: str, binding: str, now: float) -> Challenge:
        state, source = self._slot(purpose, binding)
        data = await self.store.take_pending_login(state, source, now)
        if data is None:
            raise WebAuthnRefused(
                Reason.WEBAUTHN_CHALLENGE_INVALID, f"{purpose}: no challenge pending (expired/used)"
            )
        challenge = Challenge.from_json(data)
        if challenge.user != user or challenge.purpose != purpose:
            raise WebAuthnRefused(Reason.WEBAUTHN_CHALLENGE_INVALID, f"{purpose}: another user")
        return challenge

    # --- registration (§7.1) ---------------------------------------------------------------
    async def registration_options(
        self, user: str, binding: str, now: float, *, require_uv: bool = False
    ) -> str:
        """The JSON for `navigator.credentials.create()`; the challenge kept for `binding`."""
        uv = self._uv(require_uv)
        existing = await self.store.webauthn_credentials(user)
        options = generate_registration_options(
            rp_id=self.cfg.rp_id,
            rp_name=self.cfg.rp_name,
            user_name=user,
            user_id=self.user_handle(user),
            user_display_name=user,
            challenge=secrets.token_bytes(32),
            timeout=int(self.cfg.challenge_ttl * 1000),
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.PREFERRED,
                user_verification=_requirement(uv, self.cfg.user_verification),
            ),
            # §5.4.3 excludeCredentials: the same authenticator is not registered twice.
            exclude_credentials=[_descriptor(c) for c in existing],
        )
        await self._keep(Challenge("register", user, options.challenge, uv), binding, now)
        return options_to_json(options)

    async def register(
        self, user: str, binding: str, answer: object, name: str, now: float
    ) -> WebAuthnCredential:
        """Verify the answer of `navigator.credentials.create()` and keep the credential."""
        challenge = await self._take("register", user, binding, now)
        credential = _as_dict(answer)
        try:
            parsed = parse_registration_credential_json(credential)
            self._check_client_data(parsed.response.client_data_json, "webauthn.create")
            verified = verify_registration_response(
                credential=parsed,
                expected_challenge=challenge.challenge,
                expected_rp_id=self.cfg.rp_id,
                expected_origin=list(self.cfg.origins),
                require_user_verification=challenge.user_verification,
            )
        except _MALFORMED as exc:
            raise _refusal(exc, "registration") from exc
        transports = tuple(
            t.value for t in parsed.response.transports or () if t.value in _TRANSPORTS
        )
        record = WebAuthnCredential(
            credential_id=bytes_to_base64url(verified.credential_id),
            user=user,
            public_key=bytes_to_base64url(verified.credential_public_key),
            sign_count=verified.sign_count,
            name=_clean_name(name) or f"Security key {now:.0f}",
            created_at=now,
            transports=transports,
            aaguid=verified.aaguid,
            user_verified=verified.user_verified,
            backup_eligible=verified.credential_device_type.value == "multi_device",
        )
        if not await self.store.add_webauthn_credential(record):
            raise WebAuthnRefused(
                Reason.WEBAUTHN_CREDENTIAL_REFUSED,
                "registration: the credential is registered already, or the account has "
                "the most it may",
            )
        return record

    # --- authentication (§7.2) -------------------------------------------------------------
    async def authentication_options(
        self, user: str, binding: str, now: float, *, require_uv: bool = False
    ) -> str | None:
        """The JSON for `navigator.credentials.get()`, or None when the user has no credential."""
        credentials = await self.store.webauthn_credentials(user)
        if not credentials:
            return None
        uv = self._uv(require_uv)
        options = generate_authentication_options(
            rp_id=self.cfg.rp_id,
            challenge=secrets.token_bytes(32),
            timeout=int(self.cfg.challenge_ttl * 1000),
            allow_credentials=[_descriptor(c) for c in credentials],
            user_verification=_requirement(uv, self.cfg.user_verification),
        )
        await self._keep(Challenge("authenticate", user, options.challenge, uv), binding, now)
        return options_to_json(options)

    async def authenticate(self, user: str, binding: str, answer: object, now: float) -> Verified:
        """Verify the answer of `navigator.credentials.get()` against the user's credential and
        advance its sign counter."""
        challenge = await self._take("authenticate", user, binding, now)
        data = _as_dict(answer)
        try:
            parsed = parse_authentication_credential_json(data)
        except _MALFORMED as exc:
            raise _refusal(exc, "assertion") from exc
        stored = await self.store.webauthn_credential(parsed.id)
        if stored is None or stored.user != user:
            # §7.2 step 6: the credential must be one of this user's.
            raise WebAuthnRefused(
                Reason.WEBAUTHN_CREDENTIAL_UNKNOWN, "assertion: not a credential of this user"
            )
        try:
            self._check_client_data(parsed.response.client_data_json, "webauthn.get")
            flags = parse_authenticator_data(parsed.response.authenticator_data)
            if flags.rp_id_hash != hashlib.sha256(self.cfg.rp_id.encode()).digest():
                raise WebAuthnRefused(
                    Reason.WEBAUTHN_ORIGIN_MISMATCH, "assertion: made for another RP ID"
                )
            if challenge.user_verification and not flags.flags.uv:
                raise WebAuthnRefused(
                    Reason.WEBAUTHN_UV_REQUIRED, "assertion: the authenticator did not verify"
                )
            verified = verify_authentication_response(
                credential=parsed,
                expected_challenge=challenge.challenge,
                expected_rp_id=self.cfg.rp_id,
                expected_origin=list(self.cfg.origins),
                credential_public_key=base64url_to_bytes(stored.public_key),
                # The counter is checked below, atomically in the store and only once the
                # signature verified, so a forgery is never reported as a clone.
                credential_current_sign_count=0,
                require_user_verification=challenge.user_verification,
            )
        except _MALFORMED as exc:
            raise _refusal(exc, "assertion") from exc
        if not await self.store.use_webauthn_credential(
            stored.credential_id, verified.new_sign_count, now
        ):
            raise WebAuthnRefused(
                Reason.WEBAUTHN_CLONED,
                f"assertion: sign count {verified.new_sign_count} does not advance "
                f"{stored.name!r} (stored {stored.sign_count}): a cloned authenticator or a replay",
            )
        return Verified(stored, verified.user_verified)

    def _check_client_data(self, raw: bytes, kind: str) -> None:
        """§7.1 steps 7-9 / §7.2 steps 11-13, checked first to name what is wrong: the origin is
        one of ours (never the request's Host), and the type matches the ceremony."""
        client = parse_client_data_json(raw)
        # py_webauthn keeps the type as the JSON gave it (annotated as the enum).
        given = str(getattr(client.type, "value", client.type))
        if given != kind:
            raise WebAuthnRefused(Reason.WEBAUTHN_INVALID, f"client data type {given[:40]!r}")
        origin = client.origin.rstrip("/").lower()
        if origin not in self.cfg.origins:
            raise WebAuthnRefused(
                Reason.WEBAUTHN_ORIGIN_MISMATCH, f"made for origin {client.origin[:80]!r}"
            )
        if client.cross_origin:
            raise WebAuthnRefused(Reason.WEBAUTHN_ORIGIN_MISMATCH, "made in a cross-origin frame")

    # --- operators --------------------------------------------------------------------------
    async def credentials(self, user: str) -> list[WebAuthnCredential]:
        return await self.store.webauthn_credentials(user)

    async def remove(self, user: str, credential_id: str) -> bool:
        return await self.store.remove_webauthn_credential(user, credential_id)


def _requirement(required: bool, configured: str) -> UserVerificationRequirement:
    if required:
        return UserVerificationRequirement.REQUIRED
    return UserVerificationRequirement(configured)


def _descriptor(credential: WebAuthnCredential) -> PublicKeyCredentialDescriptor:
    return PublicKeyCredentialDescriptor(
        id=base64url_to_bytes(credential.credential_id),
        transports=[AuthenticatorTransport(t) for t in credential.transports],
    )


def _as_dict(answer: object) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise WebAuthnRefused(Reason.WEBAUTHN_INVALID, "not a PublicKeyCredential")
    return answer


def _clean_name(name: str) -> str:
    """A label the person gives the key: printable, short (shown in lists and audit)."""
    return "".join(c for c in name if c.isprintable()).strip()[:MAX_NAME]


def _refusal(exc: Exception, what: str) -> WebAuthnRefused:
    message = str(exc)
    if "User verification is required" in message:
        return WebAuthnRefused(Reason.WEBAUTHN_UV_REQUIRED, f"{what}: not user-verified")
    if "RP ID hash" in message:
        return WebAuthnRefused(Reason.WEBAUTHN_ORIGIN_MISMATCH, f"{what}: another RP ID")
    if "challenge" in message.lower():
        return WebAuthnRefused(Reason.WEBAUTHN_CHALLENGE_INVALID, f"{what}: another challenge")
    return WebAuthnRefused(Reason.WEBAUTHN_INVALID, f"{what}: {message[:120]}")
