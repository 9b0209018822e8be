"""What the gateway's own endpoints may use of it: the `Services` protocol.

The pages people see (`portal/`), the operator side (`ops/`) and the identity provider's
signal endpoints (`signals/endpoints.py`) take a `Services`, never the `Gateway`: they cannot
reach its lifecycle, its listener or its private state, and they do not import `app.py` (which
imports them to dispatch `/.ztgw/` and to start the ops listener), so no import circle holds
them together (issue 15; tests/unit/test_endpoint_boundary.py checks both). `app.Gateway`
implements it; mypy checks that wherever a `Gateway` is passed as one.

Every member is here because an endpoint uses it; a new need is added here, by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from .audit import AuditLog
    from .clock import Clock
    from .config import GatewayConfig
    from .context import RequestContext
    from .credentials.jwt import TokenVerifier
    from .credentials.mfa import MFA
    from .credentials.oidc import OIDCClient
    from .credentials.providers import SignInProviders
    from .credentials.webauthn import WebAuthn
    from .decision import Decision, Reason, Verdict
    from .decisions import DecisionPath
    from .edge.tlsmaterial import TLSManager
    from .metrics import Metrics
    from .pipeline import Pipeline
    from .portal.forms import CSRFTokens
    from .runtime import Runtime
    from .sessions import SessionKeeper
    from .signals.backchannel import BackchannelLogout
    from .signals.receiver import SignalReceiver
    from .store.base import Store


class Services(Protocol):
    """The gateway as its endpoints see it (read-only: an endpoint swaps nothing)."""

    # --- the configuration snapshot and time ----------------------------------------------
    @property
    def config(self) -> GatewayConfig:
        """The configuration now (a reload replaces it; read it once per request)."""

    @property
    def runtime(self) -> Runtime:
        """The configuration snapshot a request is judged under: routes, throttle, store."""

    @property
    def pipeline(self) -> Pipeline:
        """The stages built from `runtime` (replaced with it, as one pair, on reload)."""

    def dry_snapshot(self) -> tuple[Runtime, Pipeline]:
        """The current snapshot and its stages, judging without side effects (`/decide`)."""

    @property
    def clock(self) -> Clock: ...

    # --- decide and record ---------------------------------------------------------------
    @property
    def decisions(self) -> DecisionPath:
        """The one decide-and-record path (decisions.py) every entry point uses."""

    def record_outcome(
        self, ctx: RequestContext, stage: str, verdict: Verdict, reason: Reason, detail: str = ""
    ) -> None:
        """Audit and count an endpoint's own outcome; raises AuditUnavailable."""

    def audit_event(
        self, ctx: RequestContext, decision: Decision, request: object = None
    ) -> dict[str, Any]:
        """The decision-log event of `decision` (masked), for an event of another type."""

    @property
    def audit(self) -> AuditLog: ...

    @property
    def metrics(self) -> Metrics: ...

    def asserted_identity(self, ctx: RequestContext, decision: Decision) -> dict[str, str]:
        """The identity headers and signed assertion an allowed request carries upstream."""

    # --- state and credentials -----------------------------------------------------------
    @property
    def store(self) -> Store: ...

    @property
    def keeper(self) -> SessionKeeper:
        """Browser sessions: started at sign-in and step-up, rotated, ended."""

    async def ensure_device(self, ctx: RequestContext) -> None:
        """Register the presented certificate's device on its first contact."""

    @property
    def tls(self) -> TLSManager:
        """The current TLS material: the client-certificate verifier and the revocations."""

    @property
    def tokens(self) -> TokenVerifier | None: ...

    @property
    def providers(self) -> SignInProviders:
        """Every configured identity provider."""

    @property
    def oidc(self) -> OIDCClient | None:
        """The first identity provider, or None when sign-in is not configured."""

    @property
    def csrf(self) -> CSRFTokens: ...

    @property
    def mfa(self) -> MFA: ...

    @property
    def webauthn(self) -> WebAuthn: ...

    @property
    def signals(self) -> SignalReceiver:
        """Security events from the identity provider (signals/endpoints.py)."""

    @property
    def backchannel(self) -> BackchannelLogout:
        """OIDC back-channel logout (signals/endpoints.py)."""

    # --- the operator side ---------------------------------------------------------------
    @property
    def ops_socket(self) -> Path | None:
        """A worker's ops socket (the supervisor relays its caller's address), else None."""

    @property
    def last_reload(self) -> dict[str, Any]:
        """What the last reload applied, or why it was refused."""

    def reload(self) -> bool:
        """Load the configuration again (SIGHUP); False, still serving the old, on an error."""

    async def readiness(self) -> dict[str, Any]:
        """`/readyz`: each dependency's check."""


SERVICES_KEY: web.AppKey[Services] = web.AppKey("services")
"""Where the ops application keeps the `Services` its handlers use."""
