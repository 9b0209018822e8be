"""The chain's canonical form, how events are linked, and the checker every verifier uses."""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Final, Protocol

import orjson

GENESIS_HASH: Final = "0" * 64
EVENT_TYPE: Final = "ztgw.decision"
CHAIN_FIELDS: Final = frozenset({"seq", "prev_hash", "hash"})

PROBLEM_EDITED: Final = "hash mismatch (event edited)"
PROBLEM_LINK: Final = "prev_hash does not match previous event (deleted, inserted or reordered)"
PROBLEM_GAP: Final = "sequence gap"
PROBLEM_COLUMNS: Final = "indexed columns do not match the event (row edited)"
PROBLEM_MALFORMED: Final = "event is not a JSON object with valid chain fields"

_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None
    first_bad_decision_id: str | None
    problem: str
    last_hash: str | None = None
    """Head of the verified chain: keep it elsewhere to detect truncation of the newest events."""
    anchors: Anchors | None = None
    """What the signed checkpoints cover (None when the checkpoints were not checked)."""


@dataclass(slots=True)
class Anchors:
    """The signed checkpoints found while walking a chain (see checkpoint.py)."""

    signatures_checked: bool
    checkpoints: int = 0
    anchored_seq: int | None = None
    """The newest event a valid checkpoint vouches for."""
    last_checkpoint_at: str | None = None
    unanchored: int = 0
    """Events after the newest checkpoint: nothing but the chain itself vouches for them."""
    unanchored_since: str | None = None
    """Timestamp of the oldest of those."""


class AnchorCheck(Protocol):
    """Looks at each event that passed the chain checks, with the link before it."""

    anchors: Anchors

    def check(
        self, event: dict[str, Any], prev_seq: int | None, prev_hash: str | None
    ) -> str | None: ...


# --------------------------------------------------------------------------- canonical form


def _json_default(value: Any) -> Any:
    # The pipeline hands us enums and datetimes; turning them into their wire form here keeps
    # one bad field from costing a request its audit event.
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return format_ts(value) if value.tzinfo is not None else value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"audit events hold JSON values; got {type(value).__name__}")


# Datetimes and dataclasses go through _json_default, exactly as with the standard library.
_ORJSON_OPTIONS: Final = (
    orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)


def canonical_json(value: Any) -> str:
    """The byte-exact form hashed by the chain; any verifier must reproduce it exactly.

    orjson (sorted keys, compact, UTF-8) is the form, for its speed: this runs for every
    decision. What orjson refuses (integers beyond 64 bits, lone surrogates) falls back to the
    standard library's equivalent; the choice depends only on the value, so a verifier that
    re-encodes the stored event takes the same path and gets the same bytes.
    """
    try:
        return orjson.dumps(value, option=_ORJSON_OPTIONS, default=_json_default).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(
            _string_keys(value),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=_json_default,
        )


def _string_keys(value: Any) -> Any:
    """Keys as the stored JSON will hold them, before they are sorted: sorting `{2: .., 10: ..}`
    by number and the stored `{"10": .., "2": ..}` by text would give two encodings of one
    event, and a chain its verifier cannot reproduce."""
    if isinstance(value, dict):
        return {_json_key(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_string_keys(v) for v in value]
    return value


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key)  # as the json module writes a key: 1, 1.5, true, null
    raise TypeError(f"audit event keys are strings or numbers; got {type(key).__name__}")


def _scrub(value: Any) -> Any:
    # aiohttp decodes raw header bytes with surrogateescape, so a client can put lone
    # surrogates into the event; they cannot be stored as UTF-8 and would jam the writer.
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def link_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def format_ts(moment: datetime) -> str:
    # Fixed width (isoformat pads the year, strftime does not) so string order is time order
    # and `search(since=, until=)` can compare the ts column as text. In UTC isoformat ends
    # with "+00:00", which becomes the "Z".
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


_clock_second: list[tuple[int, str]] = [(-1, "")]
"""[(Unix second, "YYYY-MM-DDTHH:MM:SS.")], the pair swapped whole so threads never mix it."""


def now_ts(now_ns: int) -> str:
    """`format_ts` of the clock's `time_ns()`, formatting the date and time once per second.

    Floors to microseconds, as `datetime.fromtimestamp` would.
    """
    second, micros = divmod(now_ns // 1000, 1_000_000)
    cached = _clock_second[0]
    if cached[0] != second:
        text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")
        cached = _clock_second[0] = (second, text[:-6] + ".")
    return "%s%06dZ" % (cached[1], micros)  # noqa: UP031 (faster than the f-string)


def normalize_ts(value: Any) -> str:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        moment = datetime.fromisoformat(value)
    else:
        raise ValueError(f"timestamp must be an RFC 3339 string, got {type(value).__name__}")
    if moment.tzinfo is None:
        raise ValueError("timestamp must carry a UTC offset")
    return format_ts(moment)


def _column(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return canonical_json(value)


def index_columns(event: dict[str, Any]) -> tuple[str | None, ...]:
    """user, device, route, verdict, reason, client_ip: what search() filters on."""
    raw_input = event.get("input")
    inp: dict[str, Any] = raw_input if isinstance(raw_input, dict) else {}
    raw_result = event.get("result")
    result: dict[str, Any] = raw_result if isinstance(raw_result, dict) else {}
    return (
        _column(inp.get("user")),
        _column(inp.get("device")),
        _column(event.get("route")),
        _column(result.get("verdict")),
        _column(result.get("reason")),
        _column(inp.get("client_ip")),
    )


# A queued event is (decision_id, Entry). The entry holds what the writer needs, computed once
# by record() from the dict it has: the ts column, the index columns, and the event encoded
# with placeholders for the chain fields plus where they are (see encode_entry). The writer then
# only cuts, hashes and splices; it never parses an event back. An entry without cuts took the
# slow path: it holds the canonical body and the event as parsed from it.
Entry = tuple[
    str,  # ts column
    tuple[str | None, ...],  # user, device, route, verdict, reason, client_ip columns
    bytes,  # with cuts: the encoding with placeholders; without: the canonical body
    tuple[int, int, int] | None,  # cuts: offsets of the hash, prev_hash and seq placeholders
    dict[str, Any] | None,  # without cuts: the event as the stored line holds it
]

_PLACEHOLDER: Final = "\x7f"
"""Value the chain fields get in the encoding made by record(). Only a string holding DEL puts
a 0x7f byte into orjson's output (it is neither escaped nor part of any other UTF-8 sequence),
so exactly three of them are exactly the three placeholders; any other count takes the slow
path."""
PLACEHOLDERS: Final = {"hash": _PLACEHOLDER, "prev_hash": _PLACEHOLDER, "seq": _PLACEHOLDER}
_DEL: Final = b"\x7f"
_HASH_CUT: Final = len(b',"hash":"')
_PREV_CUT: Final = len(b',"prev_hash":"')
_SEQ_CUT: Final = len(b',"seq":"')
# The stored line: the canonical body with the chain fields spliced in where sorting puts them.
_LINE: Final = b'%b,"hash":"%b"%b,"prev_hash":%b%b,"seq":%d%b'
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


def _as_parsed(value: Any) -> Any:
    """`value` as the stored event holds it, i.e. after a round trip through canonical JSON."""
    if value is None or type(value) is str or type(value) is dict:
        return value
    return json.loads(canonical_json(value))


def _fast_columns(body: dict[str, Any]) -> tuple[str | None, ...]:
    """`index_columns(json.loads(canonical_json(body)))` without the round trip.

    Only for a body that orjson encodes: the round trip then changes nothing but the types
    that are not str, dict or None, and those few values are round-tripped on their own.
    """
    inp = body.get("input")
    if type(inp) is not dict:
        inp = _as_parsed(inp)
        if not isinstance(inp, dict):
            inp = {}
    result = body.get("result")
    if type(result) is not dict:
        result = _as_parsed(result)
        if not isinstance(result, dict):
            result = {}
    columns = (
        inp.get("user"),
        inp.get("device"),
        body.get("route"),
        result.get("verdict"),
        result.get("reason"),
        inp.get("client_ip"),
    )
    for value in columns:
        if value is not None and type(value) is not str:
            return tuple(_column(_as_parsed(v)) for v in columns)
    return columns


def encode_entry(body: dict[str, Any], ts: str) -> Entry:
    """The queue entry for `body` (a private copy holding the chain placeholders)."""
    try:
        raw = orjson.dumps(body, option=_ORJSON_OPTIONS, default=_json_default)
    except (TypeError, orjson.JSONEncodeError):
        pass
    else:
        # The first three DEL bytes, and no fourth (memchr scans; count() is byte by byte).
        h = raw.find(_DEL)
        p = raw.find(_DEL, h + 1)
        s = raw.find(_DEL, p + 1)
        if 0 <= h < p < s and raw.find(_DEL, s + 1) < 0:
            # So these are the three placeholders, each written as `"key":"\x7f"`. Keys are
            # sorted and "decision_id" < "hash" < "prev_hash" < "seq" < "timestamp" are all
            # there, so each is a member between two others, after a comma (link_rows cuts
            # out exactly `,"hash":"\x7f"` and so on).
            return ts, _fast_columns(body), raw, (h, p, s), None
    # Slow path (values orjson refuses, lone surrogates, a DEL in the event): the writer builds
    # the stored line from the parsed event, exactly as it always has.
    for name in CHAIN_FIELDS:
        del body[name]
    canonical = canonical_json(body)
    try:
        encoded = canonical.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (only the fallback encoder lets them through): replace them.
        canonical = canonical_json(_scrub(json.loads(canonical)))
        encoded = canonical.encode("utf-8")
    parsed = json.loads(canonical)
    return normalize_ts(parsed["timestamp"]), index_columns(parsed), encoded, None, parsed


def prepare_entry(event: dict[str, Any], now_ns: int) -> tuple[str, Entry]:
    """Validate and encode one event (a snapshot: later changes to `event` do not count);
    an event without a timestamp gets `now_ns`."""
    decision_id = event.get("decision_id")
    if not isinstance(decision_id, str) or not decision_id:
        raise ValueError("audit event needs a non-empty string decision_id")
    body = {**event, **PLACEHOLDERS}
    if len(body) != len(event) + len(PLACEHOLDERS):
        reserved = sorted(CHAIN_FIELDS.intersection(event))
        raise ValueError(f"audit event may not set {reserved}; the chain sets them")
    if "type" not in body:
        body["type"] = EVENT_TYPE
    if "timestamp" in body:
        ts = normalize_ts(body["timestamp"])
    else:
        ts = body["timestamp"] = now_ts(now_ns)
    return decision_id, encode_entry(body, ts)


def link_rows(
    batch: list[tuple[str, Entry]],
    seq: int,
    prev: str,
    rows: list[tuple[Any, ...]],
    lines: list[bytes],
) -> tuple[int, str]:
    """Chain `batch` onto (seq, prev): append its rows and sink lines; return the new head."""
    sha256 = hashlib.sha256
    prev_raw = prev.encode("utf-8")
    # prev_hash as JSON; only a head edited behind the writer's back needs more than quotes.
    prev_json = b'"' + prev_raw + b'"' if _HEX64.fullmatch(prev) else orjson.dumps(prev)
    for decision_id, (ts, columns, raw, cuts, parsed) in batch:
        seq += 1
        if cuts is not None:
            h, p, s = cuts
            head = raw[: h - _HASH_CUT]
            before_prev = raw[h + 2 : p - _PREV_CUT]
            before_seq = raw[p + 2 : s - _SEQ_CUT]
            rest = raw[s + 2 :]
            link = sha256(b"".join((prev_raw, head, before_prev, before_seq, rest))).hexdigest()
            link_raw = link.encode()
            line = _LINE % (head, link_raw, before_prev, prev_json, before_seq, seq, rest)
            stored = line.decode()
        else:
            assert parsed is not None
            link = sha256(prev_raw + raw).hexdigest()
            link_raw = link.encode()
            stored = canonical_json({**parsed, "seq": seq, "prev_hash": prev, "hash": link})
            line = stored.encode("utf-8")
        rows.append((seq, decision_id, ts, *columns, stored, prev, link))
        lines.append(line)
        prev, prev_raw, prev_json = link, link_raw, b'"' + link_raw + b'"'
    return seq, prev


def join_lines(lines: Iterable[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


class ChainChecker:
    """Walks events in order; the same rules for the database and the JSON-lines file."""

    def __init__(self, *, require_genesis: bool, anchors: AnchorCheck | None = None) -> None:
        self.require_genesis = require_genesis
        self.anchor_check = anchors
        self.prev_seq: int | None = None
        self.prev_hash: str | None = None
        self.checked = 0

    def check(
        self,
        event: Any,
        *,
        row_check: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> str | None:
        if not isinstance(event, dict):
            return PROBLEM_MALFORMED
        seq, prev, link = event.get("seq"), event.get("prev_hash"), event.get("hash")
        if (
            not isinstance(seq, int)
            or isinstance(seq, bool)
            or not isinstance(prev, str)
            or not isinstance(link, str)
        ):
            return PROBLEM_MALFORMED
        body = {k: v for k, v in event.items() if k not in CHAIN_FIELDS}
        if link_hash(prev, canonical_json(body)) != link:
            return PROBLEM_EDITED
        if row_check is not None:
            problem = row_check(event)
            if problem is not None:
                return problem
        if self.prev_hash is None:
            if seq == 1 and prev != GENESIS_HASH:
                return PROBLEM_LINK
            if seq != 1 and self.require_genesis:
                return (
                    f"chain starts at seq {seq}, not 1: earlier events are missing "
                    "or the file was rotated"
                )
        else:
            assert self.prev_seq is not None
            if prev != self.prev_hash:
                return PROBLEM_LINK
            if seq != self.prev_seq + 1:
                return PROBLEM_GAP
        if self.anchor_check is not None:
            problem = self.anchor_check.check(event, self.prev_seq, self.prev_hash)
            if problem is not None:
                return problem
        self.prev_seq, self.prev_hash = seq, link
        self.checked += 1
        return None

    def result(
        self, problem: str | None = None, seq: int | None = None, decision_id: str | None = None
    ) -> VerifyResult:
        anchors = self.anchor_check.anchors if self.anchor_check is not None else None
        if problem is None:
            return VerifyResult(True, self.checked, None, None, "", self.prev_hash, anchors)
        return VerifyResult(False, self.checked, seq, decision_id, problem, self.prev_hash, anchors)
