"""Throttle floods of invalid credentials from one source before they cost a verification.

A bearer token that is not in the verified-token cache costs a signature check, a certificate
from an edge header a path validation; a client sending fresh garbage on every request makes
every one of them pay. Failed verifications are counted per client address in the store (so
replicas on Redis share the count); past `[server] invalid_credentials_limit` within
`invalid_credentials_window` seconds, further credentials from that address are refused with
429 `credentials-throttled` *before* they are verified, until the window has moved on. Other
addresses are not affected, and a credential that verified is never counted.

Once an address is over the limit, the refusal is answered from process memory (bounded), so a
flood costs neither verification nor store round trips.
"""

from __future__ import annotations

from collections import OrderedDict

from ..store.base import Store

KEY_PREFIX = "cred:"
_MEMORY = 65_536


class CredentialThrottle:
    def __init__(self, store: Store | None, *, limit: int, window: float, dry_run: bool) -> None:
        self.store = store
        self.limit = limit
        self.window = window
        self.dry_run = dry_run
        self._blocked: OrderedDict[str, float] = OrderedDict()

    async def wait(self, client_ip: str, now: float) -> float:
        """Seconds until `client_ip` may present credentials again; 0 when it may now."""
        until = self._blocked.get(client_ip)
        if until is not None:
            if now < until:
                return until - now
            del self._blocked[client_ip]
        if self.store is None or self.limit <= 0:
            return 0.0
        failures = await self.store.failures_async(KEY_PREFIX + client_ip, now, self.window)
        if failures < self.limit:
            return 0.0
        self._remember(client_ip, now + self.window)
        return self.window

    async def failed(self, client_ip: str, now: float) -> None:
        """One credential from `client_ip` failed verification."""
        if self.store is None or self.dry_run or self.limit <= 0:
            return
        await self.store.record_failure_async(KEY_PREFIX + client_ip, now)

    def _remember(self, client_ip: str, until: float) -> None:
        self._blocked[client_ip] = until
        self._blocked.move_to_end(client_ip)
        while len(self._blocked) > _MEMORY:
            self._blocked.popitem(last=False)


__all__ = ["CredentialThrottle"]
