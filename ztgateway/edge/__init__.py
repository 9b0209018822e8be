"""The data plane's edge: where a client's connection enters and its requests are answered.

`listener` accepts the TCP connection and runs the TLS handshake itself (decision 0001), with the
SSLContexts, the parsed client certificate and the CRL from `tls`; a refused handshake is told
why by `tlsalert`; `http1` frames the HTTP/1.1 requests on the connection (llhttp), and
`request_path.handle()` takes each one through the pipeline, decide-and-record, and render or
forward. `certverify` verifies a certificate that did not come through our handshake (an edge
proxy's header, `/decide`) the way the listener would; `inline` lets code that needs a current
asyncio Task run on a data plane that steps requests without one.
"""
