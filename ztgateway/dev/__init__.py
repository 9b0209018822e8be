"""Development tooling, kept apart from the gateway: no gateway module imports this package.

`idp` (with `idp_shapes`) is a loopback-only OpenID Provider for the browser sign-in, `ssf` a
Shared Signals transmitter to drive the receiver, `demo_app` the upstream `make run` protects,
`pki` a private CA with its on-disk layout (the CA key sits unencrypted beside the certificates),
`tokens` mints bearer JWTs the demo configuration trusts, and `run` starts them all with the
gateway (`make run`). Tests use the same code, so what a developer tries is what is tested.

Only the command line reaches it, for the commands that exist for development (`certs`, `token
issue`, `dev-idp`, `dev-ssf`, and `policy test` cases that state token claims);
tests/unit/test_dev_apart.py fails if any other module imports it.
"""
