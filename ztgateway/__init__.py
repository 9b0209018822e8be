"""ztgateway: a zero-trust enforcement gateway for legacy web apps."""

from typing import Final

__version__ = "0.1.0"

DECISION_HEADER: Final = "X-ZT-Decision-Id"
"""The decision id on every answer of the gateway's own (and every forwarded one): the key a
person quotes and an operator finds in the audit log."""

SERVER_BANNER: Final = "ztgateway"
"""The one `Server` field the gateway sends, on every answer of its own and every forwarded
one (the upstream's banner is replaced): no version, nothing to fingerprint."""
