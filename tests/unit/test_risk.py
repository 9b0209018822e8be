"""Risk scoring: each signal, the noisy-OR combination and its explanation, zones, thresholds."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import random
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

import pytest

from ztgateway.decision import Reason
from ztgateway.risk.scoring import (
    MIN_TRAVEL_SECONDS,
    SIGNALS,
    BlocklistError,
    RiskInputs,
    RiskResult,
    RiskWeights,
    ZoneClassifier,
    combine,
    evaluate,
    haversine_km,
    in_working_hours,
    read_blocklist,
    travel_speed_kmh,
    verdict_for,
)

PARIS = (48.8566, 2.3522)
TOKYO = (35.6762, 139.6503)
LONDON = (51.5074, -0.1278)
T0 = 1_800_000_000.0
HOUR = 3600.0
OFFICE_HOURS = (frozenset(range(5)), time(9), time(17))  # Monday to Friday, 09:00-17:00
NIGHT_SHIFT = (frozenset(range(5)), time(22), time(6))  # shifts starting Monday to Friday
W = RiskWeights()


def quiet(**changes: Any) -> RiskInputs:
    """A request that raises no signal at all; each test turns on only what it is about."""
    base = RiskInputs(
        client_ip="10.0.0.5",
        zone="trusted",
        device_compliant=True,
        local_time=datetime(2026, 3, 2, 10, 0),  # a Monday
        working_hours=OFFICE_HOURS,
        location=PARIS,
        previous_location=(*PARIS, T0 - HOUR),
        now=T0,
        sensitive_route=True,
        route_seen_before_by_user=True,
        request_bytes=1000,
    )
    return dataclasses.replace(base, **changes)


# Each signal alone, with the weight that must come out of it at full strength.
ALONE: dict[Reason, tuple[dict[str, Any], float]] = {
    Reason.ZONE_BLOCKED: ({"zone": "blocked"}, W.zone_blocked),
    Reason.ZONE_UNKNOWN: ({"zone": "unknown"}, W.zone_unknown),
    Reason.NEW_DEVICE: ({"new_device": True}, W.new_device),
    Reason.DEVICE_NONCOMPLIANT: ({"device_compliant": False}, W.device_noncompliant),
    Reason.POSTURE_STALE: ({"posture_stale": True}, W.posture_stale),
    Reason.OFF_HOURS: ({"local_time": datetime(2026, 3, 2, 23, 0)}, W.off_hours),
    Reason.IMPOSSIBLE_TRAVEL: ({"location": TOKYO}, W.impossible_travel),
    Reason.FAILED_ATTEMPTS: ({"failed_attempts": 5}, W.failed_attempts),
    Reason.SENSITIVE_ROUTE_UNUSUAL: ({"route_seen_before_by_user": False}, W.sensitive_route),
    Reason.LARGE_REQUEST: ({"request_bytes": 50 * 1024 * 1024}, W.large_request),
}


def test_quiet_request_scores_zero() -> None:
    result = evaluate(quiet(), W)
    assert result == RiskResult(0.0, ())


def test_every_weighted_signal_has_a_scenario() -> None:
    assert set(ALONE) == set(SIGNALS) - {Reason.GEO_UNAVAILABLE}


@pytest.mark.parametrize("signal", list(ALONE), ids=str)
def test_signal_alone_contributes_its_weight(signal: Reason) -> None:
    changes, weight = ALONE[signal]
    result = evaluate(quiet(**changes), W)
    assert result.score == pytest.approx(weight, abs=1e-12)
    (only,) = result.contributions
    assert only.signal is signal
    assert only.strength == 1.0
    assert only.weight == weight == W.weight(signal)
    assert only.contribution == pytest.approx(result.score, abs=1e-12)
    assert only.detail


def test_default_weights_are_the_documented_ones() -> None:
    assert dataclasses.asdict(W) == {
        "zone_blocked": 1.0,
        "zone_unknown": 0.2,
        "new_device": 0.3,
        "device_noncompliant": 0.6,
        "posture_stale": 0.3,
        "off_hours": 0.2,
        "impossible_travel": 0.8,
        "failed_attempts": 0.4,
        "sensitive_route": 0.3,
        "large_request": 0.2,
    }


def test_two_signals_combine_by_noisy_or_and_split_by_log_share() -> None:
    result = evaluate(quiet(new_device=True, local_time=datetime(2026, 3, 7, 10, 0)), W)
    # 1 - (1 - 0.3)(1 - 0.2) = 0.44, split in proportion to -ln(0.7) : -ln(0.8).
    assert result.score == pytest.approx(0.44, abs=1e-12)
    new_device = result.get(Reason.NEW_DEVICE)
    off_hours = result.get(Reason.OFF_HOURS)
    assert new_device is not None and off_hours is not None
    assert new_device.contribution == pytest.approx(0.2706657, abs=1e-7)
    assert off_hours.contribution == pytest.approx(0.1693343, abs=1e-7)
    # Largest first, so an explanation leads with what mattered most.
    assert [c.signal for c in result.contributions] == [Reason.NEW_DEVICE, Reason.OFF_HOURS]


def everything(**changes: Any) -> RiskInputs:
    on: dict[str, Any] = {}
    for signal, (signal_changes, _weight) in ALONE.items():
        if signal is not Reason.ZONE_BLOCKED:
            on.update(signal_changes)
    on.update(changes)
    return quiet(**on)


def test_all_signals_together_stay_below_one_and_sum_to_the_score() -> None:
    result = evaluate(everything(), W)
    expected = 1 - math.prod(1 - w for s, (_c, w) in ALONE.items() if s is not Reason.ZONE_BLOCKED)
    assert result.score == pytest.approx(expected, abs=1e-12)
    assert 0.99 < result.score < 1.0
    assert len(result.contributions) == len(ALONE) - 1
    assert math.fsum(c.contribution for c in result.contributions) == pytest.approx(
        result.score, abs=1e-12
    )


def test_certain_signal_takes_the_whole_score() -> None:
    result = evaluate(everything(zone="blocked"), W)
    assert result.score == 1.0
    blocked = result.get(Reason.ZONE_BLOCKED)
    assert blocked is not None and blocked.contribution == 1.0
    assert all(c.contribution == 0.0 for c in result.contributions if c is not blocked)


def test_two_certain_signals_share_the_score_equally() -> None:
    weights = RiskWeights(zone_blocked=1.0, impossible_travel=1.0)
    result = evaluate(quiet(zone="blocked", location=TOKYO), weights)
    assert result.score == 1.0
    assert [c.contribution for c in result.contributions] == [0.5, 0.5]


def test_combine_clamps_out_of_range_and_reads_nan_as_certain() -> None:
    assert combine([(Reason.NEW_DEVICE, 7.0, 0.3, "")]).score == pytest.approx(0.3)
    assert combine([(Reason.NEW_DEVICE, -1.0, 0.3, "")]).score == 0.0
    assert combine([(Reason.NEW_DEVICE, math.nan, 0.3, "")]).score == pytest.approx(0.3)
    assert combine([(Reason.NEW_DEVICE, 1.0, math.nan, "")]).score == 1.0
    assert combine(iter([])) == RiskResult(0.0)


def test_weight_zero_records_the_signal_without_counting_it() -> None:
    result = evaluate(quiet(new_device=True), RiskWeights(new_device=0.0))
    assert result.score == 0.0
    (only,) = result.contributions
    assert (only.signal, only.weight, only.contribution) == (Reason.NEW_DEVICE, 0.0, 0.0)


def random_inputs(rng: random.Random) -> RiskInputs:
    changes: dict[str, Any] = {}
    for signal, (signal_changes, _w) in ALONE.items():
        if signal is not Reason.ZONE_BLOCKED and rng.random() < 0.5:
            changes.update(signal_changes)
    changes["failed_attempts"] = rng.randrange(0, 8) if "failed_attempts" not in changes else 5
    return quiet(**changes)


def random_weights(rng: random.Random) -> RiskWeights:
    values = {f.name: rng.random() for f in dataclasses.fields(RiskWeights)}
    values["zone_blocked"] = max(values["zone_blocked"], values["zone_unknown"])
    return RiskWeights(**values)


def test_contributions_sum_to_the_score_for_any_mix() -> None:
    rng = random.Random(4)
    for _ in range(500):
        result = evaluate(random_inputs(rng), random_weights(rng))
        assert 0.0 <= result.score <= 1.0
        assert all(c.contribution >= 0.0 for c in result.contributions)
        total = math.fsum(c.contribution for c in result.contributions)
        assert total == pytest.approx(result.score, abs=1e-12)


def weight_name(signal: Reason) -> str:
    return (
        "sensitive_route"
        if signal is Reason.SENSITIVE_ROUTE_UNUSUAL
        else signal.value.replace("-", "_")
    )


def heavier(weights: RiskWeights, signal: Reason) -> RiskWeights:
    """`weights` with `signal` weighted 0.1 more (and zone_blocked kept at least zone_unknown)."""
    values = dataclasses.asdict(weights)
    values[weight_name(signal)] = min(1.0, weights.weight(signal) + 0.1)
    values["zone_blocked"] = max(values["zone_blocked"], values["zone_unknown"])
    return RiskWeights(**values)


@pytest.mark.parametrize("signal", list(ALONE), ids=str)
def test_score_is_monotonic_in_each_signal(signal: Reason) -> None:
    rng = random.Random(str(signal))
    changes, _weight = ALONE[signal]
    for _ in range(100):
        base = random_inputs(rng)
        weights = random_weights(rng)
        before = evaluate(base, weights).score
        after = evaluate(dataclasses.replace(base, **changes), weights).score
        assert after >= before
        # A heavier weight on a signal that fired never lowers the score either.
        assert (
            evaluate(dataclasses.replace(base, **changes), heavier(weights, signal)).score >= after
        )


@pytest.mark.parametrize(("count", "strength"), [(1, 0.2), (2, 0.4), (4, 0.8), (5, 1.0), (50, 1.0)])
def test_failed_attempts_scale_up_to_the_threshold(count: int, strength: float) -> None:
    result = evaluate(quiet(failed_attempts=count, failed_attempts_threshold=5), W)
    (only,) = result.contributions
    assert only.strength == pytest.approx(strength)
    assert result.score == pytest.approx(0.4 * strength)


def test_failed_attempts_score_never_falls_as_failures_grow() -> None:
    scores = [evaluate(quiet(failed_attempts=n), W).score for n in range(12)]
    assert scores == sorted(scores)
    assert scores[0] == 0.0


def test_failed_attempts_with_zero_threshold_is_full_strength_not_a_crash() -> None:
    result = evaluate(quiet(failed_attempts=1, failed_attempts_threshold=0), W)
    assert result.score == pytest.approx(W.failed_attempts)


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        (datetime(2026, 3, 2, 10, 0), True),  # Monday morning
        (datetime(2026, 3, 2, 9, 0), True),  # start is inclusive
        (datetime(2026, 3, 2, 17, 0), True),  # end is inclusive, as in policy time windows
        (datetime(2026, 3, 2, 8, 59), False),
        (datetime(2026, 3, 2, 17, 1), False),
        (datetime(2026, 3, 7, 10, 0), False),  # Saturday
    ],
)
def test_office_hours(when: datetime, inside: bool) -> None:
    assert in_working_hours(when, OFFICE_HOURS) is inside


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        (datetime(2026, 3, 2, 23, 0), True),  # Monday night: Monday's shift
        (datetime(2026, 3, 3, 2, 0), True),  # Tuesday 02:00: still Monday's shift
        (datetime(2026, 3, 2, 2, 0), False),  # Monday 02:00 would be Sunday's shift: none
        (datetime(2026, 3, 7, 5, 59), True),  # Saturday early morning: Friday's shift
        (datetime(2026, 3, 7, 23, 0), False),  # Saturday night: no shift starts Saturday
        (datetime(2026, 3, 3, 12, 0), False),  # midday between shifts
    ],
)
def test_working_hours_across_midnight(when: datetime, inside: bool) -> None:
    assert in_working_hours(when, NIGHT_SHIFT) is inside
    result = evaluate(quiet(local_time=when, working_hours=NIGHT_SHIFT), W)
    assert (result.get(Reason.OFF_HOURS) is None) is inside


def test_off_hours_detail_names_the_local_time() -> None:
    result = evaluate(quiet(local_time=datetime(2026, 3, 7, 23, 5)), W)
    off_hours = result.get(Reason.OFF_HOURS)
    assert off_hours is not None and off_hours.detail == "Sat 23:05 is outside working hours"


def test_aware_local_time_uses_its_own_wall_clock() -> None:
    monday_10_utc = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
    assert evaluate(quiet(local_time=monday_10_utc), W).score == 0.0


def test_no_working_hours_or_no_local_time_is_no_signal() -> None:
    sunday_night = datetime(2026, 3, 1, 3, 0)
    assert evaluate(quiet(local_time=sunday_night, working_hours=None), W).score == 0.0
    assert evaluate(quiet(local_time=None), W).score == 0.0


def test_haversine_known_distances() -> None:
    assert haversine_km(PARIS, LONDON) == pytest.approx(343.5, rel=0.01)
    assert haversine_km(PARIS, TOKYO) == pytest.approx(9712, rel=0.01)
    assert haversine_km(PARIS, PARIS) == 0.0
    # Antipodes: half the circumference, without a math domain error.
    assert haversine_km((0.0, 0.0), (0.0, 180.0)) == pytest.approx(math.pi * 6371.0088)


def test_paris_to_tokyo_in_one_hour_is_impossible_travel() -> None:
    result = evaluate(quiet(previous_location=(*PARIS, T0 - HOUR), location=TOKYO), W)
    travel = result.get(Reason.IMPOSSIBLE_TRAVEL)
    assert travel is not None
    assert "km/h" in travel.detail
    assert travel_speed_kmh(PARIS, TOKYO, HOUR) > 9000


def test_paris_to_london_in_three_hours_is_not() -> None:
    result = evaluate(quiet(previous_location=(*PARIS, T0 - 3 * HOUR), location=LONDON), W)
    assert result.get(Reason.IMPOSSIBLE_TRAVEL) is None
    assert travel_speed_kmh(PARIS, LONDON, 3 * HOUR) == pytest.approx(114.5, rel=0.01)


def test_tiny_zero_or_negative_interval_counts_as_one_minute() -> None:
    per_minute = haversine_km(PARIS, LONDON) * 60
    for dt in (0.0, -30.0, 0.001, 1.0, MIN_TRAVEL_SECONDS):
        speed = travel_speed_kmh(PARIS, LONDON, dt)
        assert math.isfinite(speed)
        assert speed == pytest.approx(per_minute)
    assert travel_speed_kmh(PARIS, PARIS, 0.0) == 0.0
    # A previous request stamped after this one (clock skew) still judges the distance.
    result = evaluate(quiet(previous_location=(*PARIS, T0 + 5), location=LONDON), W)
    assert result.get(Reason.IMPOSSIBLE_TRAVEL) is not None


def test_geoip_jitter_within_the_uncertainty_is_not_travel() -> None:
    nearby = (48.8566, 2.9)  # about 40 km east of Paris, seconds later: Wi-Fi to 4G
    result = evaluate(quiet(previous_location=(*PARIS, T0 - 10), location=nearby), W)
    assert result.get(Reason.IMPOSSIBLE_TRAVEL) is None
    strict = quiet(previous_location=(*PARIS, T0 - 10), location=nearby, location_uncertainty_km=0)
    assert evaluate(strict, W).get(Reason.IMPOSSIBLE_TRAVEL) is not None


def test_travel_needs_both_locations() -> None:
    assert evaluate(quiet(location=None), W).score == 0.0
    assert evaluate(quiet(location=TOKYO, previous_location=None), W).score == 0.0


def test_geo_unavailable_is_informational() -> None:
    result = evaluate(quiet(geo_available=False, location=None), W)
    assert result.score == 0.0
    (only,) = result.contributions
    assert (only.signal, only.weight, only.contribution) == (Reason.GEO_UNAVAILABLE, 0.0, 0.0)
    assert W.weight(Reason.GEO_UNAVAILABLE) == 0.0


def test_device_compliance_unknown_is_not_a_signal() -> None:
    assert evaluate(quiet(device_compliant=None), W).score == 0.0


def test_sensitive_route_counts_only_when_unusual_and_sensitive() -> None:
    assert evaluate(quiet(sensitive_route=False, route_seen_before_by_user=False), W).score == 0
    assert evaluate(quiet(sensitive_route=True, route_seen_before_by_user=True), W).score == 0


def test_large_request_threshold_and_unknown_size() -> None:
    limit = 1000
    assert evaluate(quiet(request_bytes=limit, large_request_bytes=limit), W).score == 0.0
    assert evaluate(quiet(request_bytes=limit + 1, large_request_bytes=limit), W).score > 0.0
    assert evaluate(quiet(request_bytes=None, large_request_bytes=limit), W).score == 0.0
    assert evaluate(quiet(request_bytes=10**12, large_request_bytes=0), W).score == 0.0


def test_result_serialises_for_audit() -> None:
    result = evaluate(quiet(new_device=True), W)
    assert result.to_json() == {
        "score": 0.3,
        "contributions": [
            {
                "signal": "new-device",
                "strength": 1.0,
                "weight": 0.3,
                "contribution": 0.3,
                "detail": "first request from this device",
            }
        ],
    }


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf, True, "0.5"])
def test_weight_outside_zero_to_one_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="off_hours"):
        RiskWeights(off_hours=bad)


def test_blocked_zone_may_not_weigh_less_than_unknown() -> None:
    with pytest.raises(ValueError, match="zone_blocked"):
        RiskWeights(zone_blocked=0.1, zone_unknown=0.2)
    RiskWeights(zone_blocked=0.0, zone_unknown=0.0)  # observing zones without counting them


def test_weights_from_configuration() -> None:
    weights = RiskWeights.from_mapping({"new_device": 0.5})
    assert weights == dataclasses.replace(W, new_device=0.5)
    with pytest.raises(ValueError, match="new_devise"):
        RiskWeights.from_mapping({"new_devise": 0.5})


# -- thresholds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "verdict"),
    [(0.0, "allow"), (0.3, "allow"), (0.31, "step_up"), (0.6, "step_up"), (0.61, "deny")],
)
def test_verdict_for_thresholds(score: float, verdict: str) -> None:
    assert verdict_for(score, 0.3, 0.6) == verdict


def test_equal_thresholds_mean_no_step_up() -> None:
    assert verdict_for(0.5, 0.5, 0.5) == "allow"
    assert verdict_for(0.51, 0.5, 0.5) == "deny"


def test_nan_score_is_denied() -> None:
    assert verdict_for(math.nan, 0.3, 0.6) == "deny"


@pytest.mark.parametrize(
    ("allow", "step_up"), [(0.7, 0.6), (-0.1, 0.5), (0.3, 1.1), (math.nan, 0.5)]
)
def test_invalid_thresholds_are_refused(allow: float, step_up: float) -> None:
    with pytest.raises(ValueError, match="allow_up_to"):
        verdict_for(0.1, allow, step_up)


# -- zones -----------------------------------------------------------------------------------


def nets(*texts: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(t) for t in texts]


ZONES = ZoneClassifier(
    trusted=nets("10.0.0.0/8", "192.168.0.0/24", "192.168.1.0/24", "2001:db8:1::/48"),
    blocked=nets("10.66.0.0/16", "2001:db8:1:bad::/64"),
    blocklist_file=None,
)


@pytest.mark.parametrize(
    ("ip", "zone"),
    [
        ("10.1.2.3", "trusted"),
        ("10.66.1.1", "blocked"),  # blocked wins inside a trusted range
        ("192.168.0.0", "trusted"),
        ("192.168.1.255", "trusted"),  # adjacent ranges merged, end inclusive
        ("192.168.2.0", "unknown"),
        ("11.0.0.0", "unknown"),
        ("9.255.255.255", "unknown"),
        ("2001:db8:1::5", "trusted"),
        ("2001:db8:1:bad::5", "blocked"),
        ("2001:db8:2::5", "unknown"),
        ("::ffff:10.1.2.3", "trusted"),  # IPv4 client on a dual-stack socket
        ("::ffff:10.66.0.1", "blocked"),
        ("fe80::1%eth0", "unknown"),
        ("not-an-ip", "unknown"),
        ("", "unknown"),
    ],
)
def test_zone_classification(ip: str, zone: str) -> None:
    assert ZONES.classify(ip) == zone


def test_v4_mapped_blocked_network_applies_to_v4_clients() -> None:
    zones = ZoneClassifier(trusted=[], blocked=nets("::ffff:198.51.100.0/120"), blocklist_file=None)
    assert zones.classify("198.51.100.7") == "blocked"
    assert zones.classify("198.51.101.7") == "unknown"


def test_ten_thousand_line_blocklist(tmp_path: Path) -> None:
    rng = random.Random(10_000)
    lines = ["# generated blocklist", ""]
    listed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    while len(lines) < 10_000:
        kind = rng.randrange(4)
        if kind == 0:
            net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.ip_network(
                (rng.getrandbits(32) & ~0xFF, 24)
            )
        elif kind == 1:
            net = ipaddress.ip_network((rng.getrandbits(32), 32))
        elif kind == 2:
            net = ipaddress.ip_network((rng.getrandbits(128) >> 80 << 80, 48))
        else:
            lines.append("   # a comment line")
            continue
        listed.append(net)
        text = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        lines.append(text + ("  # noted" if rng.random() < 0.1 else ""))
    path = tmp_path / "blocklist.txt"
    path.write_text("\n".join(lines) + "\n")

    zones = ZoneClassifier(trusted=nets("0.0.0.0/0"), blocked=[], blocklist_file=path)
    assert zones.blocklist_entries == len(listed)
    probes = [n.network_address + rng.randrange(n.num_addresses) for n in listed[:3000]]
    for net in listed[:3000]:
        if int(net.network_address) > 0:
            probes.append(net.network_address - 1)
        if int(net.broadcast_address) < 2**net.max_prefixlen - 1:
            probes.append(net.broadcast_address + 1)
    probes += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(3000)]
    probes += [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(1000)]
    # An independent oracle: every listed network is a /24 or /32 (IPv4) or a /48 (IPv6).
    v4_24 = {int(n.network_address) for n in listed if n.version == 4 and n.prefixlen == 24}
    v4_32 = {int(n.network_address) for n in listed if n.version == 4 and n.prefixlen == 32}
    v6_48 = {int(n.network_address) >> 80 for n in listed if n.version == 6}
    for addr in probes:
        n = int(addr)
        if addr.version == 4:
            expected = "blocked" if n in v4_32 or n & ~0xFF in v4_24 else "trusted"
        else:
            expected = "blocked" if n >> 80 in v6_48 else "unknown"
        assert zones.classify(str(addr)) == expected, addr


def test_blocklist_comments_and_spamhaus_format(tmp_path: Path) -> None:
    path = tmp_path / "drop.txt"
    path.write_text(
        "\ufeff; Spamhaus DROP List\n"
        "1.10.16.0/20 ; SBL256894\n"
        "203.0.113.9   # one host\n"
        "\n"
        "2001:db8:dead::/48\n"
        "10.1.2.3/8\n"  # host bits set: the whole /8 is blocked
    )
    assert [str(n) for n in read_blocklist(path)] == [
        "1.10.16.0/20",
        "203.0.113.9/32",
        "2001:db8:dead::/48",
        "10.0.0.0/8",
    ]


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "300.1.1.1", "example.com", "10.0.0.0/8 extra"])
def test_bad_blocklist_line_names_file_and_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text(f"# header\n10.0.0.0/8\n\n{bad}\n192.0.2.1\n")
    with pytest.raises(BlocklistError) as caught:
        ZoneClassifier(trusted=[], blocked=[], blocklist_file=path)
    err = caught.value
    assert (err.path, err.line_number, err.text) == (path, 4, bad)
    assert str(err).startswith(f"{path}:4: ")
    assert repr(bad) in str(err)


def test_non_utf8_blocklist_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_bytes(b"10.0.0.0/8\n\xff\xfe\n")
    with pytest.raises(BlocklistError) as caught:
        read_blocklist(path)
    assert caught.value.line_number == 2


def test_missing_blocklist_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.txt"
    with pytest.raises(BlocklistError, match=r"absent\.txt: cannot read blocklist") as caught:
        ZoneClassifier(trusted=[], blocked=[], blocklist_file=path)
    assert caught.value.line_number is None
