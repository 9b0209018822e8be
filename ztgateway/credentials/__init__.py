"""Credentials a request may carry: bearer JWTs checked against each issuer's published keys.

`jwt` verifies tokens strictly (algorithms from configuration, claims required, every failure a
`TokenError` with a closed reason); `jwks` keeps each issuer's keys in memory so the hot path
never waits on the network; `devtoken` mints tokens for the demo and the tests.
"""
