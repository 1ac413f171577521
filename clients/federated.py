"""Client side of splitfed.v1.Aggregator: the calls, and :class:`FederatedTrainer`, which
runs a :class:`~splitfed.clients.trainer.SplitTrainer` through a federation's rounds.

A federation's global adapter at version v is the seeded initial adapter (every party
builds the same one from the federation's ``adapter_seed``) plus the offset the
aggregator holds. Each round a selected client loads version v, trains ``local_steps``
steps, and uploads its delta (trained minus version v) with its sample count; with secure
aggregation the delta is fixed-point encoded and masked first (:mod:`.secagg`). In a
DP-FedAvg federation with secure aggregation (the plan carries a clip norm) the client
clips its delta, adds the noise the plan names and weighs it 1 before masking
(:mod:`splitfed.security.dp_fedavg`); in plain rounds the aggregator does both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from splitfed.errors import AbortedError, FailedPreconditionError, error_from_rpc
from splitfed.failures import Endpoint, call_failure
from splitfed.logs import log_context
from splitfed.models.adapters import save_adapter
from splitfed.models.schema import schema_digest, schema_of
from splitfed.protocol.aggregator import (
    DOWNLOAD_RESPONSE,
    SERVICE,
    UPLOAD_REQUEST,
    Phase,
    RoundPlan,
)
from splitfed.retry import DEFAULT_RETRY, RetryPolicy, call_with_retry, is_retryable
from splitfed.v1 import aggregator_pb2, aggregator_pb2_grpc
from splitfed.wire import ChunkView, OutgoingFrame, TensorLimits, iter_frames, iter_tensors

logger = logging.getLogger(__name__)

LIMITS = TensorLimits(max_tensor_bytes=8 << 30, max_rank=4)


def _mapped(err: grpc.RpcError, endpoint: Endpoint | None = None) -> Exception:
    """The error to raise for a failed call: a connection or TLS failure explained (see
    :mod:`splitfed.failures`; still a :class:`grpc.RpcError` with the call's code), a
    status with a splitfed error, else the call's own error."""
    failure = call_failure(err, endpoint)
    if failure is not None:
        return failure
    mapped = error_from_rpc(err)
    return mapped if mapped is not None else err


# Uploads go in chunks of 1 MiB: the aggregator holds a received message or two per
# upload in flight, so smaller messages keep its memory flat (docs/benchmarks.md).
UPLOAD_CHUNK_BYTES = 1 << 20


class AggregatorClient:
    def __init__(
        self,
        channel: grpc.Channel,
        *,
        chunk_bytes: int = UPLOAD_CHUNK_BYTES,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout_s: float = 60.0,
        transfer_timeout_s: float = 600.0,
        endpoint: Endpoint | None = None,
    ) -> None:
        self._stub = aggregator_pb2_grpc.AggregatorStub(channel)
        # The other end, as the error messages name it (None: the raw gRPC details).
        self.endpoint = endpoint
        self._upload = channel.stream_unary(
            f"/{SERVICE.full_name}/UploadUpdate",
            request_serializer=UPLOAD_REQUEST.serialize,
            response_deserializer=aggregator_pb2.UploadUpdateResponse.FromString,
        )
        self._download = channel.unary_stream(
            f"/{SERVICE.full_name}/DownloadGlobal",
            request_serializer=aggregator_pb2.DownloadGlobalRequest.SerializeToString,
            response_deserializer=DOWNLOAD_RESPONSE.parse,
        )
        self.chunk_bytes = chunk_bytes
        self.retry = retry
        self.timeout_s = timeout_s
        # Uploads and downloads of updates: their bytes over the slowest link we serve.
        self.transfer_timeout_s = transfer_timeout_s

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call_with_retry(call, self.retry, what=what)
        except grpc.RpcError as err:
            raise _mapped(err, self.endpoint) from None

    def join(self, federation: str, num_samples: int, join_token: str = "") -> RoundPlan:
        """Join as a member with a dataset of ``num_samples`` examples (no update may claim
        more); ``join_token`` if the federation's config does not list this identity."""
        request = aggregator_pb2.JoinRequest(
            federation=federation, num_samples=num_samples, join_token=join_token
        )
        response = self._call(
            "Aggregator.Join", lambda: self._stub.Join(request, timeout=self.timeout_s)
        )
        return RoundPlan.from_proto(response.plan)

    def plan(self, federation: str) -> RoundPlan:
        request = aggregator_pb2.GetRoundPlanRequest(federation=federation)
        response = self._call(
            "Aggregator.GetRoundPlan",
            lambda: self._stub.GetRoundPlan(request, timeout=self.timeout_s),
        )
        return RoundPlan.from_proto(response.plan)

    def advertise_key(self, plan: RoundPlan, public_key: bytes) -> None:
        request = aggregator_pb2.AdvertiseKeyRequest(
            federation=plan.federation,
            round=plan.round,
            attempt=plan.attempt,
            public_key=public_key,
        )
        self._call(
            "Aggregator.AdvertiseKey",
            lambda: self._stub.AdvertiseKey(request, timeout=self.timeout_s),
        )

    def reveal(self, plan: RoundPlan, seeds: Mapping[str, bytes]) -> None:
        request = aggregator_pb2.RevealSeedsRequest(
            federation=plan.federation, round=plan.round, attempt=plan.attempt, seeds=seeds
        )
        self._call(
            "Aggregator.RevealSeeds",
            lambda: self._stub.RevealSeeds(request, timeout=self.timeout_s),
        )

    def upload(
        self,
        plan: RoundPlan,
        num_samples: int,
        tensors: Mapping[str, torch.Tensor],
        *,
        backbone: str = "",
        backbone_session: str = "",
    ) -> aggregator_pb2.UploadUpdateResponse:
        """Upload ``tensors`` (deltas, or masked fixed point) for ``plan``'s round."""

        def frames() -> Iterator[OutgoingFrame]:
            first = True
            for name in sorted(tensors):
                for frame in iter_frames(
                    tensors[name], name, UPLOAD_REQUEST, chunk_bytes=self.chunk_bytes
                ):
                    if first:
                        message = frame.message
                        message.federation = plan.federation  # type: ignore[attr-defined]
                        message.round = plan.round  # type: ignore[attr-defined]
                        message.attempt = plan.attempt  # type: ignore[attr-defined]
                        message.base_version = plan.global_version  # type: ignore[attr-defined]
                        message.num_samples = num_samples  # type: ignore[attr-defined]
                        message.backbone = backbone  # type: ignore[attr-defined]
                        message.backbone_session = backbone_session  # type: ignore[attr-defined]
                        first = False
                    yield frame

        response: aggregator_pb2.UploadUpdateResponse = self._call(
            "Aggregator.UploadUpdate",
            lambda: self._upload(frames(), timeout=self.transfer_timeout_s),
        )
        return response

    def download(
        self, federation: str, version: int = 0, *, body: bool = False
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """The global offset at ``version`` (0: the latest) and its version number; with
        ``body``, the average body adapter of that version instead (server-side adapters;
        empty if there is none)."""

        def call() -> tuple[int, dict[str, torch.Tensor]]:
            request = aggregator_pb2.DownloadGlobalRequest(
                federation=federation, version=version, body=body
            )
            got = version

            def chunks() -> Iterator[ChunkView]:
                nonlocal got
                for frame in self._download(request, timeout=self.transfer_timeout_s):
                    got = frame.message.version
                    if frame.message.HasField("chunk"):
                        yield frame.chunk_view()

            tensors = {done.name: done.tensor for done in iter_tensors(chunks(), LIMITS)}
            return got, tensors

        result: tuple[int, dict[str, torch.Tensor]] = self._call("Aggregator.DownloadGlobal", call)
        return result

    def wait_for_change(self, plan: RoundPlan, timeout_s: float = 60.0) -> RoundPlan:
        """Block until the federation's round, attempt, phase or version moves on."""
        key = plan.key()
        call = self._stub.WatchRound(
            aggregator_pb2.WatchRoundRequest(federation=plan.federation), timeout=timeout_s
        )
        try:
            for status in call:
                plan = RoundPlan.from_proto(status.plan)
                if plan.key() != key:
                    return plan
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise _mapped(err, self.endpoint) from None
        finally:
            call.cancel()
        return self.plan(plan.federation)


@dataclass
class _LocalRound:
    """A round's local training: from ``base`` (the global ``version``), its losses so far,
    and its update once done."""

    round: int
    version: int
    base: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    delta: dict[str, torch.Tensor] | None = None
    # With secure aggregation: (attempt, the delta masked for that attempt's peers).
    masked: tuple[int, dict[str, torch.Tensor]] | None = None
    # DP-FedAvg with secure aggregation: ((clip norm, noise std), the delta clipped and
    # noised with them), drawn once: a retried attempt sends the same noised update.
    private: tuple[tuple[float, float], dict[str, torch.Tensor]] | None = None


@dataclass
class RoundReport:
    round: int
    version: int
    losses: list[float]
    uploaded: bool


@dataclass(eq=False)
class FederatedTrainer:
    """Runs ``trainer`` (already constructed, not started from a checkpoint) through the
    rounds of ``federation``: load the global version, train, upload the delta."""

    trainer: Any
    aggregator: AggregatorClient
    federation: str
    _: KW_ONLY
    # This client's certificate name (secure aggregation names peers so).
    identity: str = ""
    # Where to keep a copy of every update this client sends (its own audit trail).
    record_dir: Path | None = None
    # The backbone address as the federation knows it (server-side adapters).
    backbone: str = ""
    join_token: str = ""
    # Version 0: what the adapter settings' seed initialised (before any training).
    initial: dict[str, torch.Tensor] = field(init=False, repr=False)
    version: int = field(default=0, init=False)
    samples: int = field(init=False)
    _participant: Any = field(default=None, init=False, repr=False)
    _participant_round: tuple[int, int] | None = field(default=None, init=False, repr=False)
    # The (round, attempt) whose key the aggregator confirmed.
    _advertised: tuple[int, int] | None = field(default=None, init=False, repr=False)
    # This round's local training: resumed, never started over, if a call fails (the
    # aggregator or the key manager restarting); its update is sent again if its upload
    # fails or the round's attempt is retried on the same base version.
    _local: _LocalRound | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.initial = {k: v.detach().clone() for k, v in self.trainer.adapter_tensors().items()}
        self.samples = len(self.trainer.data.encoded)

    def _load_version(self, version: int) -> dict[str, torch.Tensor]:
        """Set the trainer's adapter to the global ``version``; returns its values."""
        got, offset = self.aggregator.download(self.federation, version)
        missing = set(offset) - set(self.initial)
        if missing:
            raise ValueError(
                f"the global adapter has tensors this client lacks: {sorted(missing)[:3]}"
            )
        values = {
            n: t + offset[n].to(t.dtype) if n in offset else t.clone()
            for n, t in self.initial.items()
        }
        self.trainer.load_adapter_tensors(values)
        self.version = got
        self._load_body(got)
        return values

    def _load_body(self, version: int) -> None:
        """Server-side adapters: put the body average of ``version`` into this client's
        own backbone session (the aggregator pushes it only into the sessions of the
        round's contributors; a member that sat a round out catches up here)."""
        session = getattr(self.trainer, "session", None)
        if not self.backbone or version == 0 or session is None:
            return
        _, body = self.aggregator.download(self.federation, version, body=True)
        if body:
            crypto = getattr(self.trainer, "crypto", None)  # an encrypted session's keys
            self.trainer.client.import_adapter(session.session_id, body, crypto)

    def run(
        self,
        *,
        on_round: Callable[[RoundReport], None] | None = None,
        max_wait_s: float = 3600.0,
    ) -> list[RoundReport]:
        deadline = time.monotonic() + max_wait_s
        plan = self._when_back(
            lambda: self.aggregator.join(self.federation, self.samples, self.join_token),
            deadline,
        )
        own = schema_digest(schema_of(self.initial))
        if plan.schema_digest and plan.schema_digest != own:
            raise ValueError(
                f"this client's adapter (its tensors' names and shapes) differs from the "
                f"schema of federation {self.federation!r}: check [adapter] (kind, r, "
                "target_modules) and [training] k and m against the federation's, or write "
                "the schema with `splitfed adapters schema` and compare"
            )
        if plan.adapter_seed != self.trainer.adapter.seed:
            raise ValueError(
                f"federation {self.federation!r} initialises adapters from seed "
                f"{plan.adapter_seed}; this client's [adapter] seed is {self.trainer.adapter.seed}"
            )
        if self.trainer.session is None:
            self._plan_schedule(plan)
            self.trainer.start(wait=True)  # a backbone restarting now is waited out
        reports: list[RoundReport] = []
        while plan.phase != Phase.FINISHED:
            if time.monotonic() > deadline:
                raise TimeoutError(f"federation {self.federation!r} did not finish in time")
            try:
                session = self.trainer.session.session_id if self.trainer.session else ""
                with log_context(federation=self.federation, round=plan.round, session=session):
                    acted = self._act(plan, reports, on_round)
                plan = (
                    self.aggregator.plan(self.federation)
                    if acted
                    else self.aggregator.wait_for_change(plan, timeout_s=10.0)
                )
            except grpc.RpcError as err:
                if not is_retryable(err):  # a TLS failure waits for nothing
                    raise
                # The aggregator is restarting: its state is durable, ask again.
                logger.warning(
                    "[FederatedTrainer] aggregator unavailable (%s); retrying", err.code()
                )
                time.sleep(1.0)
                plan = self._when_back(lambda: self.aggregator.plan(self.federation), deadline)
        self._load_version(0)
        return reports

    def _plan_schedule(self, plan: RoundPlan) -> None:
        """A learning-rate schedule left without a length ([optimizer] total_steps 0)
        spans the federation: its rounds x local_steps (the steps this member trains if
        it is selected in every round). An explicit total_steps wins."""
        settings = getattr(self.trainer, "optimizer_settings", None)
        if settings is None or not settings.open_length:
            return
        if not plan.rounds:
            raise ValueError(
                f"federation {self.federation!r} has no round limit, so schedule "
                f"{settings.schedule!r} has no length: set [optimizer] total_steps"
            )
        total = plan.rounds * plan.local_steps
        try:
            self.trainer.set_schedule_length(total)
        except ValueError as exc:
            raise ValueError(
                f"federation {self.federation!r} runs {plan.rounds} rounds x "
                f"{plan.local_steps} local steps = {total} steps: {exc}; set [optimizer] "
                "total_steps or fewer warmup_steps"
            ) from None
        logger.info(
            "[FederatedTrainer] %s schedule over %d steps (%d rounds x %d local steps)",
            settings.schedule,
            total,
            plan.rounds,
            plan.local_steps,
        )

    def _when_back(self, call: Callable[[], RoundPlan], deadline: float) -> RoundPlan:
        """``call``, repeated while the aggregator is unavailable (restarting), until
        ``deadline``."""
        while True:
            try:
                return call()
            except grpc.RpcError as err:
                if not is_retryable(err) or time.monotonic() > deadline:
                    raise
                logger.warning(
                    "[FederatedTrainer] aggregator unavailable (%s); retrying", err.code()
                )
                time.sleep(1.0)

    def _act(
        self,
        plan: RoundPlan,
        reports: list[RoundReport],
        on_round: Callable[[RoundReport], None] | None,
    ) -> bool:
        """Do what the plan asks of this client; False if there is nothing to do now."""
        phase = plan.phase
        if phase == Phase.KEYS and plan.selected:
            if self._advertised == (plan.round, plan.attempt):
                return False
            if self._participant_round != (plan.round, plan.attempt):
                from splitfed.security.secagg import Participant, SecAggParams

                params = SecAggParams(plan.federation, plan.round, scale=plan.secagg_scale)
                self._participant = Participant(self._identity(), params)
                self._participant_round = (plan.round, plan.attempt)
            # After a failed call (the aggregator restarting) the same key is sent again.
            self.aggregator.advertise_key(plan, self._participant.public_key)
            self._advertised = (plan.round, plan.attempt)
            return True
        if phase == Phase.UPLOAD and plan.selected and not plan.uploaded:
            if plan.secure_aggregation and self._participant_round != (plan.round, plan.attempt):
                return False  # no key in this attempt (joined late or restarted): wait
            local = self._local
            if local is None or (local.round, local.version) != (plan.round, plan.global_version):
                base = self._load_version(plan.global_version)
                local = self._local = _LocalRound(plan.round, plan.global_version, base)
            elif local.losses:
                logger.info(
                    "[FederatedTrainer] round %d: resuming after %d of %d local steps",
                    plan.round,
                    len(local.losses),
                    plan.local_steps,
                )
            while len(local.losses) < plan.local_steps:
                local.losses.append(self.trainer.train_step().loss)
            if local.delta is None:
                trained = self.trainer.adapter_tensors()
                local.delta = {n: (trained[n].detach() - local.base[n]).float() for n in local.base}
            delta, losses = local.delta, list(local.losses)
            weight = float(self.samples)
            if plan.secure_aggregation and plan.private:
                delta = self._privatized(local, plan)
                weight = 1.0  # DP-FedAvg weighs every update equally
            if plan.secure_aggregation:
                # Masked once per attempt (the masks' private key is gone after): an upload
                # that failed sends the same masked tensors again.
                if local.masked is None or local.masked[0] != plan.attempt:
                    self._participant.set_peers({p.identity: p.public_key for p in plan.peers})
                    masked = {
                        n: torch.from_numpy(
                            self._participant.encode_and_mask(n, d, weight)
                            .view("int64")
                            .reshape(d.shape)
                        )
                        for n, d in delta.items()
                    }
                    local.masked = (plan.attempt, masked)
                tensors = local.masked[1]
            else:
                tensors = delta
            if self.record_dir is not None:
                save_adapter(
                    self.record_dir / f"round{plan.round}-attempt{plan.attempt}.safetensors",
                    {n: d.contiguous() for n, d in delta.items()},
                    metadata={
                        "samples": str(self.samples),
                        "base": str(plan.global_version),
                        # The trainer's steps so far: who trained a round twice shows here.
                        "steps": str(self.trainer.step),
                        # What the update was trained against (models/identity.py).
                        **self.trainer.trained_against().metadata(),
                    },
                )
            session = self.trainer.session.session_id if self.trainer.session else ""
            try:
                response = self.aggregator.upload(
                    plan, self.samples, tensors, backbone=self.backbone, backbone_session=session
                )
            except (AbortedError, FailedPreconditionError) as exc:
                # The round moved on while this client trained (a deadline, a retried
                # attempt): nothing of this update counts; the next plan says what to do.
                logger.warning(
                    "[FederatedTrainer] round %d: upload not counted: %s", plan.round, exc
                )
                return True
            logger.info(
                "[FederatedTrainer] round %d: uploaded (%d received so far%s)",
                plan.round,
                response.received,
                ", duplicate" if response.duplicate else "",
            )
            report = RoundReport(plan.round, plan.global_version, losses, True)
            reports.append(report)
            if on_round is not None:
                on_round(report)
            return True
        if phase == Phase.REVEAL and plan.uploaded and plan.dropped:
            if self._participant is None or self._participant_round != (plan.round, plan.attempt):
                return False
            self.aggregator.reveal(plan, self._participant.reveal(plan.dropped))
            self._participant_round = None  # revealed once
            return True
        return False

    @staticmethod
    def _privatized(local: _LocalRound, plan: RoundPlan) -> dict[str, torch.Tensor]:
        """DP-FedAvg with secure aggregation: the round's delta clipped to the plan's clip
        norm and noised with its client noise, once per (round, base version)."""
        from splitfed.security.dp_fedavg import privatize_update

        assert local.delta is not None
        params = (plan.dp_clip_norm, plan.dp_client_noise_std)
        if local.private is None or local.private[0] != params:
            local.private = (params, privatize_update(local.delta, *params))
            local.masked = None
            logger.info(
                "[FederatedTrainer] round %d: DP-FedAvg: update clipped to norm %g, noise "
                "std %g added per coordinate",
                plan.round,
                *params,
            )
        return local.private[1]

    def _identity(self) -> str:
        if not self.identity:
            raise ValueError(
                "secure aggregation needs the client's identity (its certificate name)"
            )
        return self.identity
