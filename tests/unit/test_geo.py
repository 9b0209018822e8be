"""Geolocation: a real MaxMind-format database written per test; missing or corrupt files degrade."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet  # type: ignore[import-untyped]

from ztgateway.decision import Reason
from ztgateway.risk.geo import GeoLocator
from ztgateway.risk.scoring import RiskInputs, RiskWeights, evaluate

PARIS = (48.8566, 2.3522)
TOKYO = (35.6762, 139.6503)
PARIS_IP = "2.0.1.1"  # 2.0.0.0/16 -> Paris in the test database
TOKYO_IP = "126.0.7.7"  # 126.0.0.0/16 -> Tokyo
PARIS_V6 = "2a01:e00::42"  # 2a01:e00::/26 -> Paris


def city(lat: Any, lon: Any, name: str) -> dict[str, Any]:
    """The GeoLite2-City shape, with the fields the locator does not read, as real ones have."""
    return {
        "city": {"names": {"en": name}},
        "location": {"latitude": lat, "longitude": lon, "accuracy_radius": 20},
    }


def write_db(path: Path, networks: dict[str, dict[str, Any]], ip_version: int = 6) -> Path:
    writer = MMDBWriter(
        ip_version=ip_version, ipv4_compatible=ip_version == 6, database_type="GeoLite2-City"
    )
    for cidr, record in networks.items():
        writer.insert_network(IPSet([cidr]), record)
    writer.to_db_file(str(path))
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return write_db(
        tmp_path / "city.mmdb",
        {
            "2.0.0.0/16": city(*PARIS, "Paris"),
            "126.0.0.0/16": city(*TOKYO, "Tokyo"),
            "2a01:e00::/26": city(*PARIS, "Paris"),
            # A database may hold entries for private ranges; they must never be used.
            "10.0.0.0/8": city(*TOKYO, "Nowhere"),
            "5.0.0.0/16": {"country": {"iso_code": "XX"}},  # no location
            "6.0.0.0/16": city("48.8", 2.3, "Text"),  # latitude of the wrong type
            "7.0.0.0/16": city(95.0, 2.3, "Pole+"),  # latitude out of range
        },
    )


@pytest.fixture
def geo(db: Path) -> Iterator[GeoLocator]:
    locator = GeoLocator.open(db)
    yield locator
    locator.close()


def test_locates_ipv4_and_ipv6_networks(geo: GeoLocator) -> None:
    assert geo.available and geo.error is None
    assert geo.database_type == "GeoLite2-City"
    assert geo.locate(PARIS_IP) == PARIS
    assert geo.locate(TOKYO_IP) == TOKYO
    assert geo.locate(PARIS_V6) == PARIS
    assert geo.locate("::ffff:" + TOKYO_IP) == TOKYO  # IPv4 client on a dual-stack socket


@pytest.mark.parametrize(
    "ip",
    [
        "8.8.8.8",  # public but not in the database
        "10.1.2.3",  # private, even though the database has an entry
        "127.0.0.1",
        "::1",
        "192.168.1.1",
        "fe80::1",
        "100.64.0.1",  # carrier-grade NAT
        "5.0.1.1",  # record without a location
        "6.0.1.1",  # latitude is a string
        "7.0.1.1",  # latitude out of range
        "not-an-ip",
    ],
)
def test_no_location(geo: GeoLocator, ip: str) -> None:
    assert geo.locate(ip) is None


def test_lookups_are_cached_per_ip_and_bounded(db: Path) -> None:
    geo = GeoLocator.open(db, cache_size=2)
    try:
        for ip in (PARIS_IP, PARIS_IP, TOKYO_IP, PARIS_V6, PARIS_IP):
            geo.locate(ip)
        info = geo.cache_info()
        assert (info.hits, info.maxsize) == (1, 2)
        assert info.currsize == 2
    finally:
        geo.close()


def test_ipv6_lookup_in_ipv4_only_database_is_unknown_not_an_error(tmp_path: Path) -> None:
    path = write_db(tmp_path / "v4.mmdb", {"2.0.0.0/16": city(*PARIS, "Paris")}, ip_version=4)
    geo = GeoLocator.open(path)
    try:
        assert geo.locate(PARIS_IP) == PARIS
        assert geo.locate(PARIS_V6) is None
        assert geo.lookup_errors == 0
    finally:
        geo.close()


def test_no_database_configured_is_unavailable() -> None:
    geo = GeoLocator.open(None)
    assert not geo.available
    assert geo.error == "no geolocation database configured"
    assert geo.locate(PARIS_IP) is None


def test_missing_file_is_unavailable_and_says_which(tmp_path: Path) -> None:
    path = tmp_path / "absent.mmdb"
    geo = GeoLocator.open(path)
    assert not geo.available
    assert geo.error is not None and str(path) in geo.error
    assert geo.locate(PARIS_IP) is None


@pytest.mark.parametrize("size", [0, 16, 4096, 200_000])
def test_random_bytes_are_unavailable_without_raising(tmp_path: Path, size: int) -> None:
    path = tmp_path / "random.mmdb"
    path.write_bytes(os.urandom(size))
    geo = GeoLocator.open(path)
    assert not geo.available
    assert geo.error is not None and str(path) in geo.error
    assert geo.locate(PARIS_IP) is None


def test_corrupt_search_tree_with_intact_metadata_is_caught_at_open(db: Path) -> None:
    data = bytearray(db.read_bytes())
    metadata_at = data.rindex(b"\xab\xcd\xefMaxMind.com")
    data[: min(metadata_at, 64)] = b"\xff" * min(metadata_at, 64)
    db.write_bytes(bytes(data))
    geo = GeoLocator.open(db)
    assert not geo.available
    assert geo.error is not None and "corrupt" in geo.error


def test_a_directory_is_unavailable(tmp_path: Path) -> None:
    assert not GeoLocator.open(tmp_path).available


def test_closed_locator_answers_none(db: Path) -> None:
    geo = GeoLocator.open(db)
    assert geo.locate(PARIS_IP) == PARIS
    geo.close()
    assert not geo.available
    assert geo.locate(PARIS_IP) is None


def test_impossible_travel_between_two_located_ips(geo: GeoLocator) -> None:
    t0 = 1_800_000_000.0
    before, after = geo.locate(PARIS_IP), geo.locate(TOKYO_IP)
    assert before is not None and after is not None

    def inputs(seconds_later: float) -> RiskInputs:
        return RiskInputs(
            client_ip=TOKYO_IP,
            zone="trusted",
            location=after,
            previous_location=(*before, t0),
            now=t0 + seconds_later,
        )

    one_hour = evaluate(inputs(3600), RiskWeights())
    travel = one_hour.get(Reason.IMPOSSIBLE_TRAVEL)
    assert travel is not None and one_hour.score == pytest.approx(0.8)
    # Two days later the same move is a plausible flight.
    assert evaluate(inputs(2 * 86400), RiskWeights()).score == 0.0


def test_unavailable_database_is_reported_as_a_signal(tmp_path: Path) -> None:
    geo = GeoLocator.open(tmp_path / "absent.mmdb")
    result = evaluate(
        RiskInputs(
            client_ip=TOKYO_IP,
            zone="trusted",
            location=geo.locate(TOKYO_IP),
            geo_available=geo.available,
        ),
        RiskWeights(),
    )
    assert result.score == 0.0
    assert result.get(Reason.GEO_UNAVAILABLE) is not None
