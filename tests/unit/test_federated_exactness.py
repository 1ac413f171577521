"""FedAvg through ``FederatedTrainer`` and the aggregator's ``Federation`` is exact: with
one local step of plain SGD (no clipping, no momentum), a round moves the global adapter
by exactly one SGD step on the clients' losses weighted by their sample counts, i.e. one
centralized step on the union. Clients run in threads against an in-process federation
(no gRPC), so this checks what the client uploads (trained minus the version it loaded)
and how the global version is rebuilt from the offset, not the transport."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from splitfed.clients.federated import FederatedTrainer
from splitfed.protocol.aggregator import RoundPlan
from splitfed.services.aggregator.federation import Federation
from splitfed.services.aggregator.settings import FederationSettings
from splitfed.v1 import aggregator_pb2

NAMES = ("blocks.0.q.lora_A.weight", "blocks.0.q.lora_B.weight")
SHAPES = {NAMES[0]: (2, 3), NAMES[1]: (3, 2)}
LR = 0.1
SIZES = (3, 5, 8, 16)


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)  # the "adapter seed": every party builds the same
    return {n: torch.randn(shape, generator=g, dtype=torch.float64) for n, shape in SHAPES.items()}


def client_data(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + index)
    x = torch.randn(SIZES[index], 3, generator=g, dtype=torch.float64)
    y = torch.randn(SIZES[index], 3, generator=g, dtype=torch.float64) + index  # non-IID
    return x, y


def loss(tensors: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A LoRA-shaped product B @ A, fitted by mean squared error over the client's data."""
    prediction = x @ (tensors[NAMES[1]] @ tensors[NAMES[0]]).T
    return ((prediction - y) ** 2).mean()


@dataclass
class _Report:
    loss: float


@dataclass
class _Seed:
    seed: int = 7


class SGDTrainer:
    """The part of ``SplitTrainer`` that ``FederatedTrainer`` uses: plain SGD, full batch."""

    def __init__(self, index: int) -> None:
        self.x, self.y = client_data(index)
        self.params = {n: t.clone().requires_grad_() for n, t in initial().items()}
        self.data = type("Data", (), {"encoded": list(range(SIZES[index]))})()
        self.adapter = _Seed()
        self.session: Any = None

    def start(self, wait: bool = False) -> None:
        self.session = type("Session", (), {"session_id": ""})()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.params.items()}

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[n])

    def train_step(self) -> _Report:
        value = loss(self.params, self.x, self.y)
        grads = torch.autograd.grad(value, list(self.params.values()))
        with torch.no_grad():
            for p, g in zip(self.params.values(), grads, strict=True):
                p.sub_(LR * g)
        return _Report(float(value.detach()))


class InProcessAggregator:
    """``AggregatorClient``'s calls, answered by a ``Federation`` in this process."""

    def __init__(self, federation: Federation, identity: str) -> None:
        self.federation = federation
        self.identity = identity

    def join(self, name: str, num_samples: int, join_token: str = "") -> RoundPlan:
        self.federation.join(self.identity, num_samples, join_token)
        return self.plan(name)

    def plan(self, name: str) -> RoundPlan:
        return self.federation.plan(self.identity).plan

    def advertise_key(self, plan: RoundPlan, public_key: bytes) -> None:
        self.federation.advertise_key(self.identity, plan.round, plan.attempt, public_key)

    def reveal(self, plan: RoundPlan, seeds: dict[str, bytes]) -> None:
        self.federation.reveal(self.identity, plan.round, plan.attempt, seeds)

    def download(self, name: str, version: int = 0) -> tuple[int, dict[str, torch.Tensor]]:
        version = version or self.federation.state.version
        return version, self.federation.offset(version)

    def upload(
        self, plan: RoundPlan, num_samples: int, tensors: dict[str, Any], **_: Any
    ) -> aggregator_pb2.UploadUpdateResponse:
        fed = self.federation
        upload = fed.begin_upload(
            self.identity, plan.round, plan.attempt, plan.global_version, num_samples
        )
        assert upload is not None
        try:
            for name, tensor in tensors.items():
                upload.write(name, tensor)
            duplicate, received = fed.commit_upload(upload)
        finally:
            fed.end_upload(upload)
        return aggregator_pb2.UploadUpdateResponse(duplicate=duplicate, received=received)

    def wait_for_change(self, plan: RoundPlan, timeout_s: float = 60.0) -> RoundPlan:
        seen = self.federation.wait_for_change(None, 0)
        current = self.plan(plan.federation)
        key = (plan.round, plan.attempt, plan.phase, plan.global_version)
        if (current.round, current.attempt, current.phase, current.global_version) == key:
            self.federation.wait_for_change(seen, min(timeout_s, 0.5))
            current = self.plan(plan.federation)
        return current


def test_one_local_sgd_step_per_round_is_one_centralized_step_on_the_union(
    tmp_path: Path,
) -> None:
    rounds = 3
    settings = FederationSettings(
        name="fed",
        rounds=rounds,
        min_clients=4,
        local_steps=1,
        adapter_seed=7,
        deadline_s=60,
        members=tuple(f"c{i}" for i in range(len(SIZES))),
        schema={n: list(t.shape) for n, t in initial().items()},
    )
    federation = Federation(settings, tmp_path / "fed")
    trainers = [SGDTrainer(i) for i in range(len(SIZES))]
    members = [
        FederatedTrainer(t, InProcessAggregator(federation, f"c{i}"), "fed")  # type: ignore[arg-type]
        for i, t in enumerate(trainers)
    ]
    errors: list[BaseException] = []

    def run(member: FederatedTrainer) -> None:
        try:
            member.run(max_wait_s=60)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m,)) for m in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert federation.state.version == rounds

    # Centralized: one SGD step per round on sum_i (n_i / N) * loss_i.
    weights = [n / sum(SIZES) for n in SIZES]
    data = [client_data(i) for i in range(len(SIZES))]
    expected = {n: t.clone().requires_grad_() for n, t in initial().items()}
    for _ in range(rounds):
        union = sum(w * loss(expected, x, y) for w, (x, y) in zip(weights, data, strict=True))
        grads = torch.autograd.grad(union, list(expected.values()))
        with torch.no_grad():
            for p, g in zip(expected.values(), grads, strict=True):
                p.sub_(LR * g)
    start = initial()
    offset = federation.offset(rounds)
    for name, value in expected.items():
        # The aggregator keeps float32 offsets: exact up to float32 rounding.
        torch.testing.assert_close(
            start[name] + offset[name].double(), value.detach(), atol=1e-6, rtol=1e-5
        )
        for trainer in trainers:  # every client ends on the latest global version
            torch.testing.assert_close(
                trainer.params[name].detach(), start[name] + offset[name].double()
            )


# --- an aggregator that restarts (found by `make chaos`, tests/chaos_kit.py) -------------


class Unavailable(grpc.RpcError):
    """What a call to an aggregator that is down raises once its retries are spent."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused (the aggregator is restarting)"


class RestartingAggregator(InProcessAggregator):
    """Fails the first ``fail`` calls of ``method`` with UNAVAILABLE, before they reach
    the federation (an aggregator that is down: nothing of the call was counted)."""

    def __init__(self, federation: Federation, identity: str, method: str, fail: int) -> None:
        super().__init__(federation, identity)
        self.method, self.fail = method, fail

    def _maybe_fail(self, method: str) -> None:
        if method == self.method and self.fail > 0:
            self.fail -= 1
            raise Unavailable()

    def join(self, name: str, num_samples: int, join_token: str = "") -> RoundPlan:
        self._maybe_fail("join")
        return super().join(name, num_samples, join_token)

    def upload(
        self, plan: RoundPlan, num_samples: int, tensors: dict[str, Any], **_: Any
    ) -> aggregator_pb2.UploadUpdateResponse:
        self._maybe_fail("upload")
        return super().upload(plan, num_samples, tensors)

    def advertise_key(self, plan: RoundPlan, public_key: bytes) -> None:
        self._maybe_fail("advertise_key")
        super().advertise_key(plan, public_key)


class CountingTrainer(SGDTrainer):
    """Counts the steps it trains; ``fail_at``: the step whose first try fails before it
    starts, as a step does whose key rotation finds the key manager down."""

    def __init__(self, index: int, fail_at: int = 0) -> None:
        super().__init__(index)
        self.steps, self.fail_at = 0, fail_at

    def train_step(self) -> _Report:
        if self.steps + 1 == self.fail_at:
            self.fail_at = 0
            raise Unavailable()
        self.steps += 1
        return super().train_step()


@pytest.mark.parametrize(
    ("method", "secure"),
    [
        *[(method, False) for method in ("join", "upload", "train_step")],
        *[(method, True) for method in ("upload", "train_step", "advertise_key")],
    ],
)
def test_a_client_waits_out_a_restart_and_trains_each_round_once(
    tmp_path: Path, method: str, secure: bool
) -> None:
    """The aggregator is down when a client joins, or when it uploads its first update
    (after its call's own retries), or a service is down mid-round, or (secure aggregation)
    when it sends its key: the client waits for it, sends its key again, resumes the
    round's local steps, sends the update it already trained, and never
    trains a round twice (which would move its optimizer, data order and backbone adapter
    on, and spend privacy budget, for nothing). With secure aggregation it sends the same
    masked update again (its masks' private key is gone once they are derived)."""
    rounds, local_steps = 2, 2
    settings = FederationSettings(
        name="fed",
        rounds=rounds,
        min_clients=2,
        local_steps=local_steps,
        adapter_seed=7,
        deadline_s=60,
        members=("c0", "c1"),
        schema={n: list(t.shape) for n, t in initial().items()},
        secure_aggregation=secure,
    )
    federation = Federation(settings, tmp_path / "fed")
    # The second local step of round 1 fails once (with method "train_step").
    trainers = [CountingTrainer(0, 2 if method == "train_step" else 0), CountingTrainer(1)]
    aggregators = [
        RestartingAggregator(federation, "c0", method, fail=2),
        InProcessAggregator(federation, "c1"),
    ]
    members = [
        FederatedTrainer(t, a, "fed", identity=a.identity)  # type: ignore[arg-type]
        for t, a in zip(trainers, aggregators, strict=True)
    ]
    errors: list[BaseException] = []

    def run(member: FederatedTrainer) -> None:
        try:
            member.run(max_wait_s=60)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m,)) for m in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert aggregators[0].fail == 0 or method == "train_step"  # the failures happened
    assert trainers[0].fail_at == 0
    assert federation.state.version == rounds
    assert [t.steps for t in trainers] == [rounds * local_steps] * 2
