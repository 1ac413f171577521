"""Transport benchmark: the tensor codec against bare gRPC, over the same mutual TLS.

One script a little over 500 lines: a benchmark is one runnable file whose docstring is
its method; the bare and sealed servers it compares against exist only here.

A float32 tensor of ``--size-mib`` MiB (random, fixed seed) goes client -> server -> client
two ways, for each chunk size (64 KiB to 4 MiB, and always ``DEFAULT_CHUNK_BYTES``):

* codec: ``DiagnosticsClient.echo`` -> ``Diagnostics.EchoTensors``. The codec chunks and
  checksums the tensor; the server reassembles and verifies it whole, then re-chunks it.
* bare: a raw-bytes stream-stream RPC (no protobuf, no checksum, no validation) carrying
  the same bytes in the same chunk size. Its server does the codec server's work minus
  the codec: one buffer for the whole tensor (sized from call metadata), every message
  copied in, then the buffer sent back in slices of the chunk size.

At the default chunk size a third path runs in the same rounds (bare, codec, encrypted):

* encrypted: the codec path with sealed chunks (``splitfed.security.sealing``, AES-256-GCM
  with a fixed data key): the client seals each request chunk and opens each response
  chunk; the server (``splitfed.bench.Sealed/EchoTensors``, the Diagnostics echo plus
  sealing) opens each request chunk and seals each response chunk.

All are store-and-forward, share one channel per chunk size (same ``create_channel``
options, same mTLS) and one server per chunk size (same ``create_server`` call), hosted
in a child process so that client and server do not share a GIL. Client and server each
get half the cores (one each on a 2-core machine), as two machines would. Each chunk size runs one
untimed warm-up of each path, then ``--repeats`` (default 5) interleaved rounds (bare, codec, ...).
MB/s counts the bytes both ways (2 * size / seconds / 1e6); the ratio is codec median /
bare median, and encrypted median / codec median for encryption. Every codec and encrypted
echo must be bit-exact and every bare echo the same bytes. The script also measures
single-thread AES-256-GCM throughput (seal and open of default-size chunks) in the client
process.

Run from the repository root::

    python bench/transport.py [--size-mib 256] [--repeats 5] [--chunk-kib 64 ...] \
        [--json PATH]

Besides the table it prints ``ratio transport codec/bare @<chunk>: <value>`` for each
chunk size, the headline ``ratio transport codec/bare: <value>`` for the default one, and
``ratio transport encrypted/unencrypted: <value>`` (encrypted / codec at the default size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from common import machine, pin_half, stop_child
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from splitfed.clients.diagnostics import DiagnosticsClient
from splitfed.errors import NotFoundError, stream_errors
from splitfed.protocol.diagnostics import REQUEST_FRAMES, RESPONSE_FRAMES
from splitfed.retry import RetryPolicy
from splitfed.security.ca import CertificateAuthority
from splitfed.security.sealing import (
    TAG_BYTES,
    TO_BACKBONE,
    TO_CLIENT,
    DataKey,
    FrameContext,
    Opener,
    Sealer,
)
from splitfed.streams import StreamGuard
from splitfed.tls import TLSConfig
from splitfed.transport import (
    MAX_CHUNK_BYTES,
    Server,
    ServiceBinding,
    TransportOptions,
    create_channel,
    create_server,
)
from splitfed.v1 import diagnostics_pb2
from splitfed.wire import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_LIMITS,
    DEFAULT_MAX_TENSOR_BYTES,
    IncomingFrame,
    KiB,
    MiB,
    OutgoingFrame,
    ReceiveBudget,
    iter_frames,
    iter_tensors,
)

BARE_SERVICE = "splitfed.bench.Bare"
SEALED_SERVICE = "splitfed.bench.Sealed"
# A fixed data key, as the key manager would issue it: one secret, a nonce prefix per party.
SESSION = "bench-session"
SECRET = bytes(range(32))
CLIENT_KEY = DataKey(1, SECRET, b"\x00\x00\x00\x01")
SERVER_KEY = DataKey(1, SECRET, b"\x00\x00\x00\x02")
CONTEXT = FrameContext()  # the echo messages carry no op, step or micro-batch
SERVER_NAME = "backbone.bench.local"
DEFAULT_CHUNKS_KIB = (64, 256, 1024, 4096)
SEED = 0
CALL_TIMEOUT_S = 600.0


class BenchError(RuntimeError):
    pass


def _size(nbytes: int) -> str:
    return f"{nbytes // MiB}MiB" if nbytes % MiB == 0 else f"{nbytes // KiB}KiB"


def _chunk_sizes(chunk_kib: list[int] | None) -> list[int]:
    sizes = {kib * KiB for kib in chunk_kib or DEFAULT_CHUNKS_KIB} | {DEFAULT_CHUNK_BYTES}
    return sorted(sizes)


# --- server side (child process) --------------------------------------------------------


def _bare_echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    # The same store-and-forward work as the codec's server, minus protobuf, checksum and
    # validation: one buffer for the whole tensor (its size from call metadata, as the
    # codec takes it from the header), each message copied in, then sent back in slices.
    metadata = dict(context.invocation_metadata())
    size, chunk = int(metadata["x-total-bytes"]), int(metadata["x-chunk-bytes"])
    whole = memoryview(bytearray(size))
    received = 0
    for message in requests:
        whole[received : received + len(message)] = message
        received += len(message)
    for start in range(0, received, chunk):
        yield bytes(whole[start : start + chunk])


def _register_bare(_servicer: object, server: grpc.Server) -> None:
    # No serializers: the messages are the raw bytes, as sent.
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_stream_rpc_method_handler(_bare_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(BARE_SERVICE, {"Echo": handler}),)
    )


def _receiver_key(key_id: int) -> DataKey:
    """The key source of both receivers (they read only its secret)."""
    if key_id != CLIENT_KEY.key_id:
        raise NotFoundError(f"no data key {key_id}")
    return CLIENT_KEY


class SealedEcho:
    """``Diagnostics.EchoTensors`` with sealed chunks both ways: the same stream guard,
    limits, budget, reassembly and re-chunking, plus opening and sealing."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.budget = ReceiveBudget(2 * DEFAULT_LIMITS.max_tensor_bytes)
        self.streams = StreamGuard("Sealed.EchoTensors")
        self.sealer = Sealer(SESSION, TO_CLIENT, SERVER_KEY)  # one per process and key

    @stream_errors
    def EchoTensors(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: Iterator[IncomingFrame[diagnostics_pb2.EchoTensorsRequest]],
        context: grpc.ServicerContext,
    ) -> Iterator[OutgoingFrame]:
        opener = Opener(SESSION, TO_BACKBONE, _receiver_key)
        with self.streams.open(context, request_iterator) as requests:
            chunks = (opener.open_frame(frame, CONTEXT) for frame in requests)
            for echo in iter_tensors(chunks, DEFAULT_LIMITS, self.budget):
                frames = iter_frames(
                    echo.tensor,
                    echo.name,
                    RESPONSE_FRAMES,
                    chunk_bytes=self.chunk_bytes,
                    encoding=echo.encoding,
                )
                yield from requests.pace(self.sealer.seal_frames(frames, CONTEXT))


def _register_sealed(servicer: object, server: grpc.Server) -> None:
    assert isinstance(servicer, SealedEcho)
    handler: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(
        servicer.EchoTensors,
        request_deserializer=REQUEST_FRAMES.parse,
        response_serializer=RESPONSE_FRAMES.serialize,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SEALED_SERVICE, {"EchoTensors": handler}),)
    )


def _serve(tls_dir: Path, chunk_sizes: list[int]) -> int:
    """Serve Diagnostics and the bare echo, one server per chunk size, until stdin closes."""
    from splitfed.services import diagnostics
    from splitfed.services.diagnostics.settings import DEDICATED

    tls = TLSConfig.from_dir(tls_dir)
    servers: list[Server] = []
    try:
        for chunk in chunk_sizes:
            bindings = [
                diagnostics.binding(chunk_bytes=chunk, settings=DEDICATED),
                ServiceBinding(BARE_SERVICE, None, _register_bare),
            ]
            if chunk == DEFAULT_CHUNK_BYTES:
                bindings.append(ServiceBinding(SEALED_SERVICE, SealedEcho(chunk), _register_sealed))
            options = TransportOptions(chunk_bytes=chunk)
            servers.append(create_server(bindings, tls, options=options).start())
            print(f"port {chunk} {servers[-1].port}", flush=True)
        print("ready", flush=True)
        sys.stdin.read()  # returns when the parent closes the pipe or dies
    except KeyboardInterrupt:
        pass
    finally:
        for server in servers:
            server.stop(grace_s=1.0)
    return 0


@contextlib.contextmanager
def _server_process(tls_dir: Path, chunk_kib: list[int] | None) -> Iterator[dict[int, int]]:
    """Start the server child; yield its port per chunk size; always stop it."""
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-tls-dir", str(tls_dir)]
    for kib in chunk_kib or ():
        command += ["--chunk-kib", str(kib)]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pin_half(proc.pid, server=True)
    try:
        assert proc.stdout is not None
        ports: dict[int, int] = {}
        for line in proc.stdout:
            words = line.split()
            if words == ["ready"]:
                break
            if len(words) == 3 and words[0] == "port":
                ports[int(words[1])] = int(words[2])
        else:
            raise BenchError(f"server process exited with code {proc.wait()} before serving")
        yield ports
    finally:
        stop_child(proc)


# --- client side ------------------------------------------------------------------------


def _bare_round(
    call: grpc.StreamStreamMultiCallable[bytes, bytes], payload: bytes, chunk: int
) -> float:
    received = 0
    start = time.perf_counter()
    # A fresh buffer per round, as the codec allocates one per received tensor.
    out = bytearray(len(payload))
    view = memoryview(out)
    requests = (payload[i : i + chunk] for i in range(0, len(payload), chunk))
    metadata = (("x-total-bytes", str(len(payload))), ("x-chunk-bytes", str(chunk)))
    for message in call(requests, timeout=CALL_TIMEOUT_S, metadata=metadata):
        view[received : received + len(message)] = message
        received += len(message)
    elapsed = time.perf_counter() - start
    if received != len(payload) or out != payload:
        raise BenchError(f"bare echo returned {received} bytes, not the {len(payload)} sent")
    return elapsed


def _codec_round(client: DiagnosticsClient, tensor: torch.Tensor) -> float:
    start = time.perf_counter()
    echoed = client.echo([("bench", tensor)])
    elapsed = time.perf_counter() - start
    if len(echoed) != 1 or not torch.equal(echoed[0].tensor, tensor):
        raise BenchError("codec echo is not bit-exact")
    return elapsed


def _sealed_round(
    call: grpc.StreamStreamMultiCallable[OutgoingFrame, Any],
    sealer: Sealer,
    tensor: torch.Tensor,
    chunk: int,
) -> float:
    start = time.perf_counter()
    opener = Opener(SESSION, TO_CLIENT, _receiver_key)
    frames = iter_frames(tensor, "bench", REQUEST_FRAMES, chunk_bytes=chunk)
    responses = call(sealer.seal_frames(frames, CONTEXT), timeout=CALL_TIMEOUT_S)
    echoed = list(iter_tensors(opener.open_frame(r, CONTEXT) for r in responses))
    elapsed = time.perf_counter() - start
    if len(echoed) != 1 or not torch.equal(echoed[0].tensor, tensor):
        raise BenchError("encrypted echo is not bit-exact")
    return elapsed


def _aes_gcm_gb_s(tensor: torch.Tensor, chunk: int) -> dict[str, float]:
    """Single-thread AES-256-GCM over (at most 64 MiB of) the tensor in chunks of
    ``chunk``, seal and open; the best of 5 passes."""
    payload = tensor.numpy().view(np.uint8)[: 64 * MiB]
    aead = AESGCM(SECRET)
    ad = b"bench associated data"
    pieces = [payload[i : i + chunk] for i in range(0, payload.size, chunk)]
    sealed = [np.empty(p.size + TAG_BYTES, dtype=np.uint8) for p in pieces]
    opened = [np.empty(p.size, dtype=np.uint8) for p in pieces]
    nonces = [i.to_bytes(12, "big") for i in range(len(pieces))]
    seal_s, open_s = [], []
    for _ in range(5):
        start = time.perf_counter()
        for nonce, piece, out in zip(nonces, pieces, sealed, strict=True):
            aead.encrypt_into(nonce, piece.data, ad, out.data)
        seal_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for nonce, piece, out in zip(nonces, sealed, opened, strict=True):
            aead.decrypt_into(nonce, piece.data, ad, out.data)
        open_s.append(time.perf_counter() - start)
    if not all(np.array_equal(a, b) for a, b in zip(pieces, opened, strict=True)):
        raise BenchError("AES-GCM round trip is not exact")
    return {
        "seal_gb_s": payload.size / min(seal_s) / 1e9,
        "open_gb_s": payload.size / min(open_s) / 1e9,
    }


def _measure(
    port: int,
    chunk: int,
    tls: TLSConfig,
    tensor: torch.Tensor,
    repeats: int,
    sealer: Sealer | None = None,
) -> dict[str, Any]:
    payload = tensor.numpy().tobytes()  # what the bare path sends
    mb_s = 2 * len(payload) / 1e6
    options = TransportOptions(chunk_bytes=chunk)
    with create_channel(
        f"127.0.0.1:{port}", tls, server_name=SERVER_NAME, options=options
    ) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        bare: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            f"/{BARE_SERVICE}/Echo"
        )
        client = DiagnosticsClient(
            channel, chunk_bytes=chunk, retry=RetryPolicy(max_attempts=1), timeout_s=CALL_TIMEOUT_S
        )
        sealed: grpc.StreamStreamMultiCallable[OutgoingFrame, Any] = channel.stream_stream(
            f"/{SEALED_SERVICE}/EchoTensors",
            request_serializer=REQUEST_FRAMES.serialize,
            response_deserializer=RESPONSE_FRAMES.parse,
        )
        _bare_round(bare, payload, chunk)  # warm-up
        _codec_round(client, tensor)
        if sealer is not None:
            _sealed_round(sealed, sealer, tensor, chunk)
        bare_mb_s: list[float] = []
        codec_mb_s: list[float] = []
        sealed_mb_s: list[float] = []
        for _ in range(repeats):
            bare_mb_s.append(mb_s / _bare_round(bare, payload, chunk))
            codec_mb_s.append(mb_s / _codec_round(client, tensor))
            if sealer is not None:
                sealed_mb_s.append(mb_s / _sealed_round(sealed, sealer, tensor, chunk))
    bare_median = statistics.median(bare_mb_s)
    codec_median = statistics.median(codec_mb_s)
    result: dict[str, Any] = {
        "chunk_bytes": chunk,
        "bare_mb_s": bare_mb_s,
        "codec_mb_s": codec_mb_s,
        "bare_median_mb_s": bare_median,
        "codec_median_mb_s": codec_median,
        "ratio": codec_median / bare_median,
    }
    if sealer is not None:
        sealed_median = statistics.median(sealed_mb_s)
        result.update(
            encrypted_mb_s=sealed_mb_s,
            encrypted_median_mb_s=sealed_median,
            encrypted_ratio=sealed_median / codec_median,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=256, help="tensor size (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per path")
    parser.add_argument(
        "--chunk-kib", type=int, action="append", help="chunk size in KiB; repeat for several"
    )
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    parser.add_argument("--serve-tls-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.size_mib * MiB <= DEFAULT_MAX_TENSOR_BYTES:
        parser.error(f"--size-mib must be between 1 and {DEFAULT_MAX_TENSOR_BYTES // MiB}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if any(not 1 <= kib * KiB <= MAX_CHUNK_BYTES for kib in args.chunk_kib or ()):
        parser.error(f"--chunk-kib must be between 1 and {MAX_CHUNK_BYTES // KiB}")
    chunk_sizes = _chunk_sizes(args.chunk_kib)
    if args.serve_tls_dir is not None:
        return _serve(args.serve_tls_dir, chunk_sizes)

    described = machine(grpcio=grpc.__version__)
    ca = CertificateAuthority.create("bench CA")
    client_cert = ca.issue("bench-client", "client")
    assert client_cert.key_pem is not None
    client_tls = TLSConfig(ca.cert_pem, client_cert.cert_pem, client_cert.key_pem)
    generator = torch.Generator().manual_seed(SEED)
    tensor = torch.rand(args.size_mib * MiB // 4, generator=generator, dtype=torch.float32)
    results: list[dict[str, Any]] = []
    sealer = Sealer(SESSION, TO_BACKBONE, CLIENT_KEY)
    try:
        with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as tmp:
            ca.issue("bench-server", "backbone", dns_names=[SERVER_NAME]).write(Path(tmp))
            pin_half(os.getpid(), server=False)
            with _server_process(Path(tmp), args.chunk_kib) as ports:
                for chunk in chunk_sizes:
                    result = _measure(
                        ports[chunk],
                        chunk,
                        client_tls,
                        tensor,
                        args.repeats,
                        sealer if chunk == DEFAULT_CHUNK_BYTES else None,
                    )
                    results.append(result)
                    print(f"[{_size(chunk)} done]", file=sys.stderr, flush=True)
            aes_gcm = _aes_gcm_gb_s(tensor, DEFAULT_CHUNK_BYTES)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print(f"\n{args.size_mib} MiB tensor, both ways, median (min-max) of {args.repeats} rounds")
    print(f"{'chunk':>8} {'bare MB/s':>18} {'codec MB/s':>18} {'codec/bare':>11}")
    for r in results:
        bare = f"{r['bare_median_mb_s']:.0f} ({min(r['bare_mb_s']):.0f}-{max(r['bare_mb_s']):.0f})"
        codec = (
            f"{r['codec_median_mb_s']:.0f} ({min(r['codec_mb_s']):.0f}-{max(r['codec_mb_s']):.0f})"
        )
        print(f"{_size(r['chunk_bytes']):>8} {bare:>18} {codec:>18} {r['ratio']:>11.2f}")
    [default] = [r for r in results if r["chunk_bytes"] == DEFAULT_CHUNK_BYTES]
    encrypted = (
        f"{default['encrypted_median_mb_s']:.0f} "
        f"({min(default['encrypted_mb_s']):.0f}-{max(default['encrypted_mb_s']):.0f})"
    )
    print(
        f"\nencrypted (sealed chunks, AES-256-GCM) @{_size(DEFAULT_CHUNK_BYTES)}: {encrypted} "
        f"MB/s; codec {default['codec_median_mb_s']:.0f} MB/s"
    )
    print(
        f"AES-256-GCM, one thread, {_size(DEFAULT_CHUNK_BYTES)} chunks: "
        f"seal {aes_gcm['seal_gb_s']:.2f} GB/s, open {aes_gcm['open_gb_s']:.2f} GB/s"
    )
    ratios = {f"transport codec/bare @{_size(r['chunk_bytes'])}": r["ratio"] for r in results}
    ratios["transport codec/bare"] = ratios[f"transport codec/bare @{_size(DEFAULT_CHUNK_BYTES)}"]
    ratios["transport encrypted/unencrypted"] = default["encrypted_ratio"]
    print()
    for what, value in ratios.items():
        print(f"ratio {what}: {value:.2f}")
    if args.json is not None:
        figures = {
            "benchmark": "transport",
            "size_mib": args.size_mib,
            "repeats": args.repeats,
            "default_chunk_bytes": DEFAULT_CHUNK_BYTES,
            "machine": described,
            "chunks": results,
            "aes_gcm_single_thread": aes_gcm,
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
