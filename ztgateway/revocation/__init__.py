"""Live revocation of client certificates (issue 17 item 5).

- `config.py`: the `[revocation]` section and the per-route `ocsp` failure mode.
- `crl.py`: CRLs fetched from configured URLs and the certificates' distribution points,
  verified against the client CA, refreshed before nextUpdate; stale ones fail closed.
- `ocsp.py`: RFC 6960 requests (with an RFC 8954 nonce) and the checks on the answer: CertID,
  the responder's signature and delegation, thisUpdate/nextUpdate, the nonce.
- `service.py`: the one `RevocationService` the identity stage asks, that shares revocations
  between replicas through the store and ends the open connections and WebSockets of a
  certificate once it is revoked.
"""
