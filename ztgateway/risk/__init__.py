"""The signals a decision weighs beyond identity: the risk score, geolocation and device posture.

`scoring` turns every signal about one request into one explained score in [0, 1] (pure: the
risk stage, `policy explain` and the tests get the same answer from the same inputs); `geo`
locates an address for the impossible-travel signal from an optional MaxMind database; `posture`
validates a device agent's report and judges it against the posture policy. The stages that
consume them are `stages/risk.py` and `stages/device.py`.
"""
