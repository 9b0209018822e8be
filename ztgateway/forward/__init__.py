"""Forwarding to upstreams: header hygiene, the streaming HTTP proxy, the WebSocket bridge and
the signed identity assertion (`X-ZT-Assertion`) an upstream can verify.

Nothing in this package runs unless the decision was ALLOW.
"""
