"""Pages for people: one skeleton, one stylesheet, autoescaped templates, operator branding.

`branding.py` reads `[portal]` (imported by config.py, so it needs nothing but the config
reader); `render.py` turns a template and its values into a page; `when.py` says a time in the
person's terms. Every page a person sees is rendered here: the portal's own pages (sign-in,
sign-out, whoami, step-up, enrolment, device remediation) and every refusal page.
"""
