"""The risk stage: every signal the gateway has about a request, as one explained score.

It only adds findings — one informational finding per contributing signal, with its share of
the score — and turns the score into a verdict with the route's thresholds: allow up to A,
step-up up to B, deny above. The scoring itself is `ztgateway/risk/scoring.py` (pure, no I/O); this
stage gathers its inputs from the context and the store's memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from ..config import parse_time_window
from ..context import RequestContext
from ..decision import Finding, Reason, Verdict
from ..risk.geo import GeoLocator
from ..risk.scoring import (
    RiskInputs,
    WorkingHours,
    Zone,
    ZoneClassifier,
    evaluate,
    in_working_hours,
    verdict_for,
)

if TYPE_CHECKING:
    from ..runtime import Runtime
    from ..store.base import UserRecord

NAME = "risk"


def build_zones(runtime: Runtime) -> ZoneClassifier:
    cfg = runtime.config
    nets = cfg.zones
    trusted = [n for z in cfg.risk.trusted_zones for n in nets[z]]
    blocked = [n for z in cfg.risk.blocked_zones for n in nets[z]]
    return ZoneClassifier(trusted=trusted, blocked=blocked, blocklist_file=cfg.risk.blocklist)


class RiskStage:
    name = NAME

    def __init__(self, runtime: Runtime, *, zones: ZoneClassifier, geo: GeoLocator) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.cfg = runtime.config.risk
        self.zones = zones
        self.geo = geo
        self._hours_cache: dict[str, tuple[ZoneInfo, WorkingHours] | None] = {}
        self._zone_cache: dict[str, Zone] = {}
        self._results: dict[tuple[object, ...], tuple[float, tuple[Finding, ...]]] = {}

    def _zone(self, ip: str) -> Zone:
        """Per-IP cache: parsing an address costs more than the whole rest of a lookup."""
        zone = self._zone_cache.get(ip)
        if zone is None:
            zone = self.zones.classify(ip)
            if len(self._zone_cache) >= 65536:
                self._zone_cache.clear()
            self._zone_cache[ip] = zone
        return zone

    def _hours(self, account: UserRecord | None) -> tuple[ZoneInfo, WorkingHours] | None:
        tz_name = (account.timezone if account else None) or self.cfg.default_timezone
        spec = (account.working_hours if account else None) or self.cfg.default_working_hours
        if not spec:
            return None
        key = f"{tz_name}|{spec}"
        if key not in self._hours_cache:
            try:
                tz = ZoneInfo(tz_name)
                window = parse_time_window(spec, tz)
                self._hours_cache[key] = (tz, (window.days, window.start, window.end))
            except (ValueError, KeyError):
                self._hours_cache[key] = None
        return self._hours_cache[key]

    async def check(self, ctx: RequestContext) -> Sequence[Finding]:
        route = ctx.route
        assert route is not None
        store = self.store
        cfg = self.cfg
        now = ctx.now
        ident = ctx.identity
        user = ident.user if ident else None
        account = store.user(user) if (store is not None and user) else None
        device_id = ctx.cert.device_id if ctx.cert else None
        view = ctx.device
        compliant: bool | None = None
        stale = False
        if view is not None and view.posture is not None and view.posture.reported_at is not None:
            compliant = view.posture.compliant or (
                view.posture.stale and len(view.posture.failed) == 1
            )
            stale = view.posture.stale
        hours = self._hours(account)
        local_time = datetime.fromtimestamp(now, hours[0]) if hours else None
        location = self.geo.locate(ctx.client_ip) if self.geo.available else None
        failed = 0
        if store is not None:
            window = cfg.failed_attempts_window
            for key in (
                f"user:{user}" if user else None,
                f"device:{device_id}" if device_id else None,
                f"ip:{ctx.client_ip}",
            ):
                if key:
                    failed = max(failed, await store.failures_async(key, now, window))
        length = ctx.headers.get("Content-Length")
        request_bytes = int(length) if length and length.isdigit() else None
        new_device = bool(
            user and device_id and (account is None or device_id not in account.known_devices)
        )
        unusual = route.risk.sensitive and not (account and route.name in account.known_routes)
        # Most requests carry only time-independent signals: their evaluation is cached by
        # those inputs (off-hours and travel depend on the clock and are never cached).
        cache_key: tuple[object, ...] | None = None
        if location is None and (hours is None or in_working_hours(local_time, hours[1])):  # type: ignore[arg-type]
            big = (
                request_bytes if request_bytes and request_bytes > cfg.large_request_bytes else None
            )
            cache_key = (
                ctx.client_ip,
                new_device,
                compliant,
                stale,
                failed,
                unusual,
                big,
                route.name,
            )
            hit = self._results.get(cache_key)
            if hit is not None:
                ctx.risk_score, ctx.risk_location = hit[0], None
                return hit[1]
        inputs = RiskInputs(
            client_ip=ctx.client_ip,
            zone=self._zone(ctx.client_ip),
            new_device=new_device,
            device_compliant=compliant,
            posture_stale=stale,
            local_time=local_time,
            working_hours=hours[1] if hours else None,
            location=location,
            previous_location=account.last_location if account else None,
            now=now,
            max_speed_kmh=cfg.max_travel_speed_kmh,
            geo_available=self.geo.available or cfg.geoip_db is None,
            failed_attempts=failed,
            failed_attempts_threshold=cfg.failed_attempts_threshold,
            sensitive_route=route.risk.sensitive,
            route_seen_before_by_user=not unusual,
            request_bytes=request_bytes,
            large_request_bytes=cfg.large_request_bytes,
        )
        result = evaluate(inputs, cfg.weights)
        ctx.risk_score = result.score
        ctx.risk_location = location
        out = [
            Finding(NAME, c.signal, None, risk=c.contribution, detail=c.detail)
            for c in result.contributions
        ]
        verdict = verdict_for(result.score, route.risk.allow_up_to, route.risk.step_up_up_to)
        if verdict == "step_up":
            out.append(
                Finding(
                    NAME,
                    Reason.RISK_STEP_UP,
                    Verdict.STEP_UP,
                    risk=result.score,
                    detail=f"score {result.score:.2f}",
                )
            )
        elif verdict == "deny":
            out.append(
                Finding(
                    NAME,
                    Reason.RISK_DENIED,
                    Verdict.DENY,
                    risk=result.score,
                    detail=f"score {result.score:.2f}",
                )
            )
        if cache_key is not None:
            if len(self._results) >= 65536:
                self._results.clear()
            self._results[cache_key] = (result.score, tuple(out))
        return out
