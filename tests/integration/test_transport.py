"""A real server on 127.0.0.1 with mutual TLS: echo, malformed streams, refusals, shutdown."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from helpers import SERVER_NAME, SMALL_CHUNKS, Pki, wait_until

from splitfed import metrics
from splitfed.clients.diagnostics import DiagnosticsClient
from splitfed.errors import LimitExceededError, rpc_status
from splitfed.retry import RetryPolicy, is_retryable
from splitfed.services.diagnostics import binding
from splitfed.streams import StreamGuard
from splitfed.tls import TLSConfig
from splitfed.transport import (
    Server,
    ServiceBinding,
    TransportOptions,
    create_channel,
    create_server,
)
from splitfed.v1 import diagnostics_pb2, diagnostics_pb2_grpc, tensor_pb2
from splitfed.wire import ReceiveBudget, TensorLimits, iter_chunks

Connect = Callable[..., grpc.Channel]
ONCE = RetryPolicy(max_attempts=1)


def client(channel: grpc.Channel) -> DiagnosticsClient:
    return DiagnosticsClient(
        channel, chunk_bytes=SMALL_CHUNKS.chunk_bytes, retry=ONCE, timeout_s=30
    )


def test_health_reports_serving_for_the_server_and_each_service(connect: Connect, pki: Pki) -> None:
    stub = health_pb2_grpc.HealthStub(connect(pki.client))
    for service in ("", "splitfed.v1.Diagnostics"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(connect: Connect, pki: Pki) -> None:
    services = set(ProtoReflectionDescriptorDatabase(connect(pki.client)).get_services())
    assert {"splitfed.v1.Diagnostics", "grpc.health.v1.Health"} <= services


def test_server_knows_the_client_identity(connect: Connect, pki: Pki) -> None:
    peer = client(connect(pki.client)).who_am_i()
    assert (peer.identity, peer.role) == ("hospital-a", "client")


@pytest.mark.parametrize("encoding", ["raw", "bf16", "int8"])
def test_echo_round_trips_tensors(connect: Connect, pki: Pki, encoding: str) -> None:
    torch.manual_seed(0)
    sent = [("h1", torch.randn(3, 200, 64)), ("scalar", torch.tensor(1.5)), ("e", torch.empty(0))]
    got = client(connect(pki.client)).echo(sent, encoding=encoding)
    assert [(r.name, r.encoding) for r in got] == [(n, encoding) for n, _ in sent]
    for (_, tensor), received in zip(sent, got, strict=True):
        if encoding == "raw":
            assert torch.equal(received.tensor, tensor)
        else:
            torch.testing.assert_close(received.tensor, tensor, rtol=0.02, atol=0.05)


def raw_echo(channel: grpc.Channel, chunks: list[tensor_pb2.TensorChunk]) -> grpc.RpcError:
    stub = diagnostics_pb2_grpc.DiagnosticsStub(channel)
    requests = [diagnostics_pb2.EchoTensorsRequest(chunk=c) for c in chunks]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.EchoTensors(iter(requests), timeout=30))
    return info.value


def good_chunks() -> list[tensor_pb2.TensorChunk]:
    return list(iter_chunks(torch.arange(1000, dtype=torch.float32), "h1", chunk_bytes=1024))


def mangled(change: Callable[[list[tensor_pb2.TensorChunk]], None]) -> list[tensor_pb2.TensorChunk]:
    chunks = good_chunks()
    change(chunks)
    return chunks


Chunks = list[tensor_pb2.TensorChunk]


def _no_header(c: Chunks) -> None:
    c[0].ClearField("header")


def _second_header(c: Chunks) -> None:
    c[1].header.CopyFrom(c[0].header)


def _swap(c: Chunks) -> None:
    c[1], c[2] = c[2], c[1]


def _extra_chunk(c: Chunks) -> None:
    c.append(tensor_pb2.TensorChunk(seq=len(c), data=b"more"))


def _last_chunk_lost(c: Chunks) -> None:
    c.pop()


def _flip(c: Chunks) -> None:
    c[2].data = bytes([c[2].data[0] ^ 0x80]) + c[2].data[1:]


def _huge(c: Chunks) -> None:
    del c[1:]
    c[0].header.shape[:] = [1 << 20, 1 << 20]
    c[0].header.total_bytes = 4 << 40


def _rank_9(c: Chunks) -> None:
    c[0].header.shape.extend([1] * 8)


def _dtype_42(c: Chunks) -> None:
    c[0].header.dtype = 42  # type: ignore[assignment]


def _negative_dim(c: Chunks) -> None:
    c[0].header.shape[0] = -1000


def _total_mismatch(c: Chunks) -> None:
    c[0].header.total_bytes += 4


INVALID, DATA_LOSS = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS
MALFORMED = [
    ("missing header", _no_header, INVALID),
    ("duplicate header", _second_header, INVALID),
    ("chunk order", _swap, INVALID),
    ("more bytes than declared", _extra_chunk, INVALID),
    ("fewer bytes than declared", _last_chunk_lost, DATA_LOSS),
    ("checksum", _flip, DATA_LOSS),
    ("over the size limit", _huge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("rank", _rank_9, INVALID),
    ("dtype", _dtype_42, INVALID),
    ("negative dimension", _negative_dim, INVALID),
    ("declared total bytes", _total_mismatch, INVALID),
]


@pytest.mark.parametrize(("case", "change", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_stream_gets_its_status_and_the_server_keeps_serving(
    connect: Connect,
    pki: Pki,
    case: str,
    change: Callable[[list[tensor_pb2.TensorChunk]], None],
    code: grpc.StatusCode,
) -> None:
    channel = connect(pki.client)
    status, details = rpc_status(raw_echo(channel, mangled(change)))
    assert status == code, details
    assert details and "internal" not in details.lower()
    (received,) = client(channel).echo([("ok", torch.ones(3))])
    assert torch.equal(received.tensor, torch.ones(3))
    assert wait_until(lambda: metrics.WIRE_BUFFER_BYTES._value.get() == 0)


# Bytes that are no protobuf message: a truncated varint, wire type 7, a length past the end.
UNDECODABLE = [b"\x08", b"\x0f", b"\x0a\x05ab"]


@pytest.mark.parametrize("raw", UNDECODABLE, ids=["truncated", "wire type 7", "overlong"])
def test_undecodable_requests_are_invalid_arguments(connect: Connect, pki: Pki, raw: bytes) -> None:
    """gRPC itself answers a request its deserializer cannot parse with INTERNAL; the
    factory's services answer INVALID_ARGUMENT, unary and streaming, and keep serving.
    Found by the live-service fuzzer (tests/fuzz)."""
    channel = connect(pki.client)
    who = channel.unary_unary("/splitfed.v1.Diagnostics/WhoAmI")
    with pytest.raises(grpc.RpcError) as unary:
        who(raw, timeout=10)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT, unary.value.details()
    assert "WhoAmIRequest" in unary.value.details()
    good = diagnostics_pb2.EchoTensorsRequest(chunk=good_chunks()[0]).SerializeToString()
    echo = channel.stream_stream("/splitfed.v1.Diagnostics/EchoTensors")
    with pytest.raises(grpc.RpcError) as streaming:
        list(echo(iter([good, raw]), timeout=10))
    assert streaming.value.code() == grpc.StatusCode.INVALID_ARGUMENT, streaming.value.details()
    assert "request message 1" in streaming.value.details()
    assert wait_until(lambda: metrics.WIRE_BUFFER_BYTES._value.get() == 0)
    (received,) = client(channel).echo([("ok", torch.ones(3))])
    assert torch.equal(received.tensor, torch.ones(3))


def test_cancelled_stream_mid_tensor_frees_the_server_buffer(
    connect: Connect, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that vanishes half-way through a 16 MiB tensor leaves nothing behind."""
    caplog.set_level(logging.INFO)
    assert metrics.WIRE_BUFFER_BYTES._value.get() == 0
    stub = diagnostics_pb2_grpc.DiagnosticsStub(connect(pki.client))
    chunks = list(iter_chunks(torch.zeros(4 << 20), "h1", chunk_bytes=SMALL_CHUNKS.chunk_bytes))
    release = threading.Event()

    def requests() -> Iterator[diagnostics_pb2.EchoTensorsRequest]:
        for chunk in chunks[: len(chunks) // 2]:
            yield diagnostics_pb2.EchoTensorsRequest(chunk=chunk)
        release.wait(30)  # hold the stream open, half-sent

    call = stub.EchoTensors(requests(), timeout=60)
    assert wait_until(lambda: metrics.WIRE_BUFFER_BYTES._value.get() == 16 << 20)
    call.cancel()
    release.set()
    assert wait_until(lambda: metrics.WIRE_BUFFER_BYTES._value.get() == 0)
    # A peer going away is not a server error. Depending on when the cancellation reaches
    # the handler, it sees the call end or the stream end mid-tensor (DATA_LOSS).
    ended = ("ended by the peer", "DATA_LOSS")
    assert wait_until(lambda: any(e in r.getMessage() for r in caplog.records for e in ended))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_client_without_certificate_is_refused(
    diagnostics_server: Server, connect: Connect, pki: Pki
) -> None:
    assert pki.client.ca_cert is not None
    channel = grpc.secure_channel(
        diagnostics_server.address,
        grpc.ssl_channel_credentials(root_certificates=pki.client.ca_cert),
        options=[("grpc.ssl_target_name_override", SERVER_NAME)],
    )
    with channel:
        _assert_refused(channel)
    assert client(connect(pki.client)).who_am_i().identity == "hospital-a"


def _assert_refused(channel: grpc.Channel, *, client_side: bool = False) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client(channel).who_am_i()
    status, details = rpc_status(info.value)
    assert status == grpc.StatusCode.UNAVAILABLE, details
    if client_side:  # the client rejected the server: recognisable, so never retried
        assert not is_retryable(info.value)


def unchecked_channel(server: Server, tls: TLSConfig) -> grpc.Channel:
    """A channel that skips create_channel's own-certificate check: the server must refuse."""
    return grpc.secure_channel(
        server.address,
        tls.channel_credentials(),
        options=[("grpc.ssl_target_name_override", SERVER_NAME)],
    )


def test_client_with_certificate_from_another_ca_is_refused(
    diagnostics_server: Server, connect: Connect, pki: Pki
) -> None:
    with unchecked_channel(diagnostics_server, pki.other_ca_client) as channel:
        _assert_refused(channel)
    assert client(connect(pki.client)).who_am_i().identity == "hospital-a"


def test_client_with_expired_certificate_is_refused(
    diagnostics_server: Server, connect: Connect, pki: Pki
) -> None:
    with unchecked_channel(diagnostics_server, pki.expired_client) as channel:
        _assert_refused(channel)
    assert client(connect(pki.client)).who_am_i().identity == "hospital-a"


@pytest.mark.parametrize(
    ("which", "message"),
    [("expired_client", "expired at .*; renew it"), ("other_ca_client", "not issued by the")],
)
def test_create_channel_refuses_a_certificate_peers_would_refuse(
    diagnostics_server: Server, pki: Pki, which: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        create_channel(diagnostics_server.address, getattr(pki, which), server_name=SERVER_NAME)


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1", ":50", "host:port"])
def test_bad_addresses_are_refused(pki: Pki, address: str) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        create_server([binding()], pki.server, address=address)
    with pytest.raises(ValueError, match="is not host:port"):
        create_channel(address, pki.client)


def test_client_refuses_a_server_with_the_wrong_name(connect: Connect, pki: Pki) -> None:
    _assert_refused(connect(pki.client, server_name="aggregator.splitfed.local"), client_side=True)
    assert client(connect(pki.client)).who_am_i().identity == "hospital-a"


def test_client_refuses_a_server_from_another_ca(connect: Connect, pki: Pki) -> None:
    _assert_refused(connect(pki.other_deployment), client_side=True)


def test_insecure_mode_works_only_when_asked_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        server = create_server([binding()], TLSConfig.plaintext())
        with server, create_channel(server.address, TLSConfig.plaintext()) as channel:
            peer = client(channel).who_am_i()
    assert (peer.identity, peer.role) == ("", "")
    assert sum("TLS is OFF" in r.getMessage() for r in caplog.records) == 2


def test_port_in_use_is_a_clear_error(pki: Pki) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            create_server([binding()], pki.server, address=f"127.0.0.1:{port}")


def test_graceful_stop_lets_running_calls_finish_and_refuses_new_ones(pki: Pki) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        entered.set()
        release.wait(30)
        return request

    def register(_: object, server: grpc.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(slow)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Slow", {"Call": handler})]
        )

    server: Server = create_server([ServiceBinding("test.Slow", None, register)], pki.server)
    server.start()
    channel = create_channel(server.address, pki.client, server_name=SERVER_NAME)
    health = health_pb2_grpc.HealthStub(channel)
    call = channel.unary_unary("/test.Slow/Call")
    future = call.future(b"payload", timeout=30)
    assert entered.wait(10)
    stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 30})
    stopper.start()
    assert wait_until(
        lambda: server.health._server_status.get("") == health_pb2.HealthCheckResponse.NOT_SERVING  # type: ignore[attr-defined]
    )
    release.set()
    assert future.result() == b"payload"
    stopper.join(30)
    assert not stopper.is_alive()
    with pytest.raises(grpc.RpcError):
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    channel.close()


def test_message_above_the_servers_size_limit_is_refused(
    diagnostics_server: Server, pki: Pki
) -> None:
    """The server's limit is its chunk size (64 KiB) plus headroom; 1 MiB chunks exceed it."""
    big = TransportOptions(chunk_bytes=1 << 20)
    with create_channel(
        diagnostics_server.address, pki.client, server_name=SERVER_NAME, options=big
    ) as channel:
        chunks = list(iter_chunks(torch.zeros(1 << 18), "h1", chunk_bytes=1 << 20))
        status, details = rpc_status(raw_echo(channel, chunks))
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED, details


def test_stalled_streams_cannot_reserve_more_than_the_budget(pki: Pki) -> None:
    """A client that declares tensors and stalls holds at most the server's receive budget."""
    budget = ReceiveBudget(3 << 20)
    server = create_server(
        [binding(TensorLimits(max_tensor_bytes=2 << 20), SMALL_CHUNKS.chunk_bytes, budget)],
        pki.server,
        options=SMALL_CHUNKS,
    )
    release = threading.Event()

    def stalled(n: int) -> Iterator[diagnostics_pb2.EchoTensorsRequest]:
        chunks = iter_chunks(torch.zeros(n // 4), "h1", chunk_bytes=SMALL_CHUNKS.chunk_bytes)
        yield diagnostics_pb2.EchoTensorsRequest(chunk=next(iter(chunks)))
        release.wait(30)

    with server, create_channel(server.address, pki.client, server_name=SERVER_NAME) as channel:
        stub = diagnostics_pb2_grpc.DiagnosticsStub(channel)
        holding = stub.EchoTensors(stalled(2 << 20), timeout=60)
        assert wait_until(lambda: budget.held == 2 << 20)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.EchoTensors(stalled(2 << 20), timeout=60))
        status, details = rpc_status(info.value)
        assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "receive buffers already hold" in details
        holding.cancel()
        release.set()
        assert wait_until(lambda: budget.held == 0)
        (received,) = client(channel).echo([("h1", torch.ones(2 << 18))])
        assert torch.equal(received.tensor, torch.ones(2 << 18))


def test_idle_streams_are_capped_and_cancelled_and_health_stays_up(pki: Pki) -> None:
    guard = StreamGuard("Diagnostics.EchoTensors", max_streams=2, idle_timeout_s=0.5)
    server = create_server([binding(streams=guard)], pki.server)
    release = threading.Event()

    def silent() -> Iterator[diagnostics_pb2.EchoTensorsRequest]:
        release.wait(30)
        yield from ()

    with server, create_channel(server.address, pki.client, server_name=SERVER_NAME) as channel:
        stub = diagnostics_pb2_grpc.DiagnosticsStub(channel)
        idle = [stub.EchoTensors(silent(), timeout=60) for _ in range(2)]
        assert wait_until(lambda: guard.open_streams == 2)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.EchoTensors(silent(), timeout=60))
        status, details = rpc_status(info.value)
        assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 streams are already open" in details
        assert client(channel).health() == "SERVING"
        # The watchdog ends the silent streams; their clients see the cancellation.
        for call in idle:
            with pytest.raises(grpc.RpcError) as ended:
                list(call)
            assert rpc_status(ended.value)[0] == grpc.StatusCode.CANCELLED
        release.set()
        assert wait_until(lambda: guard.open_streams == 0)
        (received,) = client(channel).echo([("h1", torch.ones(3))])
        assert torch.equal(received.tensor, torch.ones(3))


def test_stream_guard_validates() -> None:
    with pytest.raises(ValueError, match="max_streams"):
        StreamGuard("x", max_streams=0)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        StreamGuard("x", idle_timeout_s=0)


def test_stream_guard_caps_streams_per_identity() -> None:
    """Issue 15, item 6: one identity holds at most ``max_streams_per_identity`` of a
    guard's streams; others still get theirs, and a closed stream gives its slot back."""
    guard = StreamGuard("Guarded", max_streams=4, max_streams_per_identity=2)
    with ExitStack() as held:
        for _ in range(2):
            held.enter_context(guard.open(object(), iter(()), identity="client/greedy"))
        with (
            pytest.raises(LimitExceededError, match="client/greedy already has 2 streams"),
            guard.open(object(), iter(()), identity="client/greedy"),
        ):
            pass
        with guard.open(object(), iter(()), identity="client/honest"):
            assert guard.open_streams == 3
        with guard.open(object(), iter(())):  # not counted for any identity
            pass
    assert guard.open_streams == 0
    with guard.open(object(), iter(()), identity="client/greedy"):
        pass
    with pytest.raises(ValueError, match="max_streams_per_identity"):
        StreamGuard("x", max_streams=2, max_streams_per_identity=3)
