"""One configuration snapshot and the services built from it.

A request reads `gateway.runtime` and `gateway.pipeline` together, once, and uses that pair
throughout, so a reload (SIGHUP) swaps configuration, routes and stages atomically without a
request ever seeing half of each. The stages are built from a `Runtime`; the runtime does not
hold them (it sits below the stages, which import only downward): whoever needs both, the
gateway, `policy explain` or the benchmarks, holds the (runtime, pipeline) pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .clock import SYSTEM_CLOCK, Clock
from .config import GatewayConfig
from .credentials.jwt import TokenVerifier
from .credentials.throttle import CredentialThrottle
from .edge.tls import RevocationList
from .metrics import Metrics
from .risk.geo import GeoLocator
from .routes import RouteTable
from .store.base import Store

if TYPE_CHECKING:
    from .revocation.service import RevocationService


@dataclass
class Runtime:
    config: GatewayConfig
    routes: RouteTable
    metrics: Metrics
    revocations: Callable[[], RevocationList]
    revocation: RevocationService | None = None
    """Fetched CRLs, OCSP and shared revocations; None where nothing may be fetched (explain)."""
    tokens: TokenVerifier | None = None
    store: Store | None = None
    dry_run: bool = False
    geo: GeoLocator = field(default_factory=lambda: GeoLocator.open(None))
    """explain / policy test / /decide: judge, but never write (no device registration)."""
    clock: Clock = SYSTEM_CLOCK
    throttle: CredentialThrottle = field(init=False)
    """Failed credential verifications per client address (credentials/throttle.py)."""

    def __post_init__(self) -> None:
        s = self.config.server
        self.throttle = CredentialThrottle(
            self.store,
            limit=s.invalid_credentials_limit,
            window=s.invalid_credentials_window,
            dry_run=self.dry_run,
        )
