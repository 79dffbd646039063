"""HTTP client settings shared by the clients of other servers (the vLLM sampler, the LLM judge)."""

from __future__ import annotations

import httpx

# An idle pooled connection is dropped before the server drops it. vLLM's server (uvicorn) closes
# idle connections after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), httpx's default expiry is also 5 s,
# and a request sent on a connection at the moment the server closes it gets no answer (measured:
# 1 in 60 requests at that idle time; none at 0.5 s below it).
KEEPALIVE_EXPIRY_S = 2.0

# What a request sent on a connection the server closed meanwhile raises (the keep-alive race gave
# ReadError); sent again, it meets a server that is up, or one that is down and refuses the
# connection (httpx.ConnectError, not resent).
DROPPED_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def pooled_limits(max_connections: int = 100, max_keepalive_connections: int = 20) -> httpx.Limits:
    """httpx's default pool (100 connections, 20 kept idle) unless told, with the idle limit above."""
    return httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive_connections,
                        keepalive_expiry=KEEPALIVE_EXPIRY_S)
