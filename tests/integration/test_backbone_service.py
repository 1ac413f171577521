"""The backbone service over real mTLS: generation, ownership, limits, expiry, faults,
many clients at once.

One module of some 700 lines: its tests share one backbone process per module (the
expensive part), which a split by topic would start several times."""

from __future__ import annotations

import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from backbone_kit import Centralized, Deployment, deployment
from helpers import wait_until
from transformers import AutoModelForCausalLM

from splitfed.clients.backbone import (
    BackboneClient,
    GenerateStream,
    RemoteBodyStage,
    TrainStream,
)
from splitfed.clients.diagnostics import DiagnosticsClient
from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.errors import (
    InvalidArgumentError,
    LimitExceededError,
    PermissionDeniedError,
)
from splitfed.models.adapters import AdapterSettings
from splitfed.models.generation import SamplingOptions, SplitGenerator
from splitfed.models.loading import load_part
from splitfed.models.optim import OptimizerSettings
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.protocol.backbone import SESSION_METADATA, SessionRequest
from splitfed.services.backbone.adapters_io import SHARED_ADAPTER
from splitfed.services.backbone.settings import BackboneSettings
from splitfed.v1 import (
    backbone_pb2,
    backbone_pb2_grpc,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    tensor_pb2,
)
from splitfed.wire import MiB

LORA = AdapterSettings(kind="lora", r=4, alpha=8, seed=3)
OPTIMIZER = OptimizerSettings(learning_rate=5e-3)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = deployment(tmp_path_factory.mktemp("service"), idle_timeout_s=600.0)
    dep.start()
    yield dep
    dep.stop()


def open_lora(client: BackboneClient, k: int = 1, m: int = 1) -> str:
    request = SessionRequest(k=k, m=m, adapter=LORA)
    return client.open_session(request).session_id


def test_split_generation_over_grpc_equals_generate(backbone: Deployment) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        str(backbone.model_path), local_files_only=True
    ).eval()
    ids = torch.tensor([[0, 0, 0, 5, 17, 42, 9, 11], [3, 8, 13, 21, 34, 55, 89, 7]])
    mask = (torch.arange(8) >= torch.tensor([[3], [0]])).long()
    expected = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[:, ids.shape[1] :]
    channel, client = backbone.connect()
    with channel:
        session = open_lora(client, k=2, m=1)
        head = load_part(backbone.model_path, "head", 2, 1)
        tail = load_part(backbone.model_path, "tail", 2, 1)
        stream = GenerateStream(client, session, "raw")
        got = SplitGenerator(head, RemoteBodyStage(stream), tail).generate(
            ids, mask, SamplingOptions(max_new_tokens=32)
        )
        assert stream.trim(4) == 4
        stream.close()
        client.close_session(session)
    # LoRA B starts at zero, so the untrained session's body is the base model's.
    assert torch.equal(got, expected)


def test_another_identity_cannot_use_a_session(backbone: Deployment) -> None:
    owner_channel, owner = backbone.connect("hospital-a")
    other_channel, other = backbone.connect("bank-b")
    with owner_channel, other_channel:
        session = open_lora(owner)
        with pytest.raises(PermissionDeniedError, match="or belongs to another identity"):
            other.open_session(SessionRequest(session_id=session))
        with pytest.raises(PermissionDeniedError):
            other.export_adapter(session)
        with pytest.raises(PermissionDeniedError):
            other.close_session(session)
        stream = TrainStream(other, session, "raw")
        with pytest.raises(PermissionDeniedError):
            stream.forward(1, 0, torch.zeros(1, 3, 64), torch.ones(1, 3))
        stream.close()
        # The owner still can.
        assert owner.open_session(SessionRequest(session_id=session)).resumed
        owner.close_session(session)
        with pytest.raises(PermissionDeniedError, match="does not exist"):
            owner.open_session(SessionRequest(session_id=session))


def test_streams_need_a_session_and_valid_frames(backbone: Deployment) -> None:
    channel, client = backbone.connect()
    with channel:
        stub = backbone_pb2_grpc.BackboneStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(iter([backbone_pb2.GenerateRequest()]), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        session = open_lora(client)
        stream = TrainStream(client, session, "raw")
        with pytest.raises(InvalidArgumentError, match=r"h1 must be \[batch, tokens, 64\]"):
            stream.forward(1, 0, torch.zeros(1, 3, 5), torch.ones(1, 3))
        stream.close()
        stream = TrainStream(client, session, "raw")
        with pytest.raises(InvalidArgumentError, match=r"attention mask must be \[1, 3\]"):
            stream.forward(1, 0, torch.zeros(1, 3, 64), torch.ones(1, 4))
        stream.close()
        client.close_session(session)
    metadata = ((SESSION_METADATA, "nope"),)
    channel, _ = backbone.connect()
    with channel:
        stub = backbone_pb2_grpc.BackboneStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Train(iter([backbone_pb2.TrainRequest()]), metadata=metadata, timeout=30))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_limits_answer_resource_exhausted(tmp_path: Path) -> None:
    dep = deployment(tmp_path, max_sessions=1, max_batch_size=2)
    dep.start()
    try:
        channel, client = dep.connect()
        with channel:
            session = open_lora(client)
            with pytest.raises(Exception, match="its limit"):
                open_lora(client)
            stream = TrainStream(client, session, "raw")
            with pytest.raises(Exception, match="batch of 3 exceeds the limit of 2"):
                stream.forward(1, 0, torch.zeros(3, 2, 64), torch.ones(3, 2))
            stream.close()
    finally:
        dep.stop()


def test_a_client_that_disappears_leaves_nothing_after_expiry(tmp_path: Path) -> None:
    dep = deployment(tmp_path, idle_timeout_s=1.0)
    dep.start()
    try:
        channel, client = dep.connect()
        with channel:
            settings = TrainSettings(
                data=BUNDLED_DATASET,
                model_path=dep.model_path,
                max_steps=1,
                batch_size=2,
                max_length=32,
            )
            trainer = SplitTrainer(client, settings, LORA, OPTIMIZER)
            trainer.run()
            session = trainer.session.session_id  # type: ignore[union-attr]
            assert (dep.root / "state" / session / "session.json").is_file()
        # The client vanishes without closing anything.
        assert wait_until(lambda: not (dep.root / "state" / session).exists(), timeout_s=30)
        channel, client = dep.connect()
        with channel, pytest.raises(PermissionDeniedError, match="closed, expired"):
            client.open_session(SessionRequest(session_id=session))
    finally:
        dep.stop()


# make test-long: the chaos sample in make test kills the backbone mid-training too.
@pytest.mark.slow
@pytest.mark.long
def test_backbone_killed_mid_training_resumes_with_the_same_result(tmp_path: Path) -> None:
    def run(dep: Deployment, kill_at: int | None) -> tuple[list[float], dict[str, torch.Tensor]]:
        channel, client = dep.connect()
        with channel:
            settings = TrainSettings(
                data=BUNDLED_DATASET,
                model_path=dep.model_path,
                max_steps=12,
                batch_size=2,
                accumulation=2,
                max_length=48,
                seed=4,
            )
            trainer = SplitTrainer(client, settings, LORA, OPTIMIZER)
            restarted = threading.Event()

            def on_step(report: object) -> None:
                if kill_at is not None and trainer.step == kill_at and not restarted.is_set():
                    assert dep.process is not None
                    os.kill(dep.process.pid, signal.SIGKILL)  # no goodbye, no checkpoint flush
                    dep.process.stop()

                    def restart() -> None:
                        dep.start()
                        restarted.set()

                    threading.Thread(target=restart, daemon=True).start()

            reports = trainer.run(on_step)
            adapter = {
                **trainer.adapter_tensors(),
                **client.export_adapter(trainer.session.session_id),
            }  # type: ignore[union-attr]
            if kill_at is not None:
                assert restarted.is_set() and sum(r.retries for r in reports) >= 1
            return [r.loss for r in reports], adapter

    first = deployment(tmp_path / "uninterrupted")
    first.start()
    try:
        expected_losses, expected = run(first, None)
    finally:
        first.stop()
    second = deployment(tmp_path / "killed")
    second.start()
    try:
        losses, adapter = run(second, kill_at=5)
    finally:
        second.stop()
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(expected_losses), atol=1e-5, rtol=0
    )
    for name, tensor in expected.items():
        torch.testing.assert_close(adapter[name], tensor, atol=1e-5, rtol=0, msg=name)


# make test-long: tests/integration/test_client_batch.py trains per-client sessions
# concurrently against their runs alone in make test.
@pytest.mark.slow
@pytest.mark.long
def test_eight_clients_train_concurrently_each_matching_its_centralized_run(tmp_path: Path) -> None:
    dep = deployment(tmp_path)
    dep.start()
    clients = 8
    results: dict[int, tuple[list[float], dict[str, torch.Tensor]]] = {}
    errors: list[BaseException] = []

    def train_settings(index: int) -> TrainSettings:
        return TrainSettings(
            data=BUNDLED_DATASET,
            model_path=dep.model_path,
            max_steps=20,
            batch_size=2,
            max_length=48,
            seed=100 + index,
        )

    def adapter(index: int) -> AdapterSettings:
        return AdapterSettings(kind="lora", r=4, alpha=8, seed=index)

    def one(index: int) -> None:
        try:
            channel, client = dep.connect(f"hospital-{index}")
            with channel:
                trainer = SplitTrainer(client, train_settings(index), adapter(index), OPTIMIZER)
                reports = trainer.run()
                tensors = {
                    **trainer.adapter_tensors(),
                    **client.export_adapter(trainer.session.session_id),  # type: ignore[union-attr]
                }
                results[index] = ([r.loss for r in reports], tensors)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
    finally:
        dep.stop()
    assert not errors, errors
    assert len(results) == clients
    names = sorted(results[0][1])
    body_name = next(n for n in names if ".layers.2." in n and "lora_A" in n)
    assert (
        len({tuple(results[i][1][body_name].flatten()[:8].tolist()) for i in range(clients)})
        == clients
    )
    for index in range(clients):
        reference = Centralized(dep, train_settings(index), adapter(index), OPTIMIZER)
        expected_losses = reference.run(20)
        losses, tensors = results[index]
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(expected_losses), atol=1e-4, rtol=0
        )
        for name, tensor in reference.final().items():
            torch.testing.assert_close(
                tensors[name], tensor, atol=1e-4, rtol=0, msg=f"{index} {name}"
            )


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_sessions_share_one_copy_of_the_base_weights(tmp_path: Path) -> None:
    """A body of ~75 MB; eight sessions with their own adapters add far less than a copy."""
    dep = deployment(tmp_path, hidden_size=512, layers=8)
    dep.start()
    try:
        assert dep.process is not None
        sessions = []
        channel, client = dep.connect()
        with channel:
            info = client.model_info()
            body_bytes = (info.num_layers - 2) * 4 * (4 * 512 * 512 + 3 * 512 * 1024)
            first = open_lora(client)
            warm = TrainStream(client, first, "raw")
            warm.forward(1, 0, torch.randn(2, 16, 512), torch.ones(2, 16), train=False)
            warm.close()
            before = rss_bytes(dep.process.pid)
            for _ in range(7):
                session = open_lora(client)
                stream = TrainStream(client, session, "raw")
                stream.forward(1, 0, torch.randn(2, 16, 512), torch.ones(2, 16), train=False)
                stream.close()
                sessions.append(session)
            after = rss_bytes(dep.process.pid)
    finally:
        dep.stop()
    growth = after - before
    print(
        f"body weights {body_bytes / 2**20:.0f} MiB; backbone RSS {before / 2**20:.0f} MiB with "
        f"1 session, {after / 2**20:.0f} MiB with 8 (+{growth / 2**20:.0f} MiB)"
    )
    assert growth < body_bytes  # seven more copies would add 7x


def test_shared_adapter_mode_trains_one_adapter_that_only_admins_replace_or_read(
    tmp_path: Path,
) -> None:
    """Shared mode: every session trains one adapter. Issue 15, item 7: a client can
    neither replace it (ImportAdapter on its own session) nor read it (ExportAdapter,
    off by default); an admin addresses it as session "shared", finite tensors only."""
    dep = deployment(tmp_path, adapter_mode="shared")
    dep.start()
    try:
        admin_channel, admin = dep.connect("operator", role="admin")
        exports = []
        for identity in ("hospital-a", "bank-b"):
            channel, client = dep.connect(identity)
            with channel:
                settings = TrainSettings(
                    data=BUNDLED_DATASET,
                    model_path=dep.model_path,
                    max_steps=2,
                    batch_size=2,
                    max_length=32,
                )
                trainer = SplitTrainer(client, settings, LORA, OPTIMIZER)
                trainer.run()
                session = trainer.session.session_id  # type: ignore[union-attr]
                exports.append(admin.export_adapter(SHARED_ADAPTER))
                with pytest.raises(PermissionDeniedError, match="export_shared_adapter"):
                    client.export_adapter(session)
                zeros = {n: torch.zeros_like(t) for n, t in exports[-1].items()}
                with pytest.raises(PermissionDeniedError, match="only an admin or an aggregator"):
                    client.import_adapter(session, zeros)
                other = AdapterSettings(kind="lora", r=8, alpha=16, seed=3)
                request = SessionRequest(k=1, m=1, adapter=other)
                with pytest.raises(Exception, match="same adapter configuration"):
                    client.open_session(request)
        # Both sessions see one adapter, trained by both clients' steps.
        assert exports[0].keys() == exports[1].keys()
        assert not all(
            torch.equal(exports[0][n], exports[1][n]) for n in exports[0]
        )  # b trained on
        with admin_channel:
            assert admin.export_adapter(SHARED_ADAPTER).keys() == exports[1].keys()
            poisoned = {n: torch.full_like(t, float("nan")) for n, t in exports[1].items()}
            with pytest.raises(InvalidArgumentError, match="not finite"):
                admin.import_adapter(SHARED_ADAPTER, poisoned)
            assert admin.import_adapter(SHARED_ADAPTER, exports[0]) == len(exports[0])
            back = admin.export_adapter(SHARED_ADAPTER)
            assert all(torch.equal(back[n], exports[0][n]) for n in back)
            with pytest.raises(PermissionDeniedError):  # an admin reaches no client session
                admin.export_adapter(session)
    finally:
        dep.stop()


def test_a_client_restarted_from_its_checkpoint_finishes_like_an_uninterrupted_one(
    backbone: Deployment, tmp_path: Path
) -> None:
    def settings(steps: int, checkpoint: Path | None) -> TrainSettings:
        return TrainSettings(
            data=BUNDLED_DATASET,
            model_path=backbone.model_path,
            max_steps=steps,
            batch_size=2,
            max_length=32,
            seed=9,
            checkpoint_dir=checkpoint,
            eval_data=BUNDLED_DATASET,
            eval_every=3,
            eval_batches=2,
        )

    channel, client = backbone.connect("clinic-c")
    with channel:
        whole = SplitTrainer(client, settings(6, None), LORA, OPTIMIZER)
        expected = whole.run()
        expected_adapter = whole.adapter_tensors()
        first = SplitTrainer(client, settings(3, tmp_path / "ckpt"), LORA, OPTIMIZER)
        head_reports = first.run()
        first.close()
        # A new client process: same config, resumes from the checkpoint directory.
        second = SplitTrainer(client, settings(6, tmp_path / "ckpt"), LORA, OPTIMIZER)
        session = second.start()
        assert session.resumed and second.step == 3
        tail_reports = second.run()
    losses = [r.loss for r in head_reports + tail_reports]
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor([r.loss for r in expected]), atol=1e-5, rtol=0
    )
    for name, tensor in expected_adapter.items():
        torch.testing.assert_close(second.adapter_tensors()[name], tensor, atol=1e-5, rtol=0)
    evals = [r.eval_loss for r in expected if r.eval_loss is not None]
    assert len(evals) == 2 and all(0 < e < 20 for e in evals)


def _refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    return err.code(), err.details()  # type: ignore[attr-defined]


def test_another_identitys_session_and_a_missing_one_get_the_same_refusal(
    backbone: Deployment,
) -> None:
    """Issue 15, item 11: no backbone RPC that takes a session id tells whether a
    session it may not use exists."""
    owner_channel, owner = backbone.connect("hospital-a")
    channel, _ = backbone.connect("mallory")
    with owner_channel, channel:
        theirs = open_lora(owner)
        missing = secrets.token_hex(len(theirs) // 2)
        stub = backbone_pb2_grpc.BackboneStub(channel)

        def calls(sid: str) -> dict[str, Callable[[], object]]:
            metadata = ((SESSION_METADATA, sid),)
            return {
                "OpenSession": lambda: stub.OpenSession(
                    backbone_pb2.OpenSessionRequest(session_id=sid), timeout=30
                ),
                "CloseSession": lambda: stub.CloseSession(
                    backbone_pb2.CloseSessionRequest(session_id=sid), timeout=30
                ),
                "Train": lambda: list(
                    stub.Train(
                        iter([backbone_pb2.TrainRequest(op=backbone_pb2.TRAIN_OP_ZERO_GRAD)]),
                        metadata=metadata,
                        timeout=30,
                    )
                ),
                "Generate": lambda: list(
                    stub.Generate(
                        iter([backbone_pb2.GenerateRequest(op=backbone_pb2.GENERATE_OP_RESET)]),
                        metadata=metadata,
                        timeout=30,
                    )
                ),
                "ExportAdapter": lambda: list(
                    stub.ExportAdapter(
                        backbone_pb2.ExportAdapterRequest(session_id=sid), timeout=30
                    )
                ),
                "ImportAdapter": lambda: stub.ImportAdapter(
                    iter([]), metadata=metadata, timeout=30
                ),
            }

        for (method, foreign), missing_call in zip(
            calls(theirs).items(), calls(missing).values(), strict=True
        ):
            code, details = _refusal(foreign)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
            assert (code, details.replace(theirs[:8], "<id>")) == (
                (c := _refusal(missing_call))[0],
                c[1].replace(missing[:8], "<id>"),
            ), method
        # The owner still has it.
        assert owner.open_session(SessionRequest(session_id=theirs)).resumed
        owner.close_session(theirs)


def test_one_identity_cannot_hold_every_stream(backbone: Deployment) -> None:
    """Issue 15, item 6: streams are capped per identity besides the global cap."""
    cap = BackboneSettings(model_path=backbone.model_path).max_streams_per_identity
    channel, greedy = backbone.connect("greedy")
    other_channel, other = backbone.connect("honest")
    with channel, other_channel:
        session = open_lora(greedy)
        streams = []
        try:
            for _ in range(cap):
                streams.append(GenerateStream(greedy, session, "raw"))
                streams[-1].reset()  # the backbone has it open
            extra = GenerateStream(greedy, session, "raw")
            with pytest.raises(LimitExceededError, match="per identity"):
                extra.reset()
            extra.close()
            mine = GenerateStream(other, open_lora(other), "raw")
            mine.reset()  # another identity is still served
            mine.close()
        finally:
            for stream in streams:
                stream.close()
        # Closed streams give their slots back.
        assert wait_until(lambda: _opens(greedy, session), timeout_s=30)
        greedy.close_session(session)


def _opens(client: BackboneClient, session: str) -> bool:
    stream = GenerateStream(client, session, "raw")
    try:
        stream.reset()
        return True
    except LimitExceededError:
        return False
    finally:
        stream.close()


def test_a_client_cannot_import_an_adapter_that_is_not_finite(backbone: Deployment) -> None:
    channel, client = backbone.connect("hospital-a")
    with channel:
        session = open_lora(client)
        before = client.export_adapter(session)
        poisoned = {name: t.clone() for name, t in before.items()}
        poisoned[sorted(poisoned)[0]].view(-1)[0] = float("nan")
        with pytest.raises(InvalidArgumentError, match="not finite"):
            client.import_adapter(session, poisoned)
        after = client.export_adapter(session)
        assert all(torch.equal(after[n], before[n]) for n in before)
        client.close_session(session)


def test_diagnostics_on_the_backbone_refuse_tensors_larger_than_a_link_check(
    backbone: Deployment,
) -> None:
    """Issue 15, item 6: the echo on a production service holds at most a link check's
    tensor (64 MiB by default), refused from its header before anything is allocated."""
    header = tensor_pb2.TensorHeader(
        name="h1", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[65 * MiB // 4], total_bytes=65 * MiB
    )
    chunk = tensor_pb2.TensorChunk(seq=0, header=header, data=b"\0" * 1024)
    channel, _ = backbone.connect("hospital-a")
    with channel:
        stub = diagnostics_pb2_grpc.DiagnosticsStub(channel)
        code, details = _refusal(
            lambda: list(
                stub.EchoTensors(
                    iter([diagnostics_pb2.EchoTensorsRequest(chunk=chunk)]), timeout=30
                )
            )
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        # A link check's tensor still goes through.
        (back,) = DiagnosticsClient(channel).echo([("h1", torch.ones(1024, 1024))])
        assert torch.equal(back.tensor, torch.ones(1024, 1024))


def test_a_client_that_starts_while_the_backbone_restarts_waits_for_it(
    backbone: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by `make chaos`: the backbone is down (restarting) when a federation member
    opens its session, for longer than one call's retries; it waits for it (as it does to
    resume a session) instead of exiting. (`splitfed train` alone still fails at once:
    tests/integration/test_cli_errors.py.)"""
    channel, client = backbone.connect("clinic-d")
    with channel:
        settings = TrainSettings(
            data=BUNDLED_DATASET,
            model_path=backbone.model_path,
            max_steps=1,
            batch_size=2,
            max_length=32,
        )
        trainer = SplitTrainer(client, settings, LORA, OPTIMIZER)
        errors: list[BaseException] = []

        def start() -> None:
            try:
                trainer.start(wait=True)  # as FederatedTrainer starts it
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        thread = threading.Thread(target=start)
        backbone.stop()
        try:
            thread.start()
            # One call's own retries are spent: the client waits on, or it gave up.
            assert wait_until(
                lambda: "waiting for it" in caplog.text or not thread.is_alive(), timeout_s=60
            )
        finally:
            backbone.start()
        thread.join(timeout=120)
        assert not errors, errors
        assert trainer.session is not None and trainer.session.step == 0
        assert trainer.train_step().step == 1
        trainer.close(delete_session=True)


def test_a_client_killed_after_the_backbone_applied_its_step_resumes_it(
    backbone: Deployment, tmp_path: Path
) -> None:
    """A client killed between the backbone applying its step and its own checkpoint of
    that step (the backbone is then one step ahead of the checkpoint): the restarted
    client finishes the step with the gradients it wrote ahead and the backbone's stored
    reply, and ends like an uninterrupted one (was: "they cannot be brought together")."""

    def settings(checkpoint: Path | None) -> TrainSettings:
        return TrainSettings(
            data=BUNDLED_DATASET,
            model_path=backbone.model_path,
            max_steps=4,
            batch_size=2,
            max_length=32,
            seed=5,
            checkpoint_dir=checkpoint,
        )

    class Killed(BaseException):
        pass

    channel, client = backbone.connect("clinic-e")
    with channel:
        whole = SplitTrainer(client, settings(None), LORA, OPTIMIZER)
        expected = [r.loss for r in whole.run()]
        first = SplitTrainer(client, settings(tmp_path / "ckpt"), LORA, OPTIMIZER)
        save = first._save_checkpoint

        def killed_before_saving_step_2() -> None:
            if first.step == 2:
                raise Killed  # the process dies here: nothing after runs
            save()

        first._save_checkpoint = killed_before_saving_step_2  # type: ignore[method-assign]
        losses = []
        with pytest.raises(Killed):
            first.run(lambda report: losses.append(report.loss))
        assert first.session is not None
        reopened = SessionRequest(session_id=first.session.session_id)
        assert client.open_session(reopened).step == 2  # the checkpoint holds step 1
        second = SplitTrainer(client, settings(tmp_path / "ckpt"), LORA, OPTIMIZER)
        session = second.start()
        assert session.resumed and second.step == 2
        losses += [r.loss for r in second.run()]
    assert len(losses) == 3  # step 2's report died with the first process
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(expected[:1] + expected[2:]), atol=1e-5, rtol=0
    )
    for name, tensor in whole.adapter_tensors().items():
        torch.testing.assert_close(second.adapter_tensors()[name], tensor, atol=1e-5, rtol=0)
