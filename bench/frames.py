"""Frame round trip: one tensor frame there and back on a live stream, splitfed's stream
machinery against bare gRPC carrying the same bytes, over the same mutual TLS.

Where per-message cost rules (a generation step sends one token's hidden state per round
trip), throughput figures (bench/transport.py) say little; this measures the latency of
one frame on a stream that is already open and warm, as a trainer or generator uses it.

Two frames, each a float32 tensor (random, fixed seed) smaller than the default chunk, so
one message each way on both paths:

* ``2MiB``: a training activation of 2 MiB ([1, 128, 4096]), on a ``Backbone.Train``
  stream (op FORWARD, step and micro-batch set);
* ``decode step``: one token's hidden state of a 7B model ([1, 1, 4096], 16 KiB) as
  ``h1`` alone, on a ``Backbone.Generate`` stream (op FORWARD). What a decode step sends
  besides h1 (today an attention mask of the positions so far) is left out, so the figure
  is the frame of the one tensor every decode step carries.

The two paths, both on one channel (``create_channel``, default ``TransportOptions``)
to one server (``create_server``, same options) in a child process, client and server
pinned to half the cores each (one each on a 2-core machine):

* splitfed: the client is ``splitfed.clients.backbone._Stream`` (what ``TrainStream`` and
  ``GenerateStream`` send and receive with): ``send_tensor`` (``tensor_frames``: header
  with CRC-32C, ``FrameSpec`` serialisation) through its request queue, and
  ``receive_tensor`` (``FrameSpec`` parse, ``FrameReceiver``, a ``TensorAssembler`` with
  the client's limits; a fresh buffer per tensor), then compares the tensor (untimed).
  The server is an echo servicer of the
  Backbone service built from the backbone's own pieces: ``service_binding`` with the
  Backbone frame specs (malformed-request check), ``@stream_errors``, the RPC metrics
  interceptor of ``create_server``, a ``StreamGuard``, the backbone's inbox
  (``handlers._Inbox``: ``FrameReceiver``, a ``TensorAssembler`` with limits and a
  ``ReceiveBudget``, ``gather``), and answers ``h2`` (the tensor received, no model
  compute) with ``tensor_frames`` under the stream's response spec, paced by the guard.
* bare: a raw-bytes stream-stream RPC (no protobuf, no checksum, no validation): the
  client puts the tensor's bytes on its request iterator (a ``queue.SimpleQueue``; gRPC's
  synchronous API takes requests from an iterator on its own thread), the server yields
  each message back, the client copies the answer into a fresh buffer (as the assembler
  allocates one per tensor), then compares it (untimed).

Each path's stream opens once; a warm-up of ``--warmup`` round trips per frame and path,
then ``--repeats`` rounds of ``--round-trips`` round trips each, interleaved (bare 2 MiB,
splitfed 2 MiB, bare decode step, splitfed decode step). A figure is the median of the
rounds' mean round-trip times; the ratio is bare / splitfed (1.0: splitfed costs nothing
over gRPC). Every echo must be bit-exact.

Run from the repository root::

    python bench/frames.py [--repeats 7] [--round-trips 40] [--json PATH]

It prints ``ratio frame round trip bare/splitfed 2MiB: v``, ``... decode step: v`` and
``ratio frame round trip bare/splitfed: v`` (the lower of the two).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import torch
from common import machine, pin_half, report, stop_child

from splitfed.clients.backbone import BackboneClient, _Stream
from splitfed.errors import stream_errors
from splitfed.protocol.backbone import (
    FRAME_SPECS,
    GENERATE_REQUEST,
    GENERATE_RESPONSE,
    SERVICE,
    TRAIN_REQUEST,
    TRAIN_RESPONSE,
)
from splitfed.protocol.framing import tensor_frames
from splitfed.security.ca import CertificateAuthority
from splitfed.services.backbone.handlers import _Inbox
from splitfed.streams import StreamGuard
from splitfed.tls import TLSConfig
from splitfed.transport import (
    Server,
    ServiceBinding,
    TransportOptions,
    create_channel,
    create_server,
    service_binding,
)
from splitfed.v1 import backbone_pb2
from splitfed.wire import (
    DEFAULT_CHUNK_BYTES,
    FrameSpec,
    IncomingFrame,
    OutgoingFrame,
    ReceiveBudget,
    TensorAssembler,
    TensorLimits,
)

BARE_SERVICE = "splitfed.bench.BareFrames"
SERVER_NAME = "backbone.bench.local"
SESSION = "bench-session"
SEED = 0
HIDDEN = 4096  # a 7B model's hidden size
# (name, shape, stream): the frames timed.
FRAMES = (
    ("2MiB", (1, 128, HIDDEN), "Train"),
    ("decode step", (1, 1, HIDDEN), "Generate"),
)
# The echo's limits: the largest frame timed, rank 3 as the backbone's.
LIMITS = TensorLimits(max_tensor_bytes=4 << 20, max_rank=3, encodings=frozenset({"raw"}))
NEEDED = frozenset({"h1"})
OPTIONS = TransportOptions()


class BenchError(RuntimeError):
    pass


# --- server side (child process) --------------------------------------------------------


class FrameEcho:
    """``Backbone.Train`` and ``Generate`` answering each ``h1`` with itself as ``h2``:
    the backbone's stream handling (guard, inbox, response frames, pacing) without a
    session or a model."""

    def __init__(self) -> None:
        self.budget = ReceiveBudget(64 << 20)
        self.streams = StreamGuard("FrameEcho")

    def _echo(
        self,
        requests: Iterator[IncomingFrame[Any]],
        context: grpc.ServicerContext,
        response: FrameSpec[Any],
        fields: Callable[[Any], dict[str, int]],
    ) -> Iterator[OutgoingFrame]:
        with (
            self.streams.open(context, requests) as guarded,
            TensorAssembler(LIMITS, self.budget) as assembler,
        ):
            inbox = _Inbox(assembler, None)

            def answers() -> Iterator[OutgoingFrame]:
                for frame in guarded:
                    args = inbox.arguments(frame, NEEDED)
                    if args is not None:
                        yield from tensor_frames(
                            {"h2": args["h1"]},
                            response,
                            chunk_bytes=OPTIONS.chunk_bytes,
                            **fields(frame.message),
                        )

            yield from guarded.pace(answers())
            assembler.finish()

    @stream_errors
    def Train(  # noqa: N802 (gRPC method name)
        self, requests: Iterator[IncomingFrame[Any]], context: grpc.ServicerContext
    ) -> Iterator[OutgoingFrame]:
        def fields(m: backbone_pb2.TrainRequest) -> dict[str, int]:
            return {"op": m.op, "step": m.step, "micro_batch": m.micro_batch}

        yield from self._echo(requests, context, TRAIN_RESPONSE, fields)

    @stream_errors
    def Generate(  # noqa: N802 (gRPC method name)
        self, requests: Iterator[IncomingFrame[Any]], context: grpc.ServicerContext
    ) -> Iterator[OutgoingFrame]:
        def fields(m: backbone_pb2.GenerateRequest) -> dict[str, int]:
            return {"op": m.op, "cache_length": 1}

        yield from self._echo(requests, context, GENERATE_RESPONSE, fields)


def _bare_echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    yield from requests


def _register_bare(_servicer: object, server: grpc.Server) -> None:
    # No serializers: the messages are the raw bytes, as sent.
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_stream_rpc_method_handler(_bare_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(BARE_SERVICE, {"Echo": handler}),)
    )


def _serve(tls_dir: Path) -> int:
    """Serve the frame echo and the bare echo until stdin closes."""
    tls = TLSConfig.from_dir(tls_dir)
    bindings = [
        service_binding(SERVICE, FrameEcho(), FRAME_SPECS),
        ServiceBinding(BARE_SERVICE, None, _register_bare),
    ]
    server: Server = create_server(bindings, tls, options=OPTIONS).start()
    try:
        print(f"port {server.port}", flush=True)
        sys.stdin.read()  # returns when the parent closes the pipe or dies
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace_s=1.0)
    return 0


@contextlib.contextmanager
def _server_process(tls_dir: Path) -> Iterator[int]:
    """Start the server child; yield its port; always stop it."""
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-tls-dir", str(tls_dir)]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pin_half(proc.pid, server=True)
    try:
        assert proc.stdout is not None
        words = proc.stdout.readline().split()
        if len(words) != 2 or words[0] != "port":
            raise BenchError(f"server process exited with code {proc.wait()} before serving")
        yield int(words[1])
    finally:
        stop_child(proc)


# --- client side ------------------------------------------------------------------------


class BareStream:
    """A live raw-bytes bidi stream used as request/response."""

    _END = b""

    def __init__(self, channel: grpc.Channel) -> None:
        self._outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        call: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            f"/{BARE_SERVICE}/Echo"
        )
        self._call = call(iter(self._outbox.get, self._END))
        self._responses: Iterator[bytes] = iter(self._call)

    def round_trip(self, payload: bytes) -> float:
        start = time.perf_counter()
        self._outbox.put(payload)
        out = bytearray(len(payload))
        out[:] = next(self._responses)
        elapsed = time.perf_counter() - start  # the check below is not the transport's
        if out != payload:
            raise BenchError("bare echo returned other bytes than it was sent")
        return elapsed

    def close(self) -> None:
        self._outbox.put(self._END)
        self._call.cancel()


class SplitfedStream:
    """A live Train or Generate stream, through the client's ``_Stream``."""

    def __init__(self, client: BackboneClient, method: str) -> None:
        train = method == "Train"
        call = client.train_call if train else client.generate_call
        self.spec = TRAIN_REQUEST if train else GENERATE_REQUEST
        self.fields = (
            {"op": backbone_pb2.TRAIN_OP_FORWARD, "step": 1, "micro_batch": 0}
            if train
            else {"op": backbone_pb2.GENERATE_OP_FORWARD}
        )
        self._stream = _Stream(call, SESSION, client.chunk_bytes, None)

    def round_trip(self, tensor: torch.Tensor) -> float:
        start = time.perf_counter()
        self._stream.send_tensor(tensor, "h1", self.spec, "raw", **self.fields)
        _, echoed = self._stream.receive_tensor()
        elapsed = time.perf_counter() - start  # the check below is not the transport's
        if not torch.equal(echoed, tensor):
            raise BenchError("splitfed echo is not bit-exact")
        return elapsed

    def close(self) -> None:
        self._stream.close()


def _mean_round_trip(round_trip: Callable[[], float], count: int) -> float:
    return sum(round_trip() for _ in range(count)) / count


def _measure(
    port: int, tls: TLSConfig, repeats: int, round_trips: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Per frame, per path: each round's mean round-trip time in seconds."""
    generator = torch.Generator().manual_seed(SEED)
    tensors = {
        name: torch.rand(shape, generator=generator, dtype=torch.float32)
        for name, shape, _ in FRAMES
    }
    times: dict[str, dict[str, list[float]]] = {
        name: {"bare": [], "splitfed": []} for name, _, _ in FRAMES
    }
    with create_channel(
        f"127.0.0.1:{port}", tls, server_name=SERVER_NAME, options=OPTIONS
    ) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        client = BackboneClient(channel, chunk_bytes=OPTIONS.chunk_bytes)
        with contextlib.ExitStack() as streams:
            paths: dict[str, dict[str, Callable[[], float]]] = {}
            for name, _, method in FRAMES:
                bare = BareStream(channel)
                streams.callback(bare.close)
                framed = SplitfedStream(client, method)
                streams.callback(framed.close)
                payload, tensor = tensors[name].numpy().tobytes(), tensors[name]
                paths[name] = {
                    "bare": functools.partial(bare.round_trip, payload),
                    "splitfed": functools.partial(framed.round_trip, tensor),
                }
            for name, _, _ in FRAMES:
                for round_trip in paths[name].values():
                    _mean_round_trip(round_trip, warmup)
            for _ in range(repeats):
                for name, _, _ in FRAMES:
                    for path, round_trip in paths[name].items():
                        times[name][path].append(_mean_round_trip(round_trip, round_trips))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per frame and path")
    parser.add_argument("--round-trips", type=int, default=40, help="round trips per round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed round trips first")
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    parser.add_argument("--serve-tls-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_tls_dir is not None:
        return _serve(args.serve_tls_dir)
    if args.repeats < 1 or args.round_trips < 1 or args.warmup < 0:
        parser.error("--repeats and --round-trips must be at least 1, --warmup at least 0")

    described = machine(grpcio=grpc.__version__, loadavg=os.getloadavg()[0])
    ca = CertificateAuthority.create("bench CA")
    client_cert = ca.issue("bench-client", "client")
    assert client_cert.key_pem is not None
    client_tls = TLSConfig(ca.cert_pem, client_cert.cert_pem, client_cert.key_pem)
    try:
        with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as tmp:
            ca.issue("bench-server", "backbone", dns_names=[SERVER_NAME]).write(Path(tmp))
            pin_half(os.getpid(), server=False)
            with _server_process(Path(tmp)) as port:
                times = _measure(port, client_tls, args.repeats, args.round_trips, args.warmup)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print(
        f"\nround trip of one frame on a live stream, ms: median (min-max) of {args.repeats} "
        f"rounds of {args.round_trips}"
    )
    print(f"{'frame':>12} {'bytes':>9} {'bare':>20} {'splitfed':>20} {'bare/splitfed':>14}")
    figures: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    for name, shape, method in FRAMES:
        medians = {path: statistics.median(t) for path, t in times[name].items()}
        ratio = medians["bare"] / medians["splitfed"]
        nbytes = 4 * int(torch.Size(shape).numel())
        cells = [
            f"{medians[p] * 1e3:.3f} ({min(times[name][p]) * 1e3:.3f}-"
            f"{max(times[name][p]) * 1e3:.3f})"
            for p in ("bare", "splitfed")
        ]
        print(f"{name:>12} {nbytes:>9} {cells[0]:>20} {cells[1]:>20} {ratio:>14.3f}")
        ratios[f"frame round trip bare/splitfed {name}"] = ratio
        figures[name] = {
            "shape": list(shape),
            "stream": method,
            "bytes": nbytes,
            "round_trip_s": times[name],
            "median_round_trip_s": medians,
        }
    ratios["frame round trip bare/splitfed"] = min(ratios.values())
    print()
    report(
        args.json,
        "frames",
        ratios,
        repeats=args.repeats,
        round_trips=args.round_trips,
        warmup=args.warmup,
        chunk_bytes=DEFAULT_CHUNK_BYTES,
        loadavg_after=os.getloadavg()[0],
        machine=described,
        frames=figures,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
