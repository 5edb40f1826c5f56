"""HTTP clients over an engine's unix socket (engines speak plain HTTP there and nowhere else).

No idle connection is kept: one would hold one of the engine's few HTTP threads. Every client shares one TLS
context that is never used: httpx builds one per transport otherwise, loading the system's CA store — about
17 ms of CPU a client, 3.4 s on the event loop for 200 pools starting.
"""

from __future__ import annotations

import ssl

import httpx

_UNUSED_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_NO_IDLE = httpx.Limits(max_keepalive_connections=0)


def async_socket_client(socket_path: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=socket_path, limits=_NO_IDLE, verify=_UNUSED_TLS)
    return httpx.AsyncClient(transport=transport, trust_env=False, verify=_UNUSED_TLS)


def socket_client(socket_path: str, *, timeout_s: float) -> httpx.Client:
    transport = httpx.HTTPTransport(uds=socket_path, limits=_NO_IDLE, verify=_UNUSED_TLS)
    return httpx.Client(
        transport=transport, trust_env=False, verify=_UNUSED_TLS, timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
    )  # fmt: skip
