"""Risk scoring: every signal about one request turned into one score in [0, 1], explained.

This module is a pure library: no I/O on the request path and no state, so it runs on every
request (a typical evaluation takes a few microseconds) and the risk stage, `policy explain` and
the tests all get the same answer from the same inputs. The stage gathers `RiskInputs` from the
request context and the store; `evaluate()` turns them into a `RiskResult`; `verdict_for()`
applies a route's thresholds.

Signals are combined with a noisy-OR, score = 1 - Π(1 - wᵢ·sᵢ): each signal is read as an
independent chance that the request is hostile, so two moderate signals add up to more than
either alone, yet no pile of signals can exceed 1 (a plain sum would, and a max would ignore
all but one). Each signal's share of the score is kept so that a refusal can say why.
"""

from __future__ import annotations

import ipaddress
import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, time
from pathlib import Path
from typing import Any, Final, Literal

from ..decision import Reason

Zone = Literal["trusted", "unknown", "blocked"]
RiskVerdict = Literal["allow", "step_up", "deny"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
WorkingHours = tuple[frozenset[int], time, time]
"""(weekdays with Monday = 0, start, end), with the same meaning as policy time windows: the end
is inclusive, and when start > end the window spans midnight and belongs to the day it starts."""

MIN_TRAVEL_SECONDS = 60.0
"""Travel time below this counts as this: the two timestamps may come from different replicas'
clocks, and a near-zero interval would turn a few kilometres of GeoIP noise into an infinite
speed."""

_EARTH_RADIUS_KM = 6371.0088  # IUGG mean Earth radius
# For the off-hours detail: strftime("%a") is slower and follows the process locale.
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


SIGNALS: Final = (
    Reason.ZONE_BLOCKED,
    Reason.ZONE_UNKNOWN,
    Reason.NEW_DEVICE,
    Reason.DEVICE_NONCOMPLIANT,
    Reason.POSTURE_STALE,
    Reason.OFF_HOURS,
    Reason.IMPOSSIBLE_TRAVEL,
    Reason.FAILED_ATTEMPTS,
    Reason.SENSITIVE_ROUTE_UNUSUAL,
    Reason.LARGE_REQUEST,
    Reason.GEO_UNAVAILABLE,
)
"""The reasons that are risk signals: a contribution's `signal` is one of them, so the risk
stage's findings, the audit and the metrics labels carry the one reason vocabulary.
GEO_UNAVAILABLE is informational (weight 0): impossible travel could not be checked; it is
recorded so that an explanation shows the check was skipped rather than passed."""


@dataclass(frozen=True, slots=True)
class RiskWeights:
    """How much each signal at full strength counts, as a probability in [0, 1].

    A weight of 1 makes the signal decisive on its own (score 1); 0 records the signal without
    counting it (useful to observe a signal before enforcing it). The defaults put a blocked
    network beyond any threshold, make the signals that suggest a stolen credential (impossible
    travel, a non-compliant device) strong, and keep the ones that ordinary people trigger every
    week (a new laptop, late work, an office without a known network) light, so that only their
    combination reaches a step-up.
    """

    zone_blocked: float = 1.0
    zone_unknown: float = 0.2
    new_device: float = 0.3
    device_noncompliant: float = 0.6
    posture_stale: float = 0.3
    off_hours: float = 0.2
    impossible_travel: float = 0.8
    failed_attempts: float = 0.4
    """At full strength, i.e. at `RiskInputs.failed_attempts_threshold` failures; scaled below."""
    sensitive_route: float = 0.3
    large_request: float = 0.2

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            # `not 0 <= v <= 1` is also true for NaN, which would poison every score.
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(
                    f"risk weight {f.name} must be a number from 0 to 1, not {value!r}"
                )
        # A blocked network is a stricter case of an untrusted one; weighting it lower would
        # make putting a network on the blocklist lower the risk of its requests.
        if self.zone_blocked < self.zone_unknown:
            raise ValueError(
                f"risk weight zone_blocked ({self.zone_blocked}) must not be below "
                f"zone_unknown ({self.zone_unknown})"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RiskWeights:
        """Build from configuration (`[risk.weights]`), keyed by field name; missing keys keep
        their default. An unknown key is an error rather than ignored: a misspelt weight would
        otherwise silently leave the default in force."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown risk weight {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def weight(self, signal: Reason) -> float:
        """The weight of `signal` (GEO_UNAVAILABLE is always 0: it only informs)."""
        if signal is Reason.GEO_UNAVAILABLE:
            return 0.0
        value: float = getattr(self, _WEIGHT_FIELD[signal])
        return value


_WEIGHT_FIELD: dict[Reason, str] = {
    Reason.ZONE_BLOCKED: "zone_blocked",
    Reason.ZONE_UNKNOWN: "zone_unknown",
    Reason.NEW_DEVICE: "new_device",
    Reason.DEVICE_NONCOMPLIANT: "device_noncompliant",
    Reason.POSTURE_STALE: "posture_stale",
    Reason.OFF_HOURS: "off_hours",
    Reason.IMPOSSIBLE_TRAVEL: "impossible_travel",
    Reason.FAILED_ATTEMPTS: "failed_attempts",
    Reason.SENSITIVE_ROUTE_UNUSUAL: "sensitive_route",
    Reason.LARGE_REQUEST: "large_request",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RiskInputs:
    """Everything the risk stage gathered about one request; `evaluate()` reads nothing else.

    The defaults are the neutral values (no signal), so a caller states only what it knows.
    Nothing is validated here because this object is built on every request; out-of-range
    values are clamped where they are used.
    """

    client_ip: str
    zone: Zone
    new_device: bool = False
    """First time this device is seen for this user."""
    device_compliant: bool | None = None
    """None: the route has no posture policy, so compliance is not a signal."""
    posture_stale: bool = False
    local_time: datetime | None = None
    """The current time in the user's own timezone (naive or aware; only its wall clock is read)."""
    working_hours: WorkingHours | None = None
    """None: the user has no working hours, so off-hours is not a signal."""
    location: tuple[float, float] | None = None
    """(latitude, longitude) of the client IP, when geolocation found one."""
    previous_location: tuple[float, float, float] | None = None
    """(latitude, longitude, unix time) of the user's previous located request."""
    now: float = 0.0
    """Unix time of this request, compared with previous_location's time."""
    max_speed_kmh: float = 1000.0
    """Faster than an airliner's average over a trip, including time at airports."""
    location_uncertainty_km: float = 100.0
    """Distance subtracted before computing speed: GeoIP places an address at a city-level
    guess, and a phone moving from Wi-Fi to mobile data can appear tens of km away within a
    minute. Without this slack every such switch would look like supersonic travel."""
    geo_available: bool = True
    """False when no usable geolocation database is loaded: adds GEO_UNAVAILABLE (weight 0)."""
    failed_attempts: int = 0
    """Recent failed attempts by this user, device or IP (the stage picks the largest)."""
    failed_attempts_threshold: int = 5
    """The count at which FAILED_ATTEMPTS is at full strength; below it, strength = count / this."""
    sensitive_route: bool = False
    route_seen_before_by_user: bool = True
    request_bytes: int | None = None
    """The declared Content-Length; None when unknown (chunked or no body)."""
    large_request_bytes: int = 10 * 1024 * 1024
    """A body larger than this raises LARGE_REQUEST; 0 disables the signal."""


@dataclass(frozen=True, slots=True)
class Contribution:
    """One signal's part in a score: `contribution` is its share, in the score's own units."""

    signal: Reason
    strength: float
    """How strongly the signal fired, 0..1 (1 for yes/no signals)."""
    weight: float
    contribution: float
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "signal": self.signal.value,
            "strength": round(self.strength, 4),
            "weight": self.weight,
            "contribution": round(self.contribution, 4),
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class RiskResult:
    """The score and the signals that made it, largest contribution first.

    The contributions sum to the score (to within float rounding), so an explanation can say
    "0.44 = new device 0.27 + off hours 0.17".
    """

    score: float
    contributions: tuple[Contribution, ...] = ()

    def get(self, signal: Reason) -> Contribution | None:
        for c in self.contributions:
            if c.signal is signal:
                return c
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "score": round(self.score, 4),
            "contributions": [c.to_json() for c in self.contributions],
        }


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (latitude, longitude) points in degrees.

    Haversine rather than the spherical law of cosines because it stays accurate for the short
    distances that matter most here; the spherical-Earth error (< 0.5 %) is far below GeoIP's.
    """
    lat1, lon1 = math.radians(a[0]), math.radians(a[1])
    lat2, lon2 = math.radians(b[0]), math.radians(b[1])
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    # min() guards asin against h creeping past 1 by rounding for antipodal points.
    return 2 * _EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, h)))


def travel_speed_kmh(
    prev: tuple[float, float], cur: tuple[float, float], dt_seconds: float
) -> float:
    """Speed needed to go from `prev` to `cur` in `dt_seconds`.

    An interval below MIN_TRAVEL_SECONDS, including zero and negative ones (clock skew between
    replicas, or requests that overtook each other), counts as MIN_TRAVEL_SECONDS, so the speed
    is always finite.
    """
    return haversine_km(prev, cur) / (max(dt_seconds, MIN_TRAVEL_SECONDS) / 3600.0)


def in_working_hours(local_time: datetime, hours: WorkingHours) -> bool:
    """Whether `local_time` falls inside `hours` (see WorkingHours for the exact meaning)."""
    days, start, end = hours
    weekday = local_time.weekday()
    t = local_time.time()  # naive wall-clock time, comparable with start and end
    if start <= end:
        return weekday in days and start <= t <= end
    # Spans midnight: 02:00 on Tuesday belongs to Monday's 22:00-06:00 shift.
    if t >= start:
        return weekday in days
    return (weekday - 1) % 7 in days and t <= end


def evaluate(inputs: RiskInputs, weights: RiskWeights) -> RiskResult:
    """Score one request. Pure: the same inputs and weights always give the same result."""
    fired: list[tuple[Reason, float, float, str]] = []

    if inputs.zone == "blocked":
        fired.append(
            (Reason.ZONE_BLOCKED, 1.0, weights.zone_blocked, f"{inputs.client_ip} is blocked")
        )
    elif inputs.zone == "unknown":
        fired.append(
            (
                Reason.ZONE_UNKNOWN,
                1.0,
                weights.zone_unknown,
                f"{inputs.client_ip} is not in a trusted network",
            )
        )

    if inputs.new_device:
        fired.append((Reason.NEW_DEVICE, 1.0, weights.new_device, "first request from this device"))
    if inputs.device_compliant is False:
        fired.append(
            (
                Reason.DEVICE_NONCOMPLIANT,
                1.0,
                weights.device_noncompliant,
                "device fails the posture policy",
            )
        )
    if inputs.posture_stale:
        fired.append(
            (Reason.POSTURE_STALE, 1.0, weights.posture_stale, "last posture report is too old")
        )

    if (
        inputs.local_time is not None
        and inputs.working_hours is not None
        and not in_working_hours(inputs.local_time, inputs.working_hours)
    ):
        fired.append(
            (
                Reason.OFF_HOURS,
                1.0,
                weights.off_hours,
                f"{_WEEKDAYS[inputs.local_time.weekday()]} {inputs.local_time.hour:02d}:"
                f"{inputs.local_time.minute:02d} is outside working hours",
            )
        )

    if not inputs.geo_available:
        fired.append(
            (Reason.GEO_UNAVAILABLE, 1.0, 0.0, "no geolocation database: travel not checked")
        )
    elif inputs.location is not None and inputs.previous_location is not None:
        travel = _impossible_travel(inputs.previous_location, inputs.location, inputs)
        if travel is not None:
            fired.append((Reason.IMPOSSIBLE_TRAVEL, 1.0, weights.impossible_travel, travel))

    if inputs.failed_attempts > 0:
        threshold = inputs.failed_attempts_threshold
        strength = 1.0 if threshold <= 0 else min(1.0, inputs.failed_attempts / threshold)
        fired.append(
            (
                Reason.FAILED_ATTEMPTS,
                strength,
                weights.failed_attempts,
                f"{inputs.failed_attempts} recent failed attempts (full at {threshold})",
            )
        )

    if inputs.sensitive_route and not inputs.route_seen_before_by_user:
        fired.append(
            (
                Reason.SENSITIVE_ROUTE_UNUSUAL,
                1.0,
                weights.sensitive_route,
                "sensitive route not used before by this user",
            )
        )

    if (
        inputs.request_bytes is not None
        and inputs.large_request_bytes > 0
        and inputs.request_bytes > inputs.large_request_bytes
    ):
        fired.append(
            (
                Reason.LARGE_REQUEST,
                1.0,
                weights.large_request,
                f"{inputs.request_bytes} bytes > {inputs.large_request_bytes}",
            )
        )

    return combine(fired)


def _impossible_travel(
    previous: tuple[float, float, float], current: tuple[float, float], inputs: RiskInputs
) -> str | None:
    """The explanation when the move from the previous location is too fast, else None."""
    plat, plon, pts = previous
    distance = haversine_km((plat, plon), current)
    effective = max(0.0, distance - inputs.location_uncertainty_km)
    dt = inputs.now - pts
    speed = effective / (max(dt, MIN_TRAVEL_SECONDS) / 3600.0)
    if speed <= inputs.max_speed_kmh:
        return None
    return (
        f"{distance:.0f} km in {max(dt, 0.0) / 60:.0f} min "
        f"({speed:.0f} km/h > {inputs.max_speed_kmh:.0f} km/h)"
    )


def combine(fired: Iterable[tuple[Reason, float, float, str]]) -> RiskResult:
    """Noisy-OR of (signal, strength, weight, detail), with each signal's share of the score.

    The share is proportional to -ln(1 - wᵢ·sᵢ). Noisy-OR is a plain sum in that space,
    -ln(1 - score) = Σ -ln(1 - wᵢ·sᵢ), so this split is exact, does not depend on the order of
    the signals, grows with each signal's own strength, and costs O(n). (A Shapley split is
    also fair but needs 2ⁿ sub-scores, too slow for every request.) Signals that are certain on
    their own (w·s = 1) share the score equally and leave nothing for the others, since nothing
    adds to certainty.
    """
    entries = fired if isinstance(fired, list) else list(fired)
    if not entries:
        return RiskResult(0.0)
    probabilities: list[float] = []
    strengths: list[float] = []
    survival = 1.0
    certain = 0
    for _signal, strength, weight, _detail in entries:
        s = strength if 0.0 <= strength <= 1.0 else _clamp(strength)
        p = weight * s
        if not 0.0 <= p <= 1.0:
            p = _clamp(p)
        strengths.append(s)
        probabilities.append(p)
        survival *= 1.0 - p
        if p >= 1.0:
            certain += 1
    score = 1.0 - survival
    if certain:
        shares = [1.0 / certain if p >= 1.0 else 0.0 for p in probabilities]
    else:
        logs = [-math.log1p(-p) for p in probabilities]
        total = math.fsum(logs)
        shares = [lg / total for lg in logs] if total > 0.0 else [0.0] * len(logs)
    contributions = [
        Contribution(signal, s, weight, score * share, detail)
        for (signal, _strength, weight, detail), s, share in zip(
            entries, strengths, shares, strict=True
        )
    ]
    if len(contributions) > 1:
        # Stable sort: equal contributions keep the order in which evaluate() fired them.
        contributions.sort(key=_by_contribution, reverse=True)
    return RiskResult(score, tuple(contributions))


def _clamp(x: float) -> float:
    """Into [0, 1]; NaN becomes 1, the fail-closed reading of a value nobody can interpret."""
    return 0.0 if x < 0.0 else 1.0


def _by_contribution(c: Contribution) -> float:
    return c.contribution


def validate_thresholds(allow_up_to: float, step_up_up_to: float) -> None:
    """Raise ValueError unless 0 <= allow_up_to <= step_up_up_to <= 1.

    Separate from verdict_for() so the configuration loader can refuse bad thresholds at load.
    """
    if not 0.0 <= allow_up_to <= step_up_up_to <= 1.0:
        raise ValueError(
            "risk thresholds must satisfy 0 <= allow_up_to <= step_up_up_to <= 1, "
            f"not allow_up_to={allow_up_to!r}, step_up_up_to={step_up_up_to!r}"
        )


def verdict_for(score: float, allow_up_to: float, step_up_up_to: float) -> RiskVerdict:
    """Allow when score <= allow_up_to, step up when <= step_up_up_to, deny above.

    A NaN score is denied: every comparison with NaN is false, so it falls through to the
    end, which is the fail-closed answer.
    """
    validate_thresholds(allow_up_to, step_up_up_to)
    if score <= allow_up_to:
        return "allow"
    if score <= step_up_up_to:
        return "step_up"
    return "deny"


class BlocklistError(ValueError):
    """A blocklist file that cannot be used; the message names the file and the line."""

    def __init__(self, path: Path, line_number: int | None, text: str) -> None:
        self.path = path
        self.line_number = line_number
        """None when the file as a whole cannot be read; `text` then says why."""
        self.text = text
        if line_number is None:
            message = f"{path}: cannot read blocklist: {text}"
        else:
            message = f"{path}:{line_number}: not an IP address or CIDR network: {text!r}"
        super().__init__(message)


def read_blocklist(path: Path) -> list[Network]:
    """Parse a blocklist: one IP or CIDR per line; blank lines and comments are ignored.

    `#` starts a comment, and so does `;`, so that published lists in the Spamhaus DROP format
    ("1.10.16.0/20 ; SBL256894") can be used as they are. Host bits are allowed
    (10.1.2.3/8 blocks 10.0.0.0/8): for a blocklist the wider reading is the safe one.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BlocklistError(path, None, e.strerror or str(e)) from e
    networks: list[Network] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise BlocklistError(path, number, raw.decode("utf-8", "replace")) from e
        text = line.split("#", 1)[0].split(";", 1)[0].strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as e:
            raise BlocklistError(path, number, line.strip()) from e
    return networks


class _RangeSet:
    """Disjoint, sorted integer ranges: membership is one bisect, whatever the count."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for start, end in sorted(ranges):
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [r[0] for r in merged]
        self._ends = [r[1] for r in merged]

    def __contains__(self, n: int) -> bool:
        i = bisect_right(self._starts, n) - 1
        return i >= 0 and n <= self._ends[i]

    def __len__(self) -> int:
        return len(self._starts)


def _ranges(networks: Iterable[Network]) -> tuple[_RangeSet, _RangeSet]:
    """(IPv4 ranges, IPv6 ranges). An IPv4-mapped IPv6 network (::ffff:a.b.c.d/n) is also
    entered as IPv4, since classify() looks mapped addresses up as IPv4."""
    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    for net in networks:
        if isinstance(net, ipaddress.IPv4Network):
            v4.append((int(net.network_address), int(net.broadcast_address)))
            continue
        v6.append((int(net.network_address), int(net.broadcast_address)))
        mapped = net.network_address.ipv4_mapped
        if mapped is not None and net.prefixlen >= 96:
            v4.append((int(mapped), int(mapped) + net.num_addresses - 1))
    return _RangeSet(v4), _RangeSet(v6)


class ZoneClassifier:
    """Puts a client IP into the trusted, unknown or blocked zone.

    Blocked wins over trusted (deny overrides allow): a trusted office range with one
    compromised host listed in the blocklist classifies that host as blocked. All networks are
    precomputed into merged integer ranges, so classify() costs one address parse and two
    bisects, with thousands of blocklist entries as with none.
    """

    def __init__(
        self,
        trusted: Sequence[Network],
        blocked: Sequence[Network],
        blocklist_file: Path | None = None,
    ) -> None:
        listed = read_blocklist(blocklist_file) if blocklist_file is not None else []
        self.blocklist_file = blocklist_file
        self.blocklist_entries = len(listed)
        self._blocked4, self._blocked6 = _ranges([*blocked, *listed])
        self._trusted4, self._trusted6 = _ranges(trusted)

    def classify(self, ip: str) -> Zone:
        """The zone of `ip`. A string that is not an IP address (a Unix-socket peer, say) is
        "unknown": nothing vouches for it, and the zone-unknown signal records that."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return "unknown"
        if isinstance(addr, ipaddress.IPv6Address):
            # SECURITY: a dual-stack listener shows IPv4 clients as ::ffff:a.b.c.d; an IPv4
            # blocklist must still apply to them.
            mapped = addr.ipv4_mapped
            if mapped is None:
                n = int(addr)
                if n in self._blocked6:
                    return "blocked"
                return "trusted" if n in self._trusted6 else "unknown"
            addr = mapped
        n = int(addr)
        if n in self._blocked4:
            return "blocked"
        return "trusted" if n in self._trusted4 else "unknown"
