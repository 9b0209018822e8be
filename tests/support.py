"""Test support: a TOML writer, config builders and TLS clients for a real gateway."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now, for a server a test starts as another process."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Enough TOML for gateway configs: scalars, lists, tables and arrays of tables."""
    lines: list[str] = []
    nested: list[tuple[str, Any]] = []
    for k, v in data.items():
        if isinstance(v, Mapping) and not (prefix and k in ("claims", "headers") and _flat(v)):
            nested.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            nested.append((k, v))
        else:
            lines.append(f"{json.dumps(k)} = {_toml_value(v)}")
    for k, v in nested:
        name = f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)
        if isinstance(v, list):
            for item in v:
                lines.append(f"\n[[{name}]]")
                lines.append(to_toml(item, name))
        else:
            lines.append(f"\n[{name}]")
            lines.append(to_toml(v, name))
    return "\n".join(lines)


def _flat(v: Mapping[str, Any]) -> bool:
    return all(not isinstance(x, Mapping) for x in v.values())


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


@dataclass
class Certs:
    dir: Path
    ca: Path
    ca_key: Path
    server: Path
    server_key: Path
    crl: Path
    issuer_key: Path
    issuer_jwks: Path

    def client(self, name: str) -> tuple[Path, Path]:
        return self.dir / "clients" / f"{name}.pem", self.dir / "clients" / f"{name}.key"


def client_ssl(
    certs: Certs, name: str | None = "alice-laptop", *, tls13: bool = True
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if name:
        pem, key = certs.client(name)
        ctx.load_cert_chain(str(pem), str(key))
    return ctx


def session(certs: Certs, name: str | None = "alice-laptop", **kw: Any) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        ssl=client_ssl(certs, name), force_close=kw.pop("force_close", False)
    )
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, **kw)
