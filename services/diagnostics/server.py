"""A dedicated Diagnostics server (``splitfed serve diagnostics``): the echo alone, with
its own limits."""

from __future__ import annotations

from splitfed.protocol.diagnostics import SERVICE_NAME
from splitfed.services.diagnostics.servicer import POLICY, binding
from splitfed.services.security import server_security
from splitfed.serving import SecuritySettings
from splitfed.tls import TLSConfig
from splitfed.transport import Server, TransportOptions, create_server
from splitfed.wire import DEFAULT_CHUNK_BYTES, ReceiveBudget, TensorLimits


def build_server(
    tls: TLSConfig,
    *,
    listen: str,
    chunk_bytes: int | None = None,
    max_tensor_bytes: int | None = None,
    max_buffered_bytes: int | None = None,
) -> Server:
    """The server on ``listen``; a limit left None keeps the servicer's default."""
    options = TransportOptions(
        chunk_bytes=DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    )
    limits = TensorLimits() if max_tensor_bytes is None else TensorLimits(max_tensor_bytes)
    budget = None if max_buffered_bytes is None else ReceiveBudget(max_buffered_bytes)
    service = binding(limits, options.chunk_bytes, budget)
    security = server_security({SERVICE_NAME: POLICY}, tls, SecuritySettings())
    return create_server(
        [service], tls, address=listen, options=options, interceptors=[security.interceptor]
    )
