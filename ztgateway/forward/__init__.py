"""Forwarding to upstreams: header hygiene, the streaming HTTP proxy and the WebSocket bridge.

Nothing in this package runs unless the decision was ALLOW.
"""
