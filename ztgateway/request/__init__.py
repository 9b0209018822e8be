"""What a request says and how far to believe it: pure rules over what the client sent.

`paths` normalises the path once, so the path policy sees is the path the upstream acts on;
`headerfamilies` names the headers that speak for someone (client address, original URL,
certificate, user), which only the gateway or a trusted edge proxy may set; `fetchmeta` reads
Fetch Metadata and Origin to tell a cross-site request from the person's own navigation. The
stages, the request context and forwarding consult them; they hold no state.
"""
