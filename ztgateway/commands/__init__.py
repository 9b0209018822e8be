"""Subcommands of the `ztgateway` CLI, one module each, so cli.py only wires them together."""
