"""The signal receiver's metrics, on the gateway's own registry; labels from closed sets only
(transmitter names from the configuration, results from RFC 8935's error codes, event labels
from events.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from .tokens import ERROR_CODES, KEYS_UNAVAILABLE

RESULTS: Final = ("accepted", "replayed", *ERROR_CODES, KEYS_UNAVAILABLE)
VIA: Final = ("push", "poll")
POLL_FAILURES: Final = ("unreachable", "status", "invalid_response")
SOURCES: Final = ("ssf", "backchannel_logout")
UNKNOWN: Final = "unknown"
"""The transmitter label of a SET whose issuer no `[signals.NAME]` names."""


class SignalMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.sets = Counter(
            "ztgw_ssf_sets",
            "Security Event Tokens received, by transmitter, delivery and result "
            "(accepted, replayed, or the RFC 8935 error code they were refused with).",
            ["transmitter", "via", "result"],
            registry=r,
        )
        self.events = Counter(
            "ztgw_ssf_events",
            "Events in accepted SETs by transmitter, event type and the action taken.",
            ["transmitter", "event", "action"],
            registry=r,
        )
        self.last_delivery = Gauge(
            "ztgw_ssf_last_delivery_timestamp_seconds",
            "When the transmitter last delivered: an accepted SET, or a successful poll.",
            ["transmitter"],
            registry=r,
        )
        self.max_silence = Gauge(
            "ztgw_ssf_max_silence_seconds",
            "The configured max_silence of the stream: the alert fires past it.",
            ["transmitter"],
            registry=r,
        )
        self.poll_failures = Counter(
            "ztgw_ssf_poll_failures",
            "Polls of a transmitter's endpoint that failed, by reason.",
            ["transmitter", "reason"],
            registry=r,
        )
        self.logout_tokens = Counter(
            "ztgw_backchannel_logout_tokens",
            "OIDC back-channel logout tokens received, by result.",
            ["result"],
            registry=r,
        )
        self.sessions_ended = Counter(
            "ztgw_signal_sessions_ended",
            "Sessions ended by a signal from the identity provider, by source.",
            ["source"],
            registry=r,
        )
        self.step_ups = Counter(
            "ztgw_signal_step_ups",
            "Users asked for a fresh second factor by a signal (CAEP credential-change, "
            "assurance-level-change).",
            registry=r,
        )

    def prepare(self, transmitters: Sequence[tuple[str, str, float | None]], now: float) -> None:
        """Every series exists from the start (a rate over a series that appears late misses
        its first increase); the silence clock of each stream starts now."""
        for name, via, silence in transmitters:
            for result in RESULTS:
                self.sets.labels(name, via, result)
            self.last_delivery.labels(name).set(now)
            if silence is not None:
                self.max_silence.labels(name).set(silence)
            if via == "poll":
                for reason in POLL_FAILURES:
                    self.poll_failures.labels(name, reason)
        for result in RESULTS:
            self.logout_tokens.labels(result)
        for source in SOURCES:
            self.sessions_ended.labels(source)
