"""The pages people see, and their JSON APIs, under `/.ztgw/`.

Handlers: `signin.py` (sign-in, the OIDC callback, sign-out, whoami), `mfa.py` (TOTP step-up
and enrolment), `webauthn.py` (security keys and passkeys), `stepup.py` (who is stepping up,
shared by both), `device.py` (posture reports, the device page). Each takes
`services.Services`, never `Gateway`.

What they share: `forms.py` (reading forms and bodies, Fetch Metadata / Origin / content-type
checks, CSRF tokens), `redirect.py` (the one open-redirect guard, the way to the sign-in page),
`render.py` (one skeleton, `templates/base.html`; every page an autoescaped template; one
stylesheet; JSON answers). `branding.py` reads `[portal]` (imported by config.py, so it needs
nothing but the config reader); `advice.py`, `posture_text.py`, `session_end.py` and `when.py`
put reasons, posture checks, ended sessions and times in a person's words. Refusal pages
(responses.py) are rendered here too.
"""
