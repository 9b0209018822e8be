"""Signals from the identity provider: the Shared Signals receiver (SETs pushed or polled,
CAEP and RISC events) and OIDC back-channel logout. docs/signals.md.

receiver.py is the one path from a token to its effect; tokens.py verifies, subjects.py and
events.py say whom and what, actions.py changes state through the store, poll.py and
endpoints.py deliver, backchannel.py verifies logout tokens, config.py reads `[signals.NAME]`.
"""
