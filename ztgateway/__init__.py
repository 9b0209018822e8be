"""ztgateway: a zero-trust enforcement gateway for legacy web apps."""

__version__ = "0.1.0"
