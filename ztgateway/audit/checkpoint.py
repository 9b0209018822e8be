"""Signed checkpoints: the chain's head, vouched for by a key the audit store does not hold.

A hash chain alone detects an edited, deleted, inserted or reordered event, but not someone
with write access who deletes an event and re-hashes everything after it (issue 18 L7: `audit
verify` still passed). So every writer appends, in the same transaction as a batch, a
checkpoint event that signs (Ed25519) the seq and hash of the event just before it:

    {"type": "ztgw.checkpoint", "decision_id": "checkpoint-<seq>-<random>", "timestamp": ...,
     "checkpoint": {"alg": "Ed25519", "key_id": ..., "reason": "interval" | "start" |
                    "shutdown" | "rotation", "signed_at": ..., "through_seq": N,
                    "through_hash": "<hash of event N>", "signature": "<base64url>"}}

— every `checkpoint_interval` while events arrive, when a writer starts (vouching for what a
crash left, once recovered), when it shuts down, and when `audit rotate` archives events. The
checkpoint is an event of the chain itself, so it reaches the JSON-lines mirror and the SIEM
too. Re-hashing after a deletion changes every later hash, and the next checkpoint's signed
`through_hash` no longer matches; forging one needs the private key. What follows the newest
checkpoint is vouched for by nothing but the chain: `audit verify` reports how many events and
since when, and fails when that tail is older than a writer would have left it.

The signature covers `_DOMAIN + canonical_json(claims)` where `claims` is the checkpoint object
without `signature`.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .chain import GENESIS_HASH, Anchors, canonical_json
from .keys import key_id

CHECKPOINT_TYPE: Final = "ztgw.checkpoint"
ALGORITHM: Final = "Ed25519"
_DOMAIN: Final = b"ztgw-audit-checkpoint-v1\n"
_CLAIMS: Final = frozenset(
    {"alg", "key_id", "reason", "signed_at", "through_seq", "through_hash", "signature"}
)
REASONS: Final = ("interval", "start", "shutdown", "rotation")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CheckpointSigner:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = key_id(key.public_key())

    def event(
        self, through_seq: int, through_hash: str, *, reason: str, timestamp: str
    ) -> dict[str, Any]:
        """The checkpoint event to chain right after event `through_seq`."""
        claims: dict[str, Any] = {
            "alg": ALGORITHM,
            "key_id": self.key_id,
            "reason": reason,
            "signed_at": timestamp,
            "through_seq": through_seq,
            "through_hash": through_hash,
        }
        signature = self._key.sign(_DOMAIN + canonical_json(claims).encode("utf-8"))
        return {
            "decision_id": f"checkpoint-{through_seq}-{secrets.token_hex(4)}",
            "type": CHECKPOINT_TYPE,
            "timestamp": timestamp,
            "checkpoint": {**claims, "signature": _b64url(signature)},
        }


class CheckpointChecker:
    """Checks each checkpoint while a chain is walked (an `AnchorCheck` for ChainChecker).

    With `keys` None the signatures cannot be checked (no trusted key was given): positions
    are still checked, and the result says the signatures were not.
    """

    def __init__(self, keys: dict[str, Ed25519PublicKey] | None) -> None:
        self.keys = keys
        self.anchors = Anchors(signatures_checked=keys is not None)

    def check(
        self, event: dict[str, Any], prev_seq: int | None, prev_hash: str | None
    ) -> str | None:
        anchors = self.anchors
        if event.get("type") != CHECKPOINT_TYPE:
            anchors.unanchored += 1
            if anchors.unanchored_since is None:
                ts = event.get("timestamp")
                anchors.unanchored_since = ts if isinstance(ts, str) else None
            return None
        cp = event.get("checkpoint")
        if not isinstance(cp, dict) or set(cp) != _CLAIMS:
            return "checkpoint is malformed"
        through_seq, through_hash = cp.get("through_seq"), cp.get("through_hash")
        if cp.get("alg") != ALGORITHM or not isinstance(cp.get("signature"), str):
            return f"checkpoint uses an unknown algorithm {cp.get('alg')!r}"
        if self.keys is not None:
            key = self.keys.get(str(cp.get("key_id")))
            if key is None:
                return f"checkpoint signed by a key that is not trusted ({cp.get('key_id')})"
            claims = {k: v for k, v in cp.items() if k != "signature"}
            try:
                key.verify(
                    _unb64url(cp["signature"]), _DOMAIN + canonical_json(claims).encode("utf-8")
                )
            except (InvalidSignature, binascii.Error, ValueError):
                return "checkpoint signature is invalid (forged or edited)"
        if prev_seq is None:
            if event.get("seq") != 1:
                return None  # a file that starts here: what it vouches for is not in the file
            prev_seq, prev_hash = 0, GENESIS_HASH
        if through_seq != prev_seq or through_hash != prev_hash:
            return (
                f"signed checkpoint vouches for seq {through_seq}, but the chain before it "
                f"ends at seq {prev_seq}: events were deleted, inserted or re-hashed"
            )
        anchors.checkpoints += 1
        anchors.anchored_seq = through_seq
        signed_at = cp.get("signed_at")
        anchors.last_checkpoint_at = signed_at if isinstance(signed_at, str) else None
        anchors.unanchored = 0
        anchors.unanchored_since = None
        return None
