"""What every `ztgateway` command shares: durations, times, tables, JSON, one-line errors.

People read the default output (aligned tables, ISO 8601 times in UTC); scripts ask for
`--json` (the store's own values: epoch seconds stay numbers). Durations are written the way
operators say them (`90s`, `30m`, `1h`, `7d`, `1h30m`); a bare number keeps the unit the flag
always had, so existing scripts do not change meaning.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ..durations import fmt_duration, parse_duration

if TYPE_CHECKING:
    from ..audit import AuditLog
    from ..config import AuditConfig

DEFAULT_CONFIG = "config/gateway.toml"
__all__ = ["fmt_duration", "parse_duration"]


def duration_arg(default_unit: str = "s") -> Callable[[str], float]:
    """An argparse `type=` for a duration flag whose bare numbers mean `default_unit`."""

    def parse(text: str) -> float:
        try:
            return parse_duration(text, default_unit=default_unit)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "duration"
    return parse


def parse_instant(text: str, *, now: dt.datetime) -> dt.datetime:
    """`1h` (that long before `now`), or an ISO 8601 time (`2026-11-22`, `…T09:30`, `…Z`).

    A time without an offset is UTC, like every time this tool prints.
    """
    value = text.strip()
    try:
        return now - dt.timedelta(seconds=parse_duration(value, default_unit="s"))
    except ValueError:
        pass
    if value.lower() in ("now",):
        return now
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"expected a duration ago (30m, 1h, 7d) or an ISO 8601 time "
            f"(2026-11-22 or 2026-11-22T09:30Z), not {text!r}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def instant_arg(now: Callable[[], dt.datetime]) -> Callable[[str], dt.datetime]:
    def parse(text: str) -> dt.datetime:
        try:
            return parse_instant(text, now=now())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "time"
    return parse


def fmt_time(value: float | str | None) -> str:
    """`2026-12-07 09:30:00Z` for epoch seconds or an ISO string; `-` for nothing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
    else:
        when = dt.datetime.fromtimestamp(float(value), dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, empty: str = "") -> str:
    """Columns as wide as their widest cell; the last column is not padded."""
    cells = [[str(c) for c in row] for row in rows]
    if not cells and empty:
        return empty
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = []
    for row in (list(headers), *cells):
        parts = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])]
        lines.append("  ".join([*parts, row[-1]]).rstrip())
    return "\n".join(lines)


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    """`name:  value` lines aligned on the colon, for `show` commands."""
    items = [(k, "-" if v is None or v == "" else str(v)) for k, v in pairs]
    width = max((len(k) for k, _ in items), default=0) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {v}" for k, v in items)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def add_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"gateway configuration file (default: {DEFAULT_CONFIG})",
    )
    return parser


def add_json(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--json", action="store_true", help="machine-readable JSON instead of a table"
    )
    return parser


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (`error: ztgateway audit search: …`) and exit status 2,
    instead of the usage block: the line says what was wrong and where to look."""

    _argv: tuple[str, ...] = ()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._argv = tuple(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        hint = ""
        unknown = [
            a
            for a in self._argv
            if a.startswith("-")
            and a != "--"
            and a.split("=", 1)[0] not in self._option_string_actions
        ]
        # An id that starts with "-" (base64url: one in 64) reads as an unknown option.
        if unknown and "required" in message:
            hint = "; a value that starts with '-' goes after `--`"
        elif unknown and "expected one argument" in message:
            hint = "; give a value that starts with '-' as --option=VALUE"
        self.exit(2, f"error: {self.prog}: {message}{hint} (see `{self.prog} --help`)\n")


def fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def quiet_stdout() -> None:
    """After a closed pipe (`ztgateway audit tail | head`), point stdout at /dev/null so the
    interpreter's final flush does not print a second traceback (Python docs, "Note on
    SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, run the chosen command, and turn the ways a command line ends badly into one
    line on stderr and an exit status, never a traceback."""
    from ..configreader import ConfigError

    args = parser.parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader stopped reading: nothing worth a word; 141 is a shell's SIGPIPE status.
        quiet_stdout()
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:
        return fail(str(exc), 2)
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return fail(f"{where}{exc.strerror or exc}")


def operator_audit_log(audit: AuditConfig) -> AuditLog:
    """The gateway's audit log as a command opens it (`async with`): its own journal, the
    configured checkpoint key; a command that ends its log moves its events into the chain."""
    from ..audit import AuditLog
    from ..audit.checkpoint import CheckpointSigner
    from ..audit.keys import load_checkpoint_signing

    key = load_checkpoint_signing(
        audit.checkpoint_key_file, audit.checkpoint_public_keys, create=False
    )
    return AuditLog(
        audit.db,
        jsonl_path=audit.jsonl,
        durability="journal" if audit.durability == "memory" else audit.durability,
        journal_dir=audit.journal_dir,
        checkpoint_signer=CheckpointSigner(key) if key is not None else None,
    )
