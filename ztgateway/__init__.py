"""ztgateway: a zero-trust enforcement gateway for legacy web apps."""

from typing import Final

__version__ = "0.1.0"

SERVER_BANNER: Final = "ztgateway"
"""The one `Server` field the gateway sends, on every answer of its own and every forwarded
one (the upstream's banner is replaced): no version, nothing to fingerprint."""
