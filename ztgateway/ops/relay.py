"""The address of whoever called a worker's ops port, as its supervisor relays it.

A worker's ops listener is a Unix socket in the supervisor's private directory (workers.py): the
supervisor accepts the TCP connection and names the caller in `RELAY_PEER_HEADER`, which the
trusted-proxy check of forward-auth and the audit events then use.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from ..services import SERVICES_KEY

RELAY_PEER_HEADER = "X-Ztgw-Relay-Peer"
"""Set by the workers' supervisor: the address of whoever called its ops port."""


@web.middleware
async def relayed_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A worker's ops socket is reachable only by its supervisor (a 0700 directory), so the
    caller address the supervisor names is the one trusted-proxy checks and audit events use.
    On a TCP ops listener the header is never believed."""
    if request.app[SERVICES_KEY].ops_socket is None:
        return await handler(request)
    peer = request.headers.get(RELAY_PEER_HEADER, "")
    return await handler(request.clone(remote=peer))
