"""Shared fixtures: a deployment PKI minted per session, servers on 127.0.0.1 port 0."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from helpers import SERVER_NAME, SMALL_CHUNKS, Pki, tls_of

# Before any test module imports peft (which imports bitsandbytes): bitsandbytes must be
# imported without reaching for the Hugging Face Hub (models/quantization.py).
import splitfed.models  # noqa: F401
from splitfed.security.ca import CertificateAuthority
from splitfed.services.diagnostics import binding
from splitfed.tls import TLSConfig
from splitfed.transport import Server, create_channel, create_server
from splitfed.wire import TensorLimits


@pytest.fixture(scope="session")
def pki() -> Pki:
    ca = CertificateAuthority.create("test CA")
    other = CertificateAuthority.create("another CA")
    stranger = other.issue("mallory", "client")
    assert stranger.key_pem is not None
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    return Pki(
        ca=ca,
        server=tls_of(ca, ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME])),
        client=tls_of(ca, ca.issue("hospital-a", "client")),
        # Presents a certificate the deployment CA never signed, but trusts the server.
        other_ca_client=TLSConfig(ca.cert_pem, stranger.cert_pem, stranger.key_pem),
        expired_client=tls_of(
            ca,
            ca.issue("hospital-old", "client", not_before=long_ago, validity=dt.timedelta(hours=1)),
        ),
        other_deployment=tls_of(other, stranger),
    )


@pytest.fixture(scope="module")
def diagnostics_server(pki: Pki) -> Iterator[Server]:
    """A Diagnostics server with mTLS, 64 KiB chunks and a 64 MiB tensor limit."""
    limits = TensorLimits(max_tensor_bytes=64 << 20)
    server = create_server(
        [binding(limits, SMALL_CHUNKS.chunk_bytes)], pki.server, options=SMALL_CHUNKS
    )
    with server:
        yield server


@pytest.fixture
def connect(diagnostics_server: Server) -> Iterator[Callable[..., grpc.Channel]]:
    """Open channels to the module's server; all are closed after the test."""
    channels: list[grpc.Channel] = []

    def _connect(tls: TLSConfig, server_name: str = SERVER_NAME) -> grpc.Channel:
        channel = create_channel(
            diagnostics_server.address, tls, server_name=server_name, options=SMALL_CHUNKS
        )
        channels.append(channel)
        return channel

    yield _connect
    for channel in channels:
        channel.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Threads for a test's concurrent clients (eight at most)."""
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor
