"""IP geolocation from an optional MaxMind-format database, for the impossible-travel signal.

Geolocation is an extra signal, not a gate: a missing, unreadable or corrupt database must not
stop the gateway or deny requests. `GeoLocator.open()` therefore never raises; it returns a
locator with `available=False` and the reason in `error`, which /readyz and the logs report, and
the risk engine records GEO_UNAVAILABLE instead of silently skipping the check.

The database is memory-mapped (maxminddb's MODE_AUTO: the C extension when installed), so a
lookup is a few microseconds of tree walking without a system call, cheap enough to call
synchronously on the event loop; a bounded LRU in front keeps repeated clients cheaper still.
"""

from __future__ import annotations

import functools
import ipaddress
from pathlib import Path

import maxminddb

_PROBE_IP = "1.1.1.1"
"""Looked up once at open: a database whose metadata is intact but whose search tree is corrupt
opens without complaint and fails only on lookup, so open() walks the tree once to find out."""


class GeoLocator:
    """Latitude and longitude for client IPs; see the module docstring for failure handling."""

    def __init__(
        self,
        reader: maxminddb.Reader | None,
        *,
        path: Path | None = None,
        error: str | None = None,
        cache_size: int = 4096,
    ) -> None:
        self._reader = reader
        self.path = path
        self.error = error
        self.database_type: str | None = reader.metadata().database_type if reader else None
        self.lookup_errors = 0
        """Lookups that failed inside the database (corruption past the probe); each is
        answered with None, and the count is for metrics and /readyz."""
        # Per instance, not a module-level cache: two gateways in one process (tests, reload)
        # must not share entries from different databases.
        self._cached = functools.lru_cache(maxsize=cache_size)(self._lookup)

    @classmethod
    def open(cls, path: Path | None, *, cache_size: int = 4096) -> GeoLocator:
        """Open `path`, or return an unavailable locator saying why; never raises."""
        if path is None:
            return cls(None, error="no geolocation database configured", cache_size=cache_size)
        reader: maxminddb.Reader | None = None
        try:
            reader = maxminddb.open_database(path, maxminddb.MODE_AUTO)
            reader.get(_PROBE_IP)
        # The reader's failures on arbitrary bytes are not a closed set (InvalidDatabaseError,
        # OSError, and from the pure-Python decoder ValueError, IndexError, struct.error...);
        # whatever the cause, the answer is the same: the signal is unavailable, with the reason.
        except Exception as e:
            if reader is not None:
                reader.close()
            return cls(
                None,
                path=path,
                error=f"cannot use geolocation database {path}: {e}",
                cache_size=cache_size,
            )
        return cls(reader, path=path, cache_size=cache_size)

    @property
    def available(self) -> bool:
        return self._reader is not None

    def locate(self, ip: str) -> tuple[float, float] | None:
        """(latitude, longitude) of `ip`, or None when unknown.

        None also for addresses that are not globally routable (loopback, private, link-local,
        carrier-grade NAT, documentation ranges): a database has nothing true to say about
        them, and a stray entry would place every office client in one arbitrary city.
        """
        if self._reader is None:
            return None
        return self._cached(ip)

    def cache_info(self) -> functools._CacheInfo:
        return self._cached.cache_info()

    def close(self) -> None:
        """Unmap the database; later lookups answer None."""
        reader, self._reader = self._reader, None
        self._cached.cache_clear()
        if reader is not None:
            reader.close()

    def _lookup(self, ip: str) -> tuple[float, float] | None:
        reader = self._reader
        if reader is None:
            return None
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if not addr.is_global:
            return None
        try:
            record = reader.get(addr)
        except ValueError:
            # An IPv6 address looked up in an IPv4-only database: unknown, not a fault.
            return None
        except Exception:
            # Corruption the open-time probe did not reach: degrade this one lookup.
            self.lookup_errors += 1
            return None
        if not isinstance(record, dict):
            return None
        location = record.get("location")
        if not isinstance(location, dict):
            return None
        lat, lon = location.get("latitude"), location.get("longitude")
        if (
            isinstance(lat, bool)
            or isinstance(lon, bool)
            or not isinstance(lat, int | float)
            or not isinstance(lon, int | float)
            or not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0)
        ):
            return None
        return (float(lat), float(lon))
