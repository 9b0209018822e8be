"""The identity providers people sign in with: one `OIDCClient` each, found by name or callback.

Several providers (`[oidc.NAME]`) are one `SignInProviders`: the chooser offers the ones a
route allows (`[routes.policy] providers`, all when unset), a callback is finished by the one
provider whose redirect URI it arrived at (RFC 9700 §4.4.2: a distinct redirect URI per
provider defends against mix-up), and a session names the provider that signed it in, so a
route can refuse a session of a provider it does not accept. The login attempts of every
provider wait in the one shared store (each attempt names its provider), so a sign-in started
on one worker or replica finishes on another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence

from .oidc import OIDCClient, OIDCProviderConfig, PendingLogins


class SignInProviders:
    """The configured providers' clients, in the configuration's order."""

    def __init__(
        self,
        providers: Sequence[OIDCProviderConfig],
        make_client: Callable[[OIDCProviderConfig], OIDCClient],
    ) -> None:
        self._clients = {p.name: make_client(p) for p in providers}

    @classmethod
    def build(
        cls,
        providers: Sequence[OIDCProviderConfig],
        *,
        clock: Callable[[], float],
        secret: bytes,
        pending: PendingLogins,
    ) -> SignInProviders:
        return cls(providers, lambda p: OIDCClient(p, clock=clock, secret=secret, pending=pending))

    def __bool__(self) -> bool:
        return bool(self._clients)

    def __iter__(self) -> Iterator[OIDCClient]:
        return iter(self._clients.values())

    def __len__(self) -> int:
        return len(self._clients)

    @property
    def first(self) -> OIDCClient | None:
        return next(iter(self._clients.values()), None)

    def get(self, name: str | None) -> OIDCClient | None:
        return self._clients.get(name) if name is not None else None

    def offered(self, allowed: Sequence[str]) -> list[OIDCClient]:
        """The providers a route accepts (`allowed`, in its order; empty: all of them)."""
        if not allowed:
            return list(self._clients.values())
        return [self._clients[n] for n in allowed if n in self._clients]

    def by_callback(self, path: str) -> OIDCClient | None:
        """The provider whose redirect URI's path is `path` (config.py keeps them distinct)."""
        return next((c for c in self._clients.values() if c.cfg.callback_path == path), None)

    async def start(self) -> None:
        # Discovery of each is independent: one provider being down delays no other.
        await asyncio.gather(*(c.start() for c in self._clients.values()))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._clients.values()))
