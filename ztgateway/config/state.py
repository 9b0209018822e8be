"""`[audit]` and `[store]`: where the gateway writes its decisions and keeps its state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..configreader import Table


@dataclass(frozen=True, slots=True)
class AuditConfig:
    db: Path
    jsonl: Path | None = None
    max_queue: int = 100_000
    durability: Literal["memory", "journal", "fsync"] = "journal"
    """What an event must reach before the gateway acts on its decision (docs/audit.md)."""
    journal_dir: Path | None = None
    """The write-ahead journal's directory; None: `<db>.journal` beside the database."""
    mask_key_file: Path | None = None
    """HMAC key for masked secrets (created on first start); none: masks carry no digest."""
    mask_key_env: str = "ZTGW_AUDIT_MASK_KEY"
    checkpoint_key_file: Path | None = None
    """Ed25519 key that signs checkpoints over the chain (created on first start)."""
    checkpoint_public_keys: Path | None = None
    """PEM bundle of the public keys `audit verify` trusts; default `<checkpoint_key_file>.pub`."""
    checkpoint_interval: float = 60.0
    upstream_events: Literal["all", "failures"] = "all"
    """Which forwarded requests get an upstream-outcome event (audit/events.py)."""


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "sqlite:///../var/state.db"
    base: Path = Path()


def parse_audit(t: Table, file: Path) -> AuditConfig:
    db = t.path("db", must_exist=False) or (file.parent / "../var/audit.db").resolve()
    checkpoint_key = t.path("checkpoint_key_file", must_exist=False)
    public_keys = t.path("checkpoint_public_keys", must_exist=False)
    if public_keys is None and checkpoint_key is not None:
        public_keys = checkpoint_key.with_name(checkpoint_key.name + ".pub")
    cfg = AuditConfig(
        db=db,
        jsonl=t.path("jsonl", must_exist=False),
        max_queue=t.integer("max_queue", 100_000, min=100),
        durability=t.choice("durability", ("memory", "journal", "fsync"), "journal"),  # type: ignore[arg-type]
        journal_dir=t.path("journal_dir", must_exist=False),
        mask_key_file=t.path("mask_key_file", must_exist=False),
        mask_key_env=t.text("mask_key_env", "ZTGW_AUDIT_MASK_KEY"),
        checkpoint_key_file=checkpoint_key,
        checkpoint_public_keys=public_keys,
        checkpoint_interval=t.duration("checkpoint_interval", 60.0, min=1.0, max=86400.0),
        upstream_events=t.choice("upstream_events", ("all", "failures"), "all"),  # type: ignore[arg-type]
    )
    t.done()
    return cfg


def parse_store(t: Table, file: Path) -> StoreConfig:
    url = t.text("url", "sqlite:///../var/state.db")
    if not url.startswith(("sqlite:///", "redis://", "rediss://", "unix://")):
        t.fail("url", "expected sqlite:///PATH or redis://HOST:PORT/DB")
    cfg = StoreConfig(url=url, base=file.parent)
    t.done()
    return cfg
