"""A strict reader over parsed TOML tables.

Every value is read through a `Table`, which knows the file and the key path it came from, so
an error always names both ("config/gateway.toml: routes[2].upstream: ..."). Keys that were
never read are unknown keys and an error too: a typo in a security setting must not silently
fall back to a default.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, NoReturn


class ConfigError(Exception):
    """A configuration problem, always naming the file and the key path."""

    def __init__(self, file: Path | str, key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + message)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


class Table:
    def __init__(self, data: dict[str, Any], file: Path, path: str = "") -> None:
        self.data = data
        self.file = file
        self.where = path
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, message: str) -> NoReturn:
        raise ConfigError(self.file, self.key(name) if name else self.where, message)

    def has(self, name: str) -> bool:
        return name in self.data

    def _get(self, name: str, kind: type, default: Any, required: bool) -> Any:
        self._read.add(name)
        if name not in self.data:
            if required:
                self.fail(name, "is required")
            return default
        value = self.data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, bool):
            self.fail(name, f"must be {_TYPE_NAMES[int]}, not {value!r}")
        if not isinstance(value, kind):
            self.fail(name, f"must be {_TYPE_NAMES.get(kind, kind.__name__)}, not {value!r}")
        return value

    def text(self, name: str, default: str | None = None, *, required: bool = False) -> Any:
        return self._get(name, str, default, required)

    def integer(
        self,
        name: str,
        default: int | None = None,
        *,
        required: bool = False,
        min: int | None = None,
        max: int | None = None,
    ) -> Any:
        return self._bounded(name, self._get(name, int, default, required), min, max)

    def number(
        self,
        name: str,
        default: float | None = None,
        *,
        required: bool = False,
        min: float | None = None,
        max: float | None = None,
    ) -> Any:
        return self._bounded(name, self._get(name, float, default, required), min, max)

    def duration(
        self,
        name: str,
        default: float | None = None,
        *,
        required: bool = False,
        min: float | None = None,
        max: float | None = None,
    ) -> Any:
        """Seconds: a number (`1800`) or a duration string (`"30m"`, `"1h30m"`, `"7d"`)."""
        from .durations import parse_duration

        self._read.add(name)
        if name in self.data and isinstance(self.data[name], str):
            try:
                value: Any = parse_duration(self.data[name], default_unit="s")
            except ValueError as exc:
                self.fail(name, str(exc))
            return self._bounded(name, value, min, max)
        if name in self.data and isinstance(self.data[name], bool | int | float):
            if isinstance(self.data[name], bool):
                self.fail(
                    name, f'must be a duration (seconds or like "30m"), not {self.data[name]!r}'
                )
            return self._bounded(name, float(self.data[name]), min, max)
        if name in self.data:
            self.fail(name, f'must be a duration (seconds or like "30m"), not {self.data[name]!r}')
        if required:
            self.fail(name, "is required")
        return default

    def _bounded(self, name: str, value: Any, low: float | None, high: float | None) -> Any:
        if value is not None:
            if low is not None and value < low:
                self.fail(name, f"must be at least {low}, not {value}")
            if high is not None and value > high:
                self.fail(name, f"must be at most {high}, not {value}")
        return value

    def flag(self, name: str, default: bool | None = None, *, required: bool = False) -> Any:
        return self._get(name, bool, default, required)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.text(name, default)
        if value not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def str_list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(name, list, None, False)
        if value is None:
            return default
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{name}[{i}]", f"must be a string, not {item!r}")
        return tuple(value)

    def path(self, name: str, *, required: bool = False, must_exist: bool = True) -> Path | None:
        """Relative paths are relative to the config file's folder, so a config is portable."""
        value = self.text(name, None, required=required)
        if value is None:
            return None
        resolved: Path = (self.file.parent / str(value)).resolve()
        if must_exist and not resolved.exists():
            self.fail(name, f"file not found: {resolved}")
        return resolved

    def table(self, name: str, *, required: bool = False) -> Table:
        value = self._get(name, dict, None, required)
        return Table(value if value is not None else {}, self.file, self.key(name))

    def tables(self, name: str) -> list[Table]:
        value = self._get(name, list, None, False)
        if value is None:
            return []
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                self.fail(f"{name}[{i}]", "must be a table")
            out.append(Table(item, self.file, f"{self.key(name)}[{i}]"))
        return out

    def named_tables(self, name: str) -> dict[str, Table]:
        """`[name.X]` sections: a table of tables keyed by a name."""
        outer = self.table(name)
        out: dict[str, Table] = {}
        for key in list(outer.data):
            out[key] = outer.table(key)
        outer.done()
        return out

    def cidrs(self, name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        out = []
        for i, item in enumerate(self.str_list(name)):
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.fail(f"{name}[{i}]", f"is not an IP network: {item!r}")
        return tuple(out)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            self.fail(
                unknown[0],
                "unknown key" + (f" (also: {', '.join(unknown[1:])})" if unknown[1:] else ""),
            )
