"""Credentials a request may carry and the second factors that back them.

`jwt` verifies bearer tokens strictly (algorithms from configuration, claims required, every
failure a `TokenError` with a closed reason); `jwks` keeps each issuer's keys in memory so the hot
path never waits on the network; `oidc` and `providers` run the browser sign-in (the relying
party and what each provider needs). The second factors: `totp` is the RFC 6238 mechanics and
`mfa` binds them to the store (enrolment, replay and brute-force guards); `webauthn` runs the
security-key and passkey ceremonies. The pages that drive them are the portal's.
"""
