"""The operator side, on the ops listener (never the mTLS port): health, readiness, metrics
(`app.py`), the admin API (`admin.py`), `/decide` (`decide.py`) and forward-auth for an edge
proxy (`forward_auth.py`). Every handler sees the gateway as `services.Services`, never
`Gateway`."""
