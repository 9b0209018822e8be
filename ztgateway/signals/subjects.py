"""Whom an event is about: Subject Identifiers (RFC 9493) and SSF complex subjects.

A simple subject names a principal in one format; `aliases` lists several identifiers of the same
principal (RFC 9493 §3.2.2). SSF 1.0 §3.2 adds complex subjects, an object whose members (`user`,
`device`, `session`, `tenant`...) are simple subjects that must all hold: a CAEP
`session-revoked` about `{user, session}` ends that one session, not every session of the user.

Matching is against what the gateway knows:
- a user: the session's user name, the e-mail and the provider's `sub` the sign-in recorded
  (only sessions of the providers, and users of the namespace, this transmitter speaks for:
  `subject_issuers`);
- a session: the provider's session id (`sid`) the sign-in recorded (`opaque` id);
- a device: the device id (from the client certificate) or its certificate fingerprint.
Identifiers the gateway keeps nothing about (phone numbers, DIDs) match nothing: the event is
accepted, audited as matching no session, and ends nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..store.base import Device, Session

FORMATS: Final = frozenset(
    {"account", "email", "iss_sub", "opaque", "phone_number", "did", "uri", "aliases"}
)
COMPLEX_MEMBERS: Final = frozenset(
    {"user", "device", "session", "application", "tenant", "org_unit", "group"}
)
_FIELDS: Final = {
    "account": ("uri",),
    "email": ("email",),
    "iss_sub": ("iss", "sub"),
    "opaque": ("id",),
    "phone_number": ("phone_number",),
    "did": ("url",),
    "uri": ("uri",),
}
MAX_ALIASES: Final = 20


class SubjectError(ValueError):
    """A subject that does not follow RFC 9493 / SSF (answered `invalid_request`)."""


@dataclass(frozen=True, slots=True)
class Identifier:
    format: str
    values: tuple[str, ...]
    """The format's members in `_FIELDS` order (`iss_sub`: iss, sub)."""

    def describe(self) -> str:
        return f"{self.format}:{'/'.join(self.values)}"


@dataclass(frozen=True, slots=True)
class Subject:
    """Each member is a tuple of alternatives (aliases of one principal); empty: not given."""

    user: tuple[Identifier, ...] = ()
    device: tuple[Identifier, ...] = ()
    session: tuple[Identifier, ...] = ()
    other: tuple[str, ...] = ()
    """Complex members the gateway has nothing to match against (tenant, group...)."""

    def describe(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in ("user", "device", "session"):
            ids: tuple[Identifier, ...] = getattr(self, name)
            if ids:
                out[name] = [i.describe() for i in ids]
        if self.other:
            out["other"] = list(self.other)
        return out


def _simple(doc: Any, where: str, *, aliases_ok: bool = True) -> tuple[Identifier, ...]:
    if not isinstance(doc, Mapping):
        raise SubjectError(f"{where} is not a JSON object")
    fmt = doc.get("format")
    if fmt == "aliases" and aliases_ok:
        ids = doc.get("identifiers")
        if not isinstance(ids, list) or not ids or len(ids) > MAX_ALIASES:
            raise SubjectError(f"{where}.identifiers must list 1 to {MAX_ALIASES} identifiers")
        # RFC 9493 §3.2.2: an alias list never nests another alias list.
        return tuple(
            i
            for n, d in enumerate(ids)
            for i in _simple(d, f"{where}.identifiers[{n}]", aliases_ok=False)
        )
    if not isinstance(fmt, str) or fmt not in _FIELDS:
        raise SubjectError(f"{where}.format {fmt!r} is not a known Subject Identifier format")
    values = []
    for name in _FIELDS[fmt]:
        value = doc.get(name)
        if not isinstance(value, str) or not value or len(value) > 512:
            raise SubjectError(f"{where}.{name} is not a string of 1 to 512 characters")
        values.append(value)
    if fmt == "account" and not values[0].startswith("acct:"):
        raise SubjectError(f"{where}.uri is not an acct: URI (RFC 7565)")
    return (Identifier(fmt, tuple(values)),)


def parse_subject(doc: Any, where: str = "sub_id") -> Subject:
    """RFC 9493 / SSF 1.0 §3.2; SubjectError names the member that is wrong."""
    if not isinstance(doc, Mapping):
        raise SubjectError(f"{where} is not a JSON object")
    fmt = doc.get("format")
    members = COMPLEX_MEMBERS.intersection(doc)
    if fmt == "complex" or (fmt is None and members):
        if not members:
            raise SubjectError(f"{where} is a complex subject without members")
        parsed = {m: _simple(doc[m], f"{where}.{m}") for m in sorted(members)}
        return Subject(
            user=parsed.get("user", ()),
            device=parsed.get("device", ()),
            session=parsed.get("session", ()),
            other=tuple(sorted(members - {"user", "device", "session"})),
        )
    return Subject(user=_simple(doc, where))


@dataclass(frozen=True, slots=True)
class Matcher:
    """Matches identifiers against sessions and devices for one transmitter.

    SECURITY: a transmitter speaks only for the people of `subject_issuers` (issue 17 item 4:
    users of two providers never collide). A sign-in session is within its reach when the
    provider that signed it in has one of those issuers; a session without a provider (a
    bearer token's) when its user is in the transmitter's user namespace. Names it gives (an
    opaque id, an address, a `sub`) are qualified with that namespace: another provider's
    "alice" is "partners:alice", never the directory's alice.
    """

    subject_issuers: tuple[str, ...]
    provider_issuers: Mapping[str, str]
    """Sign-in provider name -> its issuer (a session records the provider's name)."""
    namespace: str = ""
    """The user namespace of the people this transmitter names ("" : the directory's)."""

    def qualify(self, name: str) -> str:
        return f"{self.namespace}:{name}" if self.namespace else name

    def _issuer_of(self, session: Session) -> str | None:
        provider = session.extra.get("provider")
        return self.provider_issuers.get(provider) if isinstance(provider, str) else None

    def in_reach(self, session: Session) -> bool:
        if session.extra.get("provider") is not None:
            return self._issuer_of(session) in self.subject_issuers
        namespace = session.user.split(":", 1)[0] if ":" in session.user else ""
        return namespace == self.namespace

    def user_matches(self, ident: Identifier, session: Session) -> bool:
        if not self.in_reach(session):
            return False
        extra = session.extra
        fmt, values = ident.format, ident.values
        if fmt in ("email", "account"):
            address = values[0].removeprefix("acct:")
            return _same_address(address, extra.get("email")) or _same_address(
                self.qualify(address), session.user
            )
        if fmt == "iss_sub":
            iss, sub = values
            if iss not in self.subject_issuers:
                return False
            recorded = extra.get("sub")
            if recorded is not None:
                # The provider's own name for the person, from that provider only.
                return recorded == sub and self._issuer_of(session) == iss
            return session.user == self.qualify(sub)
        if fmt == "opaque":
            return session.user == self.qualify(values[0])
        return False

    def session_matches(self, ident: Identifier, session: Session) -> bool:
        if ident.format != "opaque" or not self.in_reach(session):
            return False
        sid = session.extra.get("sid")
        return isinstance(sid, str) and sid == ident.values[0]

    def named_users(self, subject: Subject) -> set[str]:
        """Gateway user names the subject's user member names directly (an opaque id, the `sub`
        of an accepted `iss_sub`, an address), qualified with the transmitter's namespace:
        candidates, for whoever has no session now."""
        names: set[str] = set()
        for ident in subject.user:
            fmt, values = ident.format, ident.values
            if fmt == "opaque":
                names.add(self.qualify(values[0]))
            elif fmt == "iss_sub" and values[0] in self.subject_issuers:
                names.add(self.qualify(values[1]))
            elif fmt in ("email", "account"):
                names.add(self.qualify(values[0].removeprefix("acct:")))
        return names

    def sessions(self, subject: Subject, sessions: list[Session], now: float) -> list[Session]:
        """Live sessions every given member of the subject matches (none without members the
        gateway can match: an event about a tenant alone ends nobody's session)."""
        if not (subject.user or subject.session or subject.device):
            return []
        out = []
        for s in sessions:
            if s.revoked or s.expires_at <= now or not self.in_reach(s):
                continue
            if subject.user and not any(self.user_matches(i, s) for i in subject.user):
                continue
            if subject.session and not any(self.session_matches(i, s) for i in subject.session):
                continue
            if subject.device and not any(
                s.device_id is not None and device_id_matches(i, s.device_id, None)
                for i in subject.device
            ):
                continue
            out.append(s)
        return out


def device_id_matches(ident: Identifier, device_id: str, fingerprint: str | None) -> bool:
    if ident.format in ("opaque", "uri"):
        value = ident.values[0]
        return value == device_id or (fingerprint is not None and value.lower() == fingerprint)
    return False


def devices(subject: Subject, known: list[Device]) -> list[Device]:
    """The devices a device-compliance event is about: its `device` member; a simple subject
    names a device directly when it is a device id (CAEP §3.5 lets the subject be the device)."""
    idents = subject.device or subject.user
    return [
        d for d in known if any(device_id_matches(i, d.device_id, d.fingerprint) for i in idents)
    ]


def _same_address(a: str, b: object) -> bool:
    """E-mail addresses compare case-insensitively in the domain; providers also fold the local
    part in practice (RFC 9493 §3.2.3 notes the ambiguity), so the whole address is folded."""
    return isinstance(b, str) and "@" in a and a.casefold() == b.casefold()
