"""The decision log: one event per gateway decision, hash-chained, written off the request path.

The shape follows OPA's decision log (`decision_id`, `timestamp`, `input`, `result`) so the
tooling people already point at OPA reads ours. The modules, each owning one thing:

- `chain`: the canonical form, how events are linked (`hash = sha256(prev_hash + body)`), and
  the checker every verifier uses;
- `store`: the SQLite layout shared by the writer and the readers;
- `writer`: `AuditLog`, the queue and the one writer task per process;
- `sink`: the JSON-lines mirror for a SIEM;
- `verify`, `rotate`, `query`: `ztgateway audit verify | rotate | tail | search`;
- `masking`: secrets in headers and query strings, masked before an event is built;
- `journal`: the write-ahead journal that makes an event survive a crash before it is acted on;
- `keys`: the mask key and the checkpoint key, both held outside the audit store.
"""

from __future__ import annotations

from .chain import (
    CHAIN_FIELDS,
    EVENT_TYPE,
    GENESIS_HASH,
    PROBLEM_COLUMNS,
    PROBLEM_EDITED,
    PROBLEM_GAP,
    PROBLEM_LINK,
    PROBLEM_MALFORMED,
    VerifyResult,
    canonical_json,
)
from .keys import AuditKeyError, MaskKey
from .masking import SECRET_HEADERS, SECRET_QUERY_PARAMS, UNKEYED_MASK, mask_headers, mask_query
from .query import search, tail
from .rotate import RotateResult, rotate
from .store import SCHEMA_VERSION
from .verify import verify_db, verify_jsonl
from .writer import AuditLog, AuditStats, AuditUnavailable

__all__ = [
    "CHAIN_FIELDS",
    "EVENT_TYPE",
    "GENESIS_HASH",
    "PROBLEM_COLUMNS",
    "PROBLEM_EDITED",
    "PROBLEM_GAP",
    "PROBLEM_LINK",
    "PROBLEM_MALFORMED",
    "SCHEMA_VERSION",
    "SECRET_HEADERS",
    "SECRET_QUERY_PARAMS",
    "UNKEYED_MASK",
    "AuditKeyError",
    "AuditLog",
    "AuditStats",
    "AuditUnavailable",
    "MaskKey",
    "RotateResult",
    "VerifyResult",
    "canonical_json",
    "mask_headers",
    "mask_query",
    "rotate",
    "search",
    "tail",
    "verify_db",
    "verify_jsonl",
]
