"""`make run`: the demo app, the dev IdP and the gateway in front of them, in one command.

Development only. Every port comes from one place: the configuration file (config/gateway.toml)
unless moved by flags (`make run GATEWAY_PORT=… OPS_PORT=… APP_PORT=… IDP_PORT=…`) or all at
once by an offset (`make run PORT_OFFSET=10000`, or `ZTGW_PORT_OFFSET=10000` in the
environment). A moved port reaches everything that names it: the gateway's listener, public URL,
ops port, upstream and OIDC issuer; the demo app; the dev IdP and the redirect URIs it accepts;
and the lines printed to try. The moved files are written beside the originals (`.*.ports.toml`,
git-ignored) so their relative paths still hold.

"running" is printed only once the demo app answers, the dev IdP serves its discovery document
and the gateway's /readyz says ready; a port already taken is named before anything starts, and
a part that exits during start-up stops the others. SIGINT (Ctrl-C) and SIGTERM stop all three.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..clock import SYSTEM_CLOCK

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class Ports:
    gateway: int
    ops: int
    app: int
    idp: int


# -- the configuration, with ports moved -----------------------------------------------------

_HEADER = re.compile(r"^\s*\[([^\[\]]+)\]\s*(?:#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")


def _toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def set_keys(text: str, values: dict[tuple[str, str], Any]) -> str:
    """`text` with `[section] key = value` set for each ((section, key), value); a key the
    section lacks is added under its header. Comments and layout stay as they were."""
    lines = text.splitlines()
    for (section, key), value in values.items():
        rendered = f"{key} = {_toml_value(value)}"
        start = next(
            (
                i
                for i, line in enumerate(lines)
                if (m := _HEADER.match(line)) and m.group(1).strip() == section
            ),
            None,
        )
        if start is None:
            lines += ["", f"[{section}]", rendered]
            continue
        end = next(
            (j for j in range(start + 1, len(lines)) if _ANY_HEADER.match(lines[j])), len(lines)
        )
        key_line = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for j in range(start + 1, end):
            if key_line.match(lines[j]):
                # A multi-line array ends where its brackets balance.
                k = j
                depth = lines[j].split("#", 1)[0].count("[") - lines[j].split("#", 1)[0].count("]")
                while depth > 0 and k + 1 < end:
                    k += 1
                    depth += lines[k].count("[") - lines[k].count("]")
                lines[j : k + 1] = [rendered]
                break
        else:
            lines.insert(start + 1, rendered)
    out = "\n".join(lines) + "\n"
    parsed = tomllib.loads(out)
    for (section, key), value in values.items():
        node: Any = parsed
        for part in section.split("."):
            node = node[part.strip().strip('"')]
        assert node[key] == value, (section, key)
    return out


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    return urlunsplit((parts.scheme, f"{shown}:{port}", parts.path, parts.query, parts.fragment))


def _port_of(url: str, default: int) -> int:
    return urlsplit(url).port or default


def configured_ports(config: dict[str, Any]) -> Ports:
    server = config.get("server", {})
    upstream = config.get("upstreams", {}).get("demo", {}).get("url", "http://127.0.0.1:8080")
    issuer = config.get("oidc", {}).get("issuer", "http://127.0.0.1:9200")
    return Ports(
        gateway=int(server.get("port", 8443)),
        ops=int(config.get("ops", {}).get("port", 9100)),
        app=_port_of(upstream, 8080),
        idp=_port_of(issuer, 9200),
    )


def choose_ports(config: dict[str, Any], args: argparse.Namespace) -> Ports:
    base = configured_ports(config)
    offset = args.port_offset

    def pick(given: int | None, configured: int) -> int:
        port = given if given is not None else configured + offset
        if not 1 <= port <= 65535:
            raise SystemExit(f"error: port {port} is out of range (offset {offset})")
        return port

    return Ports(
        gateway=pick(args.gateway_port, base.gateway),
        ops=pick(args.ops_port, base.ops),
        app=pick(args.app_port, base.app),
        idp=pick(args.idp_port, base.idp),
    )


def moved_gateway_config(text: str, config: dict[str, Any], ports: Ports) -> str:
    server = config.get("server", {})
    public = server.get("public_url") or f"https://127.0.0.1:{ports.gateway}"
    values: dict[tuple[str, str], Any] = {
        ("server", "port"): ports.gateway,
        ("server", "public_url"): _with_port(public, ports.gateway),
        ("ops", "port"): ports.ops,
    }
    upstream = config.get("upstreams", {}).get("demo", {}).get("url")
    if upstream:
        values[("upstreams.demo", "url")] = _with_port(upstream, ports.app)
    issuer = config.get("oidc", {}).get("issuer")
    if issuer:
        values[("oidc", "issuer")] = _with_port(issuer, ports.idp)
    # The dev IdP as a Shared Signals transmitter (dev/ssf.py): its issuer and keys move with it.
    for name, transmitter in config.get("signals", {}).items():
        for key in ("issuer", "jwks_url", "poll_url"):
            url = transmitter.get(key)
            if url and _port_of(url, 80) == configured_ports(config).idp:
                values[(f"signals.{name}", key)] = _with_port(url, ports.idp)
    return set_keys(text, values)


def moved_idp_users(text: str, old_gateway: int, new_gateway: int) -> str:
    """The dev IdP's clients with their gateway redirect URIs moved to the gateway's port."""
    data = tomllib.loads(text)
    values: dict[tuple[str, str], Any] = {}

    def moved(u: str) -> str:
        return _with_port(u, new_gateway) if _port_of(u, 443) == old_gateway else u

    for name, client in data.get("clients", {}).items():
        for key in ("redirect_uris", "post_logout_redirect_uris"):
            uris = client.get(key)
            if not uris:
                continue
            if [moved(u) for u in uris] != uris:
                values[(f"clients.{name}", key)] = [moved(u) for u in uris]
        backchannel = client.get("backchannel_logout_uri")
        if backchannel and moved(backchannel) != backchannel:
            values[(f"clients.{name}", "backchannel_logout_uri")] = moved(backchannel)
    push = data.get("ssf", {}).get("push_url")
    if push and moved(push) != push:
        values[("ssf", "push_url")] = moved(push)
    return set_keys(text, values) if values else text


def _write_beside(original: Path, text: str) -> Path:
    path = original.with_name(f".{original.stem}.ports.toml")
    path.write_text(text)
    return path


# -- processes -------------------------------------------------------------------------------


def ensure_transmitter_cert(certs: Path) -> None:
    """The dev IdP's client certificate, for what it sends the gateway's mTLS port (SSF pushes,
    back-channel logout tokens; config/dev-idp-users.toml [outgoing])."""
    if (certs / "clients" / "dev-idp.pem").exists() or not (certs / "ca.key").exists():
        return
    from .pki import PKIError, issue_client

    try:
        issue_client(certs, "dev-idp", user="dev-idp")
    except PKIError as exc:
        print(f"warning: no client certificate for the dev IdP: {exc}", file=sys.stderr)


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port_offset(ports: tuple[int, ...] = (8443, 9100, 8080, 9200)) -> int:
    """An offset that moves every one of the demo's ports onto a free one (for scripts and
    tests that run the demo beside another).

    The ports stay below the kernel's ephemeral range: a port free when chosen but inside it
    can be taken a moment later as the local port of any outgoing connection (seen in CI: the
    moved ops port was "already in use" when the demo bound it).
    """
    rng = random.SystemRandom()
    highest = _ephemeral_low() - 1 - max(ports)
    lowest = max(1, min(10000, highest - 1000))
    if highest <= lowest:  # an ephemeral range starting unusually low: any free port then
        lowest, highest = 20000, 50000
    for _ in range(200):
        offset = rng.randrange(lowest, highest)
        if not any(port_taken(p + offset) for p in ports):
            return offset
    raise SystemExit("no free ports for the demo")


def _ephemeral_low() -> int:
    """The first port the kernel hands out for outgoing connections (Linux; else IANA's)."""
    try:
        low = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        return int(low)
    except (OSError, ValueError, IndexError):
        return 49152


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # Linux: the child gets SIGTERM if the runner dies (even by SIGKILL), so nothing is left.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(argv: list[str]) -> subprocess.Popen[bytes]:
    # Its own session: a Ctrl-C in the terminal reaches the runner alone, which then stops
    # the parts in order instead of each catching the signal half-way through its start-up.
    return subprocess.Popen(
        argv,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
    )


def _answers(url: str) -> int | None:
    """The status `url` answers, or None while nothing answers HTTP there yet. An answer that
    is not HTTP counts as none: probing a port in the ephemeral range before its server binds
    it can connect the probe to itself (TCP simultaneous open), and it reads back its own
    request as the status line."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - our own loopback URLs
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, http.client.HTTPException):
        return None


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = SYSTEM_CLOCK.monotonic() + STOP_TIMEOUT
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - SYSTEM_CLOCK.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def _wait_until_ready(procs: dict[str, subprocess.Popen[bytes]], checks: dict[str, str]) -> bool:
    """Each part answers its URL (the gateway: /readyz says 200); False, said on stderr, when
    one exits or stays silent."""
    waiting = dict(checks)
    deadline = SYSTEM_CLOCK.monotonic() + START_TIMEOUT
    while waiting:
        for name in list(waiting):
            proc = procs[name]
            if proc.poll() is not None:
                print(
                    f"\nerror: the {name} exited during start-up (exit {proc.returncode}); "
                    "its error is above. Stopping the others.",
                    file=sys.stderr,
                )
                return False
            status = _answers(waiting[name])
            if status is not None and (name != "gateway" or status == 200):
                del waiting[name]
        if waiting and SYSTEM_CLOCK.monotonic() > deadline:
            print(
                f"\nerror: no answer from the {', '.join(waiting)} within {START_TIMEOUT:.0f} s",
                file=sys.stderr,
            )
            return False
        if waiting:
            time.sleep(0.2)
    return True


def hints(ports: Ports, public_url: str) -> str:
    base = public_url.rstrip("/")
    cert = "--cert certs/clients/alice-laptop.pem --key certs/clients/alice-laptop.key --cacert certs/ca.pem"
    return (
        "\nztgateway is running. Try:\n\n"
        f"  curl {cert} {base}/echo\n\n"
        "  TOKEN=$(.venv/bin/ztgateway token issue --sub alice --groups admins)\n"
        f'  curl {cert} -H "Authorization: Bearer $TOKEN" {base}/api/echo\n\n'
        f"  curl http://127.0.0.1:{ports.ops}/metrics\n\n"
        f"  .venv/bin/ztgateway dev-ssf send --idp http://127.0.0.1:{ports.idp} --event "
        "session-revoked --sub alice \\\n"
        "      --control-token dev-ssf-control-token-not-for-production\n\n"
        "In a browser: import certs/clients/alice-laptop.p12 (password: ztgateway), open\n"
        f"{base}/ and sign in as alice / alice-dev-password (development only).\n\n"
        f"demo app http://127.0.0.1:{ports.app}/  ·  dev IdP http://127.0.0.1:{ports.idp}/  ·  "
        f"ops http://127.0.0.1:{ports.ops}/\n"
        "Ctrl-C stops all three.\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ztgateway.dev.run", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", default="config/gateway.toml", help="gateway configuration")
    p.add_argument("--idp-users", default="config/dev-idp-users.toml", help="dev IdP users file")
    for name, what in (
        ("gateway", "mTLS listener"),
        ("ops", "ops listener"),
        ("app", "demo app"),
        ("idp", "dev IdP"),
    ):
        p.add_argument(f"--{name}-port", type=int, default=None, help=f"the {what}'s port")
    p.add_argument(
        "--port-offset",
        type=int,
        default=int(os.environ.get("ZTGW_PORT_OFFSET") or 0),
        help="add this to every configured port (default $ZTGW_PORT_OFFSET or 0)",
    )
    args = p.parse_args(argv)

    config_path = Path(args.config)
    text = config_path.read_text()
    config = tomllib.loads(text)
    original = configured_ports(config)
    ports = choose_ports(config, args)
    for what, port, knob in (
        ("the gateway", ports.gateway, "GATEWAY_PORT"),
        ("the ops listener", ports.ops, "OPS_PORT"),
        ("the demo app", ports.app, "APP_PORT"),
        ("the dev IdP", ports.idp, "IDP_PORT"),
    ):
        if port_taken(port):
            print(
                f"error: port {port} for {what} is already in use (another `make run`?). "
                f"Stop that program, or move the demo: make run {knob}=<port>, or every port "
                "at once: make run PORT_OFFSET=10000",
                file=sys.stderr,
            )
            return 1
    users_path = Path(args.idp_users)
    if ports != original:
        config_path = _write_beside(config_path, moved_gateway_config(text, config, ports))
        users_path = _write_beside(
            users_path, moved_idp_users(users_path.read_text(), original.gateway, ports.gateway)
        )
        config = tomllib.loads(config_path.read_text())
    public_url = config.get("server", {}).get("public_url") or f"https://127.0.0.1:{ports.gateway}"

    Path("var").mkdir(exist_ok=True)
    ensure_transmitter_cert(Path("certs"))
    token = Path("certs/admin.token")
    if not token.exists():
        import secrets

        token.write_text(secrets.token_urlsafe(32) + "\n")
        token.chmod(0o600)
    py = sys.executable
    check = subprocess.run(
        [py, "-m", "ztgateway", "check-config", "-c", str(config_path)],
        check=False,
        stdout=subprocess.DEVNULL,
    )
    if check.returncode != 0:
        return check.returncode

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["demo app"] = _start(
            [py, "-m", "ztgateway.dev.demo_app", "--host", "127.0.0.1", "--port", str(ports.app)]
        )
        procs["dev IdP"] = _start(
            [py, "-m", "ztgateway", "dev-idp", "--host", "127.0.0.1", "--port", str(ports.idp),
             "--users", str(users_path)]
        )  # fmt: skip
        checks = {
            "demo app": f"http://127.0.0.1:{ports.app}/",
            "dev IdP": f"http://127.0.0.1:{ports.idp}/.well-known/openid-configuration",
        }
        # The gateway starts once the IdP answers: it reads the IdP's discovery document at
        # start-up, and a miss there would refuse sign-ins until its next retry.
        if not _wait_until_ready(procs, checks):
            return 1
        procs["gateway"] = _start([py, "-m", "ztgateway", "run", "-c", str(config_path)])
        if not _wait_until_ready(procs, {"gateway": f"http://127.0.0.1:{ports.ops}/readyz"}):
            return 1
        print(hints(ports, public_url), flush=True)
        while all(proc.poll() is None for proc in procs.values()):
            time.sleep(0.5)
        gone = next(name for name, proc in procs.items() if proc.poll() is not None)
        print(f"error: the {gone} stopped (exit {procs[gone].returncode}); stopping the others",
              file=sys.stderr)  # fmt: skip
        return 1
    except _Stop as stop:
        print(f"\n{signal.Signals(stop.signum).name}: stopping the demo", file=sys.stderr)
        return 0
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        _stop(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
