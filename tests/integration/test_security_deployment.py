"""Security across services: the denial matrix over every RPC of every service, revocation
of open streams, and activation encryption between a client and a backbone process.

One module of some 600 lines: all of it runs against one deployment (key manager,
backbone, enrolled parties) started once per module."""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from backbone_kit import SERVER_NAME as BACKBONE_NAME
from backbone_kit import Deployment, deployment
from helpers import wait_until
from security_kit import SERVER_NAME, KeyManagerKit, keymanager_kit

from splitfed.clients.backbone import (
    BackboneClient,
    TrainStream,
    client_crypto,
    rotate_session_key,
)
from splitfed.clients.keys import KeyManagerClient
from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.errors import (
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.protocol.backbone import (
    EXPORT_RESPONSE,
    IMPORT_REQUEST,
    SESSION_METADATA,
    TRAIN_REQUEST,
    TRAIN_RESPONSE,
    SessionRequest,
)
from splitfed.protocol.backbone import SERVICE as BACKBONE
from splitfed.protocol.diagnostics import SERVICE as DIAGNOSTICS
from splitfed.protocol.keys import SERVICE as KEYMANAGER
from splitfed.security.ca import CertificateAuthority
from splitfed.services.backbone.servicer import POLICY as BACKBONE_POLICY
from splitfed.services.keymanager.servicer import POLICY as KEYMANAGER_POLICY
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel
from splitfed.v1 import backbone_pb2, backbone_pb2_grpc

LORA = AdapterSettings(kind="lora", r=4, alpha=8, seed=3)
OPTIMIZER = OptimizerSettings(learning_rate=5e-3)


@dataclass
class Stack:
    km: KeyManagerKit
    backbone: Deployment
    alice: Path
    bob: Path
    aggregator: Path

    def tls(self, party: Path) -> TLSConfig:
        return TLSConfig.from_dir(party)

    def backbone_client(self, party: Path) -> tuple[grpc.Channel, BackboneClient]:
        channel = create_channel(self.backbone.address, self.tls(party), server_name=BACKBONE_NAME)
        return channel, BackboneClient(channel)

    def keys(self, party: Path) -> KeyManagerClient:
        return self.km.client(party)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("security")
    ca = CertificateAuthority.create("security test CA")
    with pytest.MonkeyPatch.context() as mp:
        km = keymanager_kit(root, mp, ca=ca)
        km.start()
        ca.issue("backbone-0", "backbone", dns_names=[BACKBONE_NAME]).write(root / "bb-tls")
        dep = deployment(
            root / "backbone",
            ca=ca,
            security={
                "keymanager": km.address,
                "keymanager_server_name": SERVER_NAME,
                "revocation_poll_s": 0.5,
            },
            idle_timeout_s=600.0,
        )
        dep.start()
        stack = Stack(km, dep, km.enroll("alice"), km.enroll("bob"), km.enroll("agg", "aggregator"))
        yield stack
        dep.stop()
        km.stop()


def _call(channel: grpc.Channel, service: str, method: str, streaming: tuple[bool, bool]) -> None:
    """Call ``method`` with an empty request; raises grpc.RpcError with the status."""
    path = f"/{service}/{method}"
    ser, de = (lambda b: b), (lambda b: b)
    metadata = ((SESSION_METADATA, "no-such-session"),)
    if streaming == (False, False):
        channel.unary_unary(path, ser, de)(b"", timeout=10, metadata=metadata)
    elif streaming == (False, True):
        list(channel.unary_stream(path, ser, de)(b"", timeout=10, metadata=metadata))
    elif streaming == (True, False):
        channel.stream_unary(path, ser, de)(iter([b""]), timeout=10, metadata=metadata)
    else:
        list(channel.stream_stream(path, ser, de)(iter([b""]), timeout=10, metadata=metadata))


def _methods(descriptor: object) -> list[tuple[str, tuple[bool, bool]]]:
    return [
        (m.name, (m.client_streaming, m.server_streaming))
        for m in descriptor.methods  # type: ignore[attr-defined]
    ]


def _code(
    channel: grpc.Channel, service: str, method: str, kind: tuple[bool, bool]
) -> grpc.StatusCode | None:
    """The status of an empty call to ``method``."""
    try:
        _call(channel, service, method, kind)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _raw_channel(
    address: str, server_name: str, ca: bytes, cert: bytes | None, key: bytes | None
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.secure_channel(address, creds, [("grpc.ssl_target_name_override", server_name)])


def test_denial_matrix(stack: Stack) -> None:
    ca_pem = stack.km.ca_pem
    other_ca = CertificateAuthority.create("another CA")
    foreign = other_ca.issue("alice", "client")
    assert stack.km.servers is not None  # the CA key is encrypted under the stretched KEK
    expired = stack.km.servers.authority.ca.issue(
        "eve",
        "client",
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
        validity=dt.timedelta(days=1),
    )
    targets = [
        (stack.km.address, SERVER_NAME, KEYMANAGER, KEYMANAGER_POLICY),
        (stack.backbone.address, BACKBONE_NAME, BACKBONE, BACKBONE_POLICY),
        (stack.backbone.address, BACKBONE_NAME, DIAGNOSTICS, None),
    ]
    roles = {"client": stack.alice, "aggregator": stack.aggregator}
    revoked = TLSConfig.from_dir(stack.km.enroll("mallory"))
    admin = stack.km.admin()
    admin.revoke(identity="mallory", reason="denial matrix")
    admin.close()
    with create_channel(stack.backbone.address, revoked, server_name=BACKBONE_NAME) as probe:
        # The backbone refuses it once its poller has fetched the new list.
        assert wait_until(
            lambda: (
                _code(probe, BACKBONE.full_name, "GetModelInfo", (False, False))
                == grpc.StatusCode.UNAUTHENTICATED
            ),
            timeout_s=10,
        )
    for address, name, service, policy in targets:
        bad = {
            "no certificate": _raw_channel(address, name, ca_pem, None, None),
            "other CA": _raw_channel(address, name, ca_pem, foreign.cert_pem, foreign.key_pem),
            "expired": _raw_channel(address, name, ca_pem, expired.cert_pem, expired.key_pem),
        }
        for method, kind in _methods(service):
            if service is KEYMANAGER and method == "Enroll":
                continue  # only on the enrollment port, below
            for why, channel in bad.items():
                code = _code(channel, service.full_name, method, kind)
                assert code == grpc.StatusCode.UNAVAILABLE, (service.name, method, why, code)
            with create_channel(address, revoked, server_name=name) as channel:
                code = _code(channel, service.full_name, method, kind)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (service.name, method, "revoked", code)
            if policy is None:
                continue
            for role, party in roles.items():
                allowed = role in policy[method]
                tls = TLSConfig.from_dir(party)
                with create_channel(address, tls, server_name=name) as channel:
                    code = _code(channel, service.full_name, method, kind)
                if not allowed:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (method, role, code)
                else:
                    assert code not in (
                        grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.UNAVAILABLE,
                    ) or method in (
                        "GetSessionKey",
                        "EndSession",
                        "RotateSessionKey",
                        "Train",
                        "Generate",
                        "ExportAdapter",
                        "ImportAdapter",
                        "CloseSession",
                        "CheckSession",  # object-level: a session of a federation it serves
                    ), (method, role, code)
        for channel in bad.values():
            channel.close()
    # The enrollment port answers Enroll only, and nothing that needs an identity.
    enroll_channel = grpc.secure_channel(
        stack.km.enroll_address,
        grpc.ssl_channel_credentials(ca_pem),
        [("grpc.ssl_target_name_override", SERVER_NAME)],
    )
    for method, kind in _methods(KEYMANAGER):
        code = _code(enroll_channel, KEYMANAGER.full_name, method, kind)
        expected = grpc.StatusCode.UNAUTHENTICATED  # Enroll: no token; others: no identity
        assert code == expected, (method, code)
    enroll_channel.close()


def test_sessions_and_keys_of_another_client_are_denied(stack: Stack) -> None:
    channel, alice = stack.backbone_client(stack.alice)
    with channel:
        info = alice.open_session(SessionRequest(k=1, m=1, adapter=LORA, encrypted=True))
        assert info.info.encryption
    bob_channel, bob = stack.backbone_client(stack.bob)
    with bob_channel:
        with pytest.raises(PermissionDeniedError):
            bob.open_session(SessionRequest(session_id=info.session_id, encrypted=True))
        with pytest.raises(PermissionDeniedError):
            bob.export_adapter(info.session_id)
    with pytest.raises(PermissionDeniedError):
        stack.keys(stack.bob).session_key(info.session_id)
    assert stack.keys(stack.alice).session_key(info.session_id).key_id == 1
    # Alice is still served.
    channel, alice = stack.backbone_client(stack.alice)
    with channel:
        alice.close_session(info.session_id)
    with pytest.raises(PermissionDeniedError):  # the backbone ended its keys
        stack.keys(stack.alice).session_key(info.session_id)


class Recorder:
    """Serialised request frames as they leave the client (the bytes inside TLS)."""

    def __init__(self, mutate: bool = False) -> None:
        self.frames: list[bytes] = []
        self.mutate = mutate

    def serialize(self, frame: object) -> bytes:
        raw = TRAIN_REQUEST.serialize(frame)  # type: ignore[arg-type]
        if self.mutate and len(raw) > 200:
            flipped = bytearray(raw)
            flipped[-20] ^= 0x01
            raw = bytes(flipped)
        self.frames.append(raw)
        return raw


def _encrypted_stream(stack: Stack, party: Path, recorder: Recorder | None = None):  # type: ignore[no-untyped-def]
    channel, client = stack.backbone_client(party)
    session = client.open_session(SessionRequest(k=1, m=1, adapter=LORA, encrypted=True))
    keys = stack.keys(party)
    crypto = client_crypto(keys, session.session_id)
    if recorder is not None:
        client.train_call = channel.stream_stream(
            f"/{BACKBONE.full_name}/Train",
            request_serializer=recorder.serialize,
            response_deserializer=TRAIN_RESPONSE.parse,
        )
    return channel, client, session.session_id, keys, crypto


def _batch(hidden: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h1 = torch.randn(2, 8, hidden, generator=g)
    return h1, torch.ones(2, 8, dtype=torch.long)


def test_activations_are_ciphertext_on_the_wire_and_results_match(stack: Stack) -> None:
    h1, mask = _batch()
    recorder = Recorder()
    channel, client, sid, keys, crypto = _encrypted_stream(stack, stack.alice, recorder)
    plain_channel, plain_client = stack.backbone_client(stack.alice)
    plain = plain_client.open_session(SessionRequest(k=1, m=1, adapter=LORA))
    with channel, plain_channel:
        stream = TrainStream(client, sid, "raw", crypto)
        reference = TrainStream(plain_client, plain.session_id, "raw")
        out = stream.forward(1, 0, h1, mask)
        expected = reference.forward(1, 0, h1, mask)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        grad = torch.ones_like(out)
        torch.testing.assert_close(stream.backward(1, 0, grad), reference.backward(1, 0, grad))
        stream.step(1, 0.0, 0.0)
        reference.step(1, 0.0, 0.0)
        # Rotation between steps: no failed step, same results.
        assert rotate_session_key(keys, crypto) == 2
        torch.testing.assert_close(
            stream.forward(2, 0, h1, mask), reference.forward(2, 0, h1, mask), rtol=0, atol=0
        )
        stream.close()
        reference.close()
    plaintext = h1.numpy().tobytes()
    wire = b"".join(recorder.frames)
    assert len(wire) > len(plaintext)
    for start in range(0, len(plaintext) - 32, 512):
        assert plaintext[start : start + 32] not in wire
    assert crypto.cached_key_ids == [2]


def test_tampered_and_foreign_chunks_are_refused(stack: Stack) -> None:
    h1, mask = _batch()
    channel, client, sid, _, crypto = _encrypted_stream(stack, stack.alice, Recorder(mutate=True))
    with channel:
        stream = TrainStream(client, sid, "raw", crypto)
        with pytest.raises(DataLossError, match="does not authenticate"):
            stream.forward(1, 0, h1, mask)
        stream.close()
    # Chunks sealed for another session of the same owner: refused.
    channel, client, sid, _, _ = _encrypted_stream(stack, stack.alice)
    _, _, other_sid, other_keys, _ = _encrypted_stream(stack, stack.alice)
    with channel:
        stream = TrainStream(client, sid, "raw", client_crypto(other_keys, other_sid))
        with pytest.raises((DataLossError, PermissionDeniedError)):
            stream.forward(1, 0, h1, mask)
        stream.close()
    # Plain chunks on an encrypted session: refused.
    channel, client, sid, _, _ = _encrypted_stream(stack, stack.alice)
    with channel:
        stream = TrainStream(client, sid, "raw")
        with pytest.raises(Exception, match="not sealed"):
            stream.forward(1, 0, h1, mask)
        stream.close()


def test_backbone_restart_gets_the_session_keys_again(stack: Stack) -> None:
    h1, mask = _batch()
    channel, client, sid, _, crypto = _encrypted_stream(stack, stack.alice)
    with channel:
        stream = TrainStream(client, sid, "raw", crypto)
        first = stream.forward(1, 0, h1, mask, train=False)
        stream.close()
    assert stack.backbone.process is not None
    os.kill(stack.backbone.process.pid, signal.SIGKILL)  # its keys were only in memory
    stack.backbone.process.stop()
    stack.backbone.start()
    channel, client = stack.backbone_client(stack.alice)
    with channel:
        resumed = client.open_session(SessionRequest(session_id=sid, encrypted=True))
        assert resumed.resumed
        with pytest.raises(FailedPreconditionError):
            client.open_session(SessionRequest(session_id=sid))
        stream = TrainStream(client, sid, "raw", crypto)
        torch.testing.assert_close(stream.forward(1, 0, h1, mask, train=False), first)
        stream.close()


def test_revoked_certificate_loses_its_open_stream(stack: Stack) -> None:
    carol = stack.km.enroll("carol")
    h1, mask = _batch()
    channel, client = stack.backbone_client(carol)
    with channel:
        sid = client.open_session(SessionRequest(k=1, m=1, adapter=LORA)).session_id
        stream = TrainStream(client, sid, "raw")
        stream.forward(1, 0, h1, mask, train=False)
        admin = stack.km.admin()
        admin.revoke(identity="carol", reason="test")
        admin.close()
        with pytest.raises(UnauthenticatedError, match="revoked"):
            # The poller ends the idle stream; a message sent before that is refused.
            assert wait_until(lambda: _stream_ended(stream, h1, mask), timeout_s=20)
        stream.close()
    # Others are still served.
    channel, bob = stack.backbone_client(stack.bob)
    with channel:
        assert bob.model_info().hidden_size == 64


def _stream_ended(stream: TrainStream, h1: torch.Tensor, mask: torch.Tensor) -> bool:
    stream.forward(1, 0, h1, mask, train=False)
    return False


def test_encrypted_training_with_rotation_equals_plain_training(stack: Stack) -> None:
    def run(encrypted: bool) -> tuple[list[float], dict[str, torch.Tensor], SplitTrainer]:
        settings = TrainSettings(
            data=BUNDLED_DATASET,
            model_path=stack.backbone.model_path,
            max_steps=5,
            batch_size=2,
            max_length=32,
            encrypted=encrypted,
            rotate_key_every_steps=2 if encrypted else 0,
        )
        channel, client = stack.backbone_client(stack.alice)
        keys = stack.keys(stack.alice) if encrypted else None
        with channel:
            trainer = SplitTrainer(client, settings, LORA, OPTIMIZER, keymanager=keys)
            reports = trainer.run()
            assert all(r.retries == 0 for r in reports)
            assert trainer.session is not None
            body = client.export_adapter(trainer.session.session_id, trainer.crypto)
            trainer.close(delete_session=True)
        tensors = {**trainer.adapter_tensors(), **{f"body.{k}": v for k, v in body.items()}}
        return [r.loss for r in reports], tensors, trainer

    plain_losses, plain_tensors, _ = run(False)
    losses, tensors, trainer = run(True)
    assert losses == plain_losses
    assert tensors.keys() == plain_tensors.keys()
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, plain_tensors[name], rtol=0, atol=0)
    assert trainer.crypto is not None and trainer.crypto.key_id == 3  # rotated at 3 and 5


def test_pipelined_encrypted_training_equals_sequential_encrypted_training(
    stack: Stack,
) -> None:
    """Three micro-batches in flight on a sealed stream (clients/pipeline.py), with a key
    rotation, give the sequential step's losses and adapters."""

    def run(window: int) -> tuple[list[float], dict[str, torch.Tensor]]:
        settings = TrainSettings(
            data=BUNDLED_DATASET,
            model_path=stack.backbone.model_path,
            max_steps=3,
            batch_size=2,
            accumulation=3,
            max_length=32,
            encrypted=True,
            rotate_key_every_steps=2,
            pipeline_window=window,
        )
        channel, client = stack.backbone_client(stack.alice)
        with channel:
            trainer = SplitTrainer(
                client, settings, LORA, OPTIMIZER, keymanager=stack.keys(stack.alice)
            )
            reports = trainer.run()
            assert trainer.window == window and all(r.retries == 0 for r in reports)
            assert trainer.session is not None
            body = client.export_adapter(trainer.session.session_id, trainer.crypto)
            trainer.close(delete_session=True)
        tensors = {**trainer.adapter_tensors(), **{f"body.{k}": v for k, v in body.items()}}
        return [r.loss for r in reports], tensors

    sequential_losses, sequential = run(0)
    losses, tensors = run(3)
    assert losses == pytest.approx(sequential_losses, abs=1e-5)
    assert tensors.keys() == sequential.keys()
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, sequential[name], rtol=0, atol=1e-5)


def test_sealed_chunks_cannot_be_replayed_into_another_stream_of_the_session(
    stack: Stack,
) -> None:
    """Issue 15, item 9: the replay state is the session's, not one stream's."""
    h1, mask = _batch()
    recorder = Recorder()
    channel, client, sid, _, crypto = _encrypted_stream(stack, stack.alice, recorder)
    with channel:
        stream = TrainStream(client, sid, "raw", crypto)
        expected = stream.forward(1, 0, h1, mask, train=False)
        stream.close()
        recorded = list(recorder.frames)
        replay = channel.stream_stream(
            f"/{BACKBONE.full_name}/Train",
            request_serializer=lambda raw: raw,
            response_deserializer=TRAIN_RESPONSE.parse,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(replay(iter(recorded), metadata=((SESSION_METADATA, sid),), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "replayed" in info.value.details()  # type: ignore[attr-defined]
        # The session goes on: fresh frames on a new stream are served.
        stream = TrainStream(client, sid, "raw", crypto)
        torch.testing.assert_close(stream.forward(1, 0, h1, mask, train=False), expected)
        stream.close()
        client.close_session(sid)


def test_adapter_transfers_of_an_encrypted_session_are_sealed(stack: Stack) -> None:
    """Issue 15, item 9: ExportAdapter and ImportAdapter of an encrypted session carry
    sealed chunks both ways; plain ones are refused."""
    channel, client, sid, _, crypto = _encrypted_stream(stack, stack.alice)
    exported: list[bytes] = []
    imported: list[bytes] = []

    def record_export(raw: bytes) -> object:
        exported.append(raw)
        return EXPORT_RESPONSE.parse(raw)

    def record_import(frame: object) -> bytes:
        imported.append(IMPORT_REQUEST.serialize(frame))  # type: ignore[arg-type]
        return imported[-1]

    with channel:
        client._export = channel.unary_stream(
            f"/{BACKBONE.full_name}/ExportAdapter",
            request_serializer=backbone_pb2.ExportAdapterRequest.SerializeToString,
            response_deserializer=record_export,
        )
        client._import = channel.stream_unary(
            f"/{BACKBONE.full_name}/ImportAdapter",
            request_serializer=record_import,
            response_deserializer=backbone_pb2.ImportAdapterResponse.FromString,
        )
        stub = backbone_pb2_grpc.BackboneStub(channel)
        raw = list(stub.ExportAdapter(backbone_pb2.ExportAdapterRequest(session_id=sid)))
        assert raw and all(r.chunk.HasField("seal") for r in raw)
        initial = client.export_adapter(sid, crypto)
        gen = torch.Generator().manual_seed(5)
        new = {n: torch.randn(t.shape, generator=gen) for n, t in initial.items()}
        assert client.import_adapter(sid, new, crypto) == len(new)
        back = client.export_adapter(sid, crypto)
        for name, tensor in new.items():
            torch.testing.assert_close(back[name], tensor, rtol=0, atol=0)
        wire = b"".join(imported + exported)
        assert all(EXPORT_RESPONSE.parse(r).message.chunk.HasField("seal") for r in exported)
        assert all(IMPORT_REQUEST.parse(r).message.chunk.HasField("seal") for r in imported)
        for tensor in new.values():
            assert tensor.numpy().tobytes()[:32] not in wire
        # Plain transfers of an encrypted session are refused, both ways.
        with pytest.raises(InvalidArgumentError, match="sealed"):
            client.export_adapter(sid)
        with pytest.raises(InvalidArgumentError, match="not sealed"):
            client.import_adapter(sid, new)
        client.close_session(sid)


def test_a_key_manager_restarting_during_a_key_rotation_is_waited_out(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by `make chaos`: the key manager is down when a step rotates the session key,
    for longer than one call's retries; the trainer waits for it instead of failing the
    step (which a federated client took for its aggregator being down, and trained the
    whole round again)."""
    settings = TrainSettings(
        data=BUNDLED_DATASET,
        model_path=stack.backbone.model_path,
        max_steps=3,
        batch_size=2,
        max_length=32,
        encrypted=True,
        rotate_key_every_steps=1,
    )
    channel, client = stack.backbone_client(stack.alice)
    keys = stack.keys(stack.alice)
    with channel:
        trainer = SplitTrainer(client, settings, LORA, OPTIMIZER, keymanager=keys)
        trainer.start()
        trainer.train_step()  # step 1, under key 1
        main, enrollment = stack.km.address, stack.km.enroll_address
        errors: list[BaseException] = []

        def step() -> None:
            try:
                trainer.train_step()  # step 2 rotates to key 2
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        thread = threading.Thread(target=step)
        stack.km.stop()
        try:
            thread.start()
            # One call's own retries are spent: the trainer waits on, or the step failed.
            assert wait_until(
                lambda: "waiting for the key manager" in caplog.text or not thread.is_alive(),
                timeout_s=60,
            )
        finally:
            stack.km.start(main, enrollment)
        thread.join(timeout=120)
        assert not errors, errors
        assert trainer.step == 2
        assert trainer.crypto is not None and trainer.crypto.key_id == 2
        trainer.close(delete_session=True)


def test_a_step_under_a_key_the_backbone_cannot_fetch_yet_waits_for_the_key_manager(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by `make chaos`: the client seals a step under a freshly rotated key and the
    key manager goes down before the backbone fetched that key. The backbone answers
    UNAVAILABLE (a service it depends on is down: retry), not INTERNAL (which the client
    rightly takes as fatal), and the client redoes the step once the key manager is back."""
    settings = TrainSettings(
        data=BUNDLED_DATASET,
        model_path=stack.backbone.model_path,
        max_steps=3,
        batch_size=2,
        max_length=32,
        encrypted=True,
    )
    channel, client = stack.backbone_client(stack.alice)
    keys = stack.keys(stack.alice)
    with channel:
        trainer = SplitTrainer(client, settings, LORA, OPTIMIZER, keymanager=keys)
        trainer.start()
        trainer.train_step()  # step 1, under key 1
        assert trainer.crypto is not None
        assert rotate_session_key(keys, trainer.crypto) == 2  # the backbone has not got it
        main, enrollment = stack.km.address, stack.km.enroll_address
        errors: list[BaseException] = []

        def step() -> None:
            try:
                trainer.train_step()  # step 2, sealed under key 2
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        thread = threading.Thread(target=step)
        stack.km.stop()
        try:
            thread.start()
            # The backbone could not open the step: the client reconnects, or it failed.
            assert wait_until(
                lambda: "reconnecting" in caplog.text or not thread.is_alive(), timeout_s=60
            )
        finally:
            stack.km.start(main, enrollment)
        thread.join(timeout=120)
        assert not errors, errors
        assert trainer.step == 2
        trainer.close(delete_session=True)
