"""Client side of splitfed.v1.Backbone: sessions, the training and generation streams,
and the body as a torch module (:class:`RemoteBody`)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import torch
from torch import nn

from splitfed.clients.keys import KeyManagerClient
from splitfed.clients.links import LinkMeter, WireEncodings
from splitfed.encodings import get_encoding
from splitfed.errors import error_from_rpc, rpc_status
from splitfed.failures import ConnectionFailedError, Endpoint, call_failure
from splitfed.protocol.backbone import (
    EXPORT_RESPONSE,
    FEDERATION_METADATA,
    GENERATE_REQUEST,
    GENERATE_RESPONSE,
    IMPORT_CONTEXT,
    IMPORT_REQUEST,
    OWNER_METADATA,
    SERVICE,
    SESSION_METADATA,
    TRAIN_REQUEST,
    TRAIN_RESPONSE,
    ModelInfo,
    SessionInfo,
    SessionRequest,
    StepCommand,
    StepResult,
    export_context,
)
from splitfed.protocol.framing import FrameReceiver, tensor_frames
from splitfed.retry import RETRYABLE, RetryPolicy, call_with_retry
from splitfed.security.sealing import TO_BACKBONE, DataKey
from splitfed.security.session_crypto import SessionCrypto
from splitfed.transport import framed_stream
from splitfed.v1 import backbone_pb2, backbone_pb2_grpc
from splitfed.wire import (
    DEFAULT_CHUNK_BYTES,
    FrameSpec,
    IncomingFrame,
    OutgoingFrame,
    PackedFrame,
    TensorAssembler,
    TensorLimits,
)

logger = logging.getLogger(__name__)

# Times a generation step reconnects and replays before its loss is the caller's.
MAX_RECOVERIES = 5

# Large enough for any activation a client receives (the backbone enforces its own).
CLIENT_LIMITS = TensorLimits(max_tensor_bytes=8 << 30, max_rank=3)


class StreamLostError(RuntimeError):
    """The stream to the backbone broke; the current step must be redone."""


class _Outbox:
    """A request iterator fed from another thread; ``close`` ends the stream."""

    _END = object()

    def __init__(self) -> None:
        # SimpleQueue (C): a put and a get without Queue's Python-level condition
        # variables, on every frame of every step (docs/benchmarks.md "Frame round trip").
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def close(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            yield item


class _Stream:
    """A bidirectional stream used as request/response: send frames, await answers."""

    def __init__(
        self,
        multicallable: grpc.StreamStreamMultiCallable[Any, Any],
        session_id: str,
        chunk_bytes: int,
        timeout_s: float | None,
        crypto: SessionCrypto | None = None,
        endpoint: Endpoint | None = None,
    ) -> None:
        self._outbox = _Outbox()
        self.endpoint = endpoint
        self.chunk_bytes = chunk_bytes
        self.crypto = crypto
        # One receiver (opener) per stream: its replay state follows this stream's frames
        # (and the session's, shared by its streams).
        self._receiver = FrameReceiver(
            crypto, sealed_error="the backbone sealed a chunk of a plain session"
        )
        self._call = multicallable(
            iter(self._outbox), metadata=((SESSION_METADATA, session_id),), timeout=timeout_s
        )
        self._responses: Iterator[IncomingFrame[Any]] = iter(self._call)
        self._lock = threading.Lock()
        self.last_encoding = "raw"
        # One for the stream (no budget: nothing held between tensors), not one per tensor.
        self._assembler = TensorAssembler(CLIENT_LIMITS)

    def send_tensor(
        self, tensor: torch.Tensor, name: str, spec: FrameSpec[Any], encoding: str, **fields: Any
    ) -> None:
        frames = tensor_frames(
            {name: tensor},
            spec,
            chunk_bytes=self.chunk_bytes,
            encoding=encoding,
            crypto=self.crypto,
            **fields,
        )
        for frame in frames:
            self._outbox.put(frame)

    def send(self, message: Any) -> None:
        self._outbox.put(message)

    def next(self) -> IncomingFrame[Any]:
        try:
            return next(self._responses)
        except StopIteration:
            raise StreamLostError("the backbone ended the stream") from None
        except grpc.RpcError as err:
            raise _translate(err, self.endpoint) from None

    def receive_tensor(self) -> tuple[Any, torch.Tensor]:
        """The next tensor and the message of its last frame (:attr:`last_encoding`: the
        encoding it came in)."""
        assembler = self._assembler
        try:
            while True:
                frame = self.next()
                received = self._receiver.feed(assembler, frame)
                if received is not None:
                    self.last_encoding = received.encoding
                    return frame.message, received.tensor
        except BaseException:
            assembler.close()  # a tensor cut short is not continued by the next call
            raise

    def close(self) -> None:
        self._outbox.close()
        self._call.cancel()


def _translate(err: grpc.RpcError, endpoint: Endpoint | None = None) -> Exception:
    code, details = rpc_status(err)
    failure = call_failure(err, endpoint)
    if failure is not None:
        if isinstance(failure, ConnectionFailedError) and failure.cause.retryable:
            # Waited out like a lost stream (a backbone restarting); said plainly if it
            # does not come back.
            return StreamLostError(str(failure))
        return failure  # TLS or a revoked certificate: no retry helps
    # ABORTED: the backbone gave up the step (a client-batch partner went away); the
    # trainer reconnects and redoes it like after any lost stream.
    if code in RETRYABLE or code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED):
        return StreamLostError(
            f"stream to the backbone lost ({code.name if code else '?'}: {details})"
        )
    mapped = error_from_rpc(err)
    return mapped if mapped is not None else RuntimeError(f"backbone failed: {details}")


def _wire_nbytes(tensor: torch.Tensor, encoding: str) -> int:
    return get_encoding(encoding).encoded_nbytes(tensor.dtype, tuple(tensor.shape))


def _raw_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class _SessionStream:
    """A stream of one session (Train or Generate): forward passes send h1 and the
    attention mask under ``spec`` and await h2.

    ``encodings``: a :class:`WireEncodings` (h1 and h2 in its activation encoding, asked
    for in each request's ``reply_encoding``; on the training stream dL/dh2 and dL/dh1 in
    its gradient encoding), or a name (the older form: h1 in it, h2 in the session's
    encoding, gradients raw both ways). Set :attr:`encodings` between steps to change them.
    """

    spec: FrameSpec[Any]

    def __init__(
        self,
        client: BackboneClient,
        session_id: str,
        encodings: WireEncodings | str,
        crypto: SessionCrypto | None = None,
    ) -> None:
        self.encodings = encodings
        call = client.train_call if self.spec is TRAIN_REQUEST else client.generate_call
        self._stream = _Stream(
            call, session_id, client.chunk_bytes, client.stream_timeout_s, crypto, client.endpoint
        )

    @property
    def encodings(self) -> WireEncodings:
        return self._encodings

    @encodings.setter
    def encodings(self, encodings: WireEncodings | str) -> None:
        # A name keeps the replies as the session set them (no reply_encoding sent).
        self._explicit = isinstance(encodings, WireEncodings)
        self._encodings = (
            encodings if isinstance(encodings, WireEncodings) else WireEncodings(encodings, "raw")
        )

    @property
    def encoding(self) -> str:
        """The activation encoding (h1)."""
        return self._encodings.activations

    def _reply(self, kind: str) -> str:
        return getattr(self._encodings, kind) if self._explicit else ""

    def _send_forward(self, hidden: torch.Tensor, mask: torch.Tensor, **fields: int) -> int:
        """Send h1 and its mask; the bytes put on the wire."""
        encoding, reply = self._encodings.activations, self._reply("activations")
        self._stream.send_tensor(hidden, "h1", self.spec, encoding, reply_encoding=reply, **fields)
        mask = mask.to(torch.int8)
        self._stream.send_tensor(
            mask, "attention_mask", self.spec, "raw", reply_encoding=reply, **fields
        )
        return _wire_nbytes(hidden, encoding) + _raw_nbytes(mask)

    def _forward(self, hidden: torch.Tensor, mask: torch.Tensor, **fields: int) -> torch.Tensor:
        self._send_forward(hidden, mask, **fields)
        _, output = self._stream.receive_tensor()
        return output

    def close(self) -> None:
        self._stream.close()


class TrainStream(_SessionStream):
    """The training stream of one session.

    ``meter`` (optional) counts every training exchange (FORWARD, BACKWARD): bytes both
    ways, wall time, the backbone's ``compute_us`` and the time spent waiting for the
    reply (:class:`~splitfed.clients.links.LinkMeter`). The ``send_*`` / :meth:`receive`
    pair lets a caller keep several requests in flight; replies come in request order.
    """

    spec = TRAIN_REQUEST

    def __init__(
        self,
        client: BackboneClient,
        session_id: str,
        encodings: WireEncodings | str = "raw",
        crypto: SessionCrypto | None = None,
        *,
        meter: LinkMeter | None = None,
    ) -> None:
        super().__init__(client, session_id, encodings, crypto)
        self.meter = meter
        # Per request in flight: whether the meter counts it (EVAL passes are not).
        self._metered: deque[bool] = deque()

    def forward(
        self, step: int, micro: int, hidden: torch.Tensor, mask: torch.Tensor, *, train: bool = True
    ) -> torch.Tensor:
        self.send_forward(step, micro, hidden, mask, train=train)
        return self.receive()[1]

    def backward(self, step: int, micro: int, grad: torch.Tensor) -> torch.Tensor:
        self.send_backward(step, micro, grad)
        return self.receive()[1]

    # Without waiting (clients/pipeline.py): sends return at once (the outbox is written
    # by gRPC's thread); the backbone answers every request in the order it was sent.

    def send_forward(
        self, step: int, micro: int, hidden: torch.Tensor, mask: torch.Tensor, *, train: bool = True
    ) -> None:
        """Send a FORWARD (an EVAL without ``train``) of h1 and the mask; its h2 comes
        from :meth:`receive`."""
        op = backbone_pb2.TRAIN_OP_FORWARD if train else backbone_pb2.TRAIN_OP_EVAL
        metered = self.meter is not None and train
        if metered:
            assert self.meter is not None
            self.meter.sent(_wire_nbytes(hidden, self.encoding) + mask.numel(), _raw_nbytes(hidden))
        self._metered.append(metered)
        self._send_forward(hidden, mask, op=op, step=step, micro_batch=micro)

    def send_backward(self, step: int, micro: int, grad: torch.Tensor) -> None:
        """Send the BACKWARD of dL/dh2; its dL/dh1 comes from :meth:`receive`."""
        encoding = self._encodings.gradients
        if self.meter is not None:
            self.meter.sent(_wire_nbytes(grad, encoding), _raw_nbytes(grad))
        self._metered.append(self.meter is not None)
        self._stream.send_tensor(
            grad,
            "grad_h2",
            TRAIN_REQUEST,
            encoding,
            reply_encoding=self._reply("gradients"),
            op=backbone_pb2.TRAIN_OP_BACKWARD,
            step=step,
            micro_batch=micro,
        )

    def receive(self) -> tuple[backbone_pb2.TrainResponse, torch.Tensor]:
        """The next answer with a tensor: the response (its op, step, micro_batch) and
        h2 or dL/dh1, the reply of the oldest request in flight."""
        started = time.perf_counter()
        try:
            message, tensor = self._stream.receive_tensor()
        except StreamLostError:
            self._metered.clear()
            if self.meter is not None:
                self.meter.reset()
            raise
        metered = self._metered.popleft() if self._metered else False
        if metered and self.meter is not None:
            self.meter.replied(
                _wire_nbytes(tensor, self._stream.last_encoding),
                _raw_nbytes(tensor),
                message.compute_us / 1e6,
                time.perf_counter() - started,
            )
        return message, tensor

    def step(self, step: int, client_sq_norm: float, max_grad_norm: float) -> StepResult:
        self._stream.send(
            backbone_pb2.TrainRequest(
                op=backbone_pb2.TRAIN_OP_STEP,
                step=step,
                command=StepCommand(client_sq_norm, max_grad_norm).to_proto(),
            )
        )
        return StepResult.from_proto(self._stream.next().message.result)


class GenerateStream(_SessionStream):
    """The generation stream of one session. A forward whose mask is the previous one's
    extended by ones (a decode step) sends h1 alone, flagged ``extend_mask``: with h1
    within a chunk, a step is one request message and one response message."""

    spec = GENERATE_REQUEST
    # The mask the backbone holds for this stream (its last forward's; None: none, or
    # unknown after a failure), which a decode step's mask extends.
    _mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last, self._mask = self._mask, None
        op = backbone_pb2.GENERATE_OP_FORWARD
        reply = self._reply("activations")
        if last is not None and _extends(mask, last, hidden.shape[1]):
            self._stream.send_tensor(
                hidden,
                "h1",
                GENERATE_REQUEST,
                self.encoding,
                op=op,
                extend_mask=True,
                reply_encoding=reply,
            )
        else:
            self._send_forward(hidden, mask, op=op)
        _, output = self._stream.receive_tensor()
        self._mask = mask
        return output

    def reset(self) -> None:
        self._mask = None
        self._stream.send(backbone_pb2.GenerateRequest(op=backbone_pb2.GENERATE_OP_RESET))
        self._stream.next()

    def trim(self, length: int) -> int:
        last, self._mask = self._mask, None
        self._stream.send(
            backbone_pb2.GenerateRequest(op=backbone_pb2.GENERATE_OP_TRIM, length=length)
        )
        kept = int(self._stream.next().message.cache_length)
        if last is not None:
            self._mask = last[:, :kept]
        return kept


def _extends(mask: torch.Tensor, last: torch.Tensor, new: int) -> bool:
    """Whether ``mask`` is ``last`` followed by ``new`` columns of ones."""
    known = last.shape[1]
    return (
        mask.dim() == 2
        and tuple(mask.shape) == (last.shape[0], known + new)
        and torch.equal(mask[:, :known], last)
        and bool((mask[:, known:] == 1).all())
    )


class BackboneClient:
    def __init__(
        self,
        channel: grpc.Channel,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        retry: RetryPolicy | None = None,
        timeout_s: float = 60.0,
        stream_timeout_s: float | None = None,
        transfer_timeout_s: float = 600.0,
        endpoint: Endpoint | None = None,
    ) -> None:
        self._stub = backbone_pb2_grpc.BackboneStub(channel)
        # The other end, as the error messages name it (None: the raw gRPC details).
        self.endpoint = endpoint
        methods = SERVICE.methods_by_name
        self.train_call = framed_stream(channel, methods["Train"], TRAIN_REQUEST, TRAIN_RESPONSE)
        self.generate_call = framed_stream(
            channel, methods["Generate"], GENERATE_REQUEST, GENERATE_RESPONSE
        )
        self._export = channel.unary_stream(
            f"/{SERVICE.full_name}/ExportAdapter",
            request_serializer=backbone_pb2.ExportAdapterRequest.SerializeToString,
            response_deserializer=EXPORT_RESPONSE.parse,
        )
        self._import = channel.stream_unary(
            f"/{SERVICE.full_name}/ImportAdapter",
            request_serializer=IMPORT_REQUEST.serialize,
            response_deserializer=backbone_pb2.ImportAdapterResponse.FromString,
        )
        self.chunk_bytes = chunk_bytes
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self.stream_timeout_s = stream_timeout_s
        # Adapter exports and imports: their bytes over the slowest link we serve.
        self.transfer_timeout_s = transfer_timeout_s

    def _unary(self, what: str, call: Any) -> Any:
        try:
            return call_with_retry(call, self.retry, what=what)
        except grpc.RpcError as err:
            raise _translate(err, self.endpoint) from None

    def model_info(self) -> ModelInfo:
        response = self._unary(
            "Backbone.GetModelInfo",
            lambda: self._stub.GetModelInfo(
                backbone_pb2.GetModelInfoRequest(), timeout=self.timeout_s
            ),
        )
        return ModelInfo.from_proto(response.info)

    def open_session(self, request: SessionRequest) -> SessionInfo:
        message = request.to_proto()
        response = self._unary(
            "Backbone.OpenSession", lambda: self._stub.OpenSession(message, timeout=self.timeout_s)
        )
        return SessionInfo.from_proto(response)

    def close_session(self, session_id: str) -> None:
        self._unary(
            "Backbone.CloseSession",
            lambda: self._stub.CloseSession(
                backbone_pb2.CloseSessionRequest(session_id=session_id), timeout=self.timeout_s
            ),
        )

    def check_session(self, session_id: str, federation: str, owner: str) -> int:
        """Aggregators: that ``session_id`` is ``owner``'s session for ``federation``
        (``PermissionDeniedError`` otherwise); returns its step."""
        request = backbone_pb2.CheckSessionRequest(
            session_id=session_id, federation=federation, owner=owner
        )
        response = self._unary(
            "Backbone.CheckSession",
            lambda: self._stub.CheckSession(request, timeout=self.timeout_s),
        )
        return int(response.step)

    def export_adapter(
        self,
        session_id: str,
        crypto: SessionCrypto | None = None,
        *,
        federation: str = "",
        owner: str = "",
    ) -> dict[str, torch.Tensor]:
        """The session's body adapter. An encrypted session's comes sealed: pass its
        ``crypto`` (the one its training uses). An aggregator names the federation it
        acts for and the member it expects to own the session."""

        def call() -> dict[str, torch.Tensor]:
            request = backbone_pb2.ExportAdapterRequest(
                session_id=session_id, federation=federation, owner=owner
            )
            responses = self._export(request, timeout=self.transfer_timeout_s)
            receiver = FrameReceiver(
                crypto,
                context=lambda frame: export_context(frame.message.step),
                follow=False,
                sealed_error="the backbone sealed the adapter of an encrypted session; pass "
                "the session's crypto to export_adapter",
            )
            tensors: dict[str, torch.Tensor] = {}
            with TensorAssembler(CLIENT_LIMITS) as assembler:
                for frame in responses:
                    received = receiver.feed(assembler, frame)
                    if received is not None:
                        tensors[received.name] = received.tensor
            return tensors

        return self._unary("Backbone.ExportAdapter", call)  # type: ignore[no-any-return]

    def import_adapter(
        self,
        session_id: str,
        tensors: Mapping[str, torch.Tensor],
        crypto: SessionCrypto | None = None,
        *,
        federation: str = "",
        owner: str = "",
    ) -> int:
        """Replace the session's body adapter tensors (an encrypted session's: sealed with
        its ``crypto``); the number replaced. An aggregator names the federation and the
        owner as for :meth:`export_adapter`."""
        metadata = [(SESSION_METADATA, session_id)]
        if federation or owner:
            metadata += [(FEDERATION_METADATA, federation), (OWNER_METADATA, owner)]

        def frames() -> Iterator[OutgoingFrame | PackedFrame]:
            return tensor_frames(
                tensors,
                IMPORT_REQUEST,
                chunk_bytes=self.chunk_bytes,
                crypto=crypto,
                context=IMPORT_CONTEXT,
            )

        response = self._unary(
            "Backbone.ImportAdapter",
            lambda: self._import(
                frames(), metadata=tuple(metadata), timeout=self.transfer_timeout_s
            ),
        )
        return int(response.tensors)


class _RemoteBodyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, mask: torch.Tensor, anchor: torch.Tensor, body: RemoteBody
    ) -> torch.Tensor:
        key = body.next_key()
        ctx.body, ctx.key = body, key
        output = body.stream.forward(key[0], key[1], hidden.detach(), mask, train=True)
        return output.to(hidden.device, hidden.dtype)  # where the head put h1 (a GPU)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        step, micro = ctx.key
        grad_in = ctx.body.stream.backward(step, micro, grad.contiguous())
        return grad_in.to(grad.device, grad.dtype), None, None, None


class RemoteBody(nn.Module):
    """The backbone's body as a module: ``forward(h1, mask) -> h2`` over the training
    stream, and its backward sends dL/dh2 and returns dL/dh1, so an ordinary PyTorch
    loop trains head, body and tail together.

    Call :meth:`begin_step` before the micro-batches of each optimizer step. In eval
    mode, or under ``torch.no_grad()``, forward passes keep no state on the backbone.
    """

    def __init__(self, stream: TrainStream) -> None:
        super().__init__()
        self.stream = stream
        self.step = 1
        self.micro = 0
        # Makes the output require grad even when the head has nothing to train, so the
        # backbone always receives dL/dh2 for its own adapter.
        self.anchor = torch.zeros((), requires_grad=True)

    def begin_step(self, step: int) -> None:
        self.step, self.micro = step, 0

    def next_key(self) -> tuple[int, int]:
        key = (self.step, self.micro)
        self.micro += 1
        return key

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            output: torch.Tensor = _RemoteBodyFunction.apply(  # type: ignore[no-untyped-call]
                hidden, attention_mask, self.anchor, self
            )
            return output
        result = self.stream.forward(self.step, 0, hidden.detach(), attention_mask, train=False)
        return result.to(hidden.device, hidden.dtype)


class RemoteBodyStage:
    """The body of :class:`~splitfed.models.generation.SplitGenerator`, on the backbone.

    It keeps what it sent since the last :meth:`reset` (the prompt's h1 and mask, each
    token's h1, the latest mask: the very values that went out, after any perturbation
    above it). When the stream is lost and ``reconnect`` is given (it reopens the session,
    waiting out a restarting backbone, and returns a fresh stream), the backbone's KV
    cache is rebuilt: RESET, the prompt as it was sent, the tokens so far in one forward,
    then the lost step again; the caller sees only a slower step."""

    def __init__(
        self,
        stream: GenerateStream,
        reconnect: Callable[[], GenerateStream] | None = None,
        *,
        max_recoveries: int = MAX_RECOVERIES,
    ) -> None:
        self.stream = stream
        self.reconnect = reconnect
        self.max_recoveries = max_recoveries
        self.recoveries = 0  # the cache rebuilds so far (for tests and logs)
        self._prompt: tuple[torch.Tensor, torch.Tensor] | None = None
        self._tokens: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        sent = hidden.detach()
        try:
            output = self.stream.forward(sent, attention_mask)
        except StreamLostError as exc:
            if self.reconnect is None:
                raise
            output = self._recover(exc, sent, attention_mask)
        if self._prompt is None:
            self._prompt = (sent, attention_mask)
        else:
            self._tokens.append(sent)
            self._mask = attention_mask
        return output.to(hidden.device, hidden.dtype)

    def reset(self) -> None:
        self._prompt, self._tokens, self._mask = None, [], None
        try:
            self.stream.reset()
        except StreamLostError:
            if self.reconnect is None:
                raise
            self.stream = self.reconnect()
            self.stream.reset()

    def _recover(
        self, lost: StreamLostError, hidden: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Reconnect, rebuild the backbone's cache from what was sent, redo the step."""
        assert self.reconnect is not None
        for _ in range(self.max_recoveries):
            replay = mask.shape[1] - hidden.shape[1]  # the positions the cache held
            logger.warning("[generate] %s; reconnecting to replay %d positions", lost, replay)
            self.stream = self.reconnect()  # waits out a restart; raises if it gives up
            self.recoveries += 1
            try:
                self.stream.reset()
                if self._prompt is not None:
                    self.stream.forward(*self._prompt)
                if self._tokens:
                    assert self._mask is not None
                    self.stream.forward(torch.cat(self._tokens, dim=1), self._mask)
                return self.stream.forward(hidden, mask)
            except StreamLostError as exc:
                lost = exc
        raise lost


# Keys are fetched and rotated in the middle of training: a key manager that is restarting
# is waited out (about as long as the trainer waits for a restarting backbone) rather than
# failing the step after one call's retries.
KEYMANAGER_WAIT = RetryPolicy(max_attempts=60, initial_backoff_s=0.2, max_backoff_s=2.0)


def client_crypto(
    keymanager: KeyManagerClient, session_id: str, wait: RetryPolicy = KEYMANAGER_WAIT
) -> SessionCrypto:
    """The client's sealing state for an encrypted session: keys from the key manager."""

    def fetch(key_id: int) -> DataKey:
        grant = call_with_retry(
            lambda: keymanager.session_key(session_id, key_id),
            wait,
            what="KeyManager.GetSessionKey (waiting for the key manager)",
        )
        return DataKey(grant.key_id, grant.secret, grant.nonce_prefix)

    return SessionCrypto(session_id, TO_BACKBONE, fetch)


def rotate_session_key(
    keymanager: KeyManagerClient, crypto: SessionCrypto, wait: RetryPolicy = KEYMANAGER_WAIT
) -> int:
    """Ask the key manager for the session's next key and seal under it from now on
    (between steps); the backbone follows when it sees the new key id. (A rotation whose
    answer was lost is asked again: that key id is skipped, never used.)"""
    grant = call_with_retry(
        lambda: keymanager.rotate_session_key(crypto.session_id),
        wait,
        what="KeyManager.RotateSessionKey (waiting for the key manager)",
    )
    crypto.rotate_to(DataKey(grant.key_id, grant.secret, grant.nonce_prefix))
    return grant.key_id
