"""Per-request reply encodings on a real backbone over mTLS: h2 and dL/dh1 come back in the
encoding each request asks for (within that encoding's error of raw), the backbone
reports its compute time, and a reply encoding it does not accept is INVALID_ARGUMENT
without harm to the session or the service."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from backbone_kit import Deployment, deployment

from splitfed.clients.backbone import BackboneClient, GenerateStream, TrainStream
from splitfed.clients.links import LADDER, LinkMeter, WireEncodings
from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.errors import InvalidArgumentError
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.protocol.backbone import TRAIN_REQUEST, SessionRequest
from splitfed.v1 import backbone_pb2

LORA = AdapterSettings(kind="lora", r=4, alpha=8, seed=3)
OPTIMIZER = OptimizerSettings(learning_rate=5e-3)
RAW = WireEncodings("raw", "raw")
BF16 = WireEncodings("bf16", "bf16")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # int8 is registered but this backbone does not accept it.
    dep = deployment(tmp_path_factory.mktemp("encodings"), encodings=["raw", "bf16"])
    dep.start()
    yield dep
    dep.stop()


def open_lora(client: BackboneClient) -> str:
    return client.open_session(SessionRequest(k=1, m=1, adapter=LORA)).session_id


def bf16_exact(*shape: int, seed: int) -> torch.Tensor:
    """Random float32 values that bf16 represents exactly (so sending them in bf16 is
    lossless and only the reply's encoding differs)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(torch.bfloat16).float()


def as_bf16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16).float()


def test_h2_in_the_requested_reply_encoding(backbone: Deployment) -> None:
    h1, mask = bf16_exact(2, 5, 64, seed=1), torch.ones(2, 5, dtype=torch.long)
    channel, client = backbone.connect()
    with channel:
        session = open_lora(client)
        stream = TrainStream(client, session, RAW)
        raw = stream.forward(1, 0, h1, mask, train=False)
        stream.encodings = BF16  # between steps: the next requests ask for bf16 replies
        bf16 = stream.forward(1, 0, h1, mask, train=False)
        stream.close()
        client.close_session(session)
    assert not torch.equal(raw, bf16)
    # The same h2, rounded to bfloat16 on the way: within bf16's error of raw.
    assert torch.equal(bf16, as_bf16(raw))
    torch.testing.assert_close(bf16, raw, rtol=2**-8, atol=0)


def test_grad_h1_in_the_requested_gradient_encoding_and_compute_time_reported(
    backbone: Deployment,
) -> None:
    h1, mask = bf16_exact(2, 5, 64, seed=2), torch.ones(2, 5, dtype=torch.long)
    grad = bf16_exact(2, 5, 64, seed=3)
    channel, client = backbone.connect()
    replies = {}
    meters = {}
    with channel:
        for encodings in (RAW, WireEncodings("bf16", "bf16")):
            session = open_lora(client)  # same seed: the same body adapter
            meter = LinkMeter()
            stream = TrainStream(client, session, encodings, meter=meter)
            h2 = stream.forward(1, 0, h1, mask)
            replies[encodings] = (h2, stream.backward(1, 0, grad))
            meters[encodings] = meter.finish_step(1.0)
            stream.close()
            client.close_session(session)
    (raw_h2, raw_grad), (bf16_h2, bf16_grad) = replies[RAW], replies[BF16]
    assert torch.equal(bf16_h2, as_bf16(raw_h2))
    assert torch.equal(bf16_grad, as_bf16(raw_grad))
    assert not torch.equal(bf16_grad, raw_grad)
    # The meter saw both exchanges, their bytes in each encoding and the backbone's time.
    for encodings, itemsize in ((RAW, 4), (BF16, 2)):
        forward, backward = meters[encodings].exchanges
        assert forward.wire_bytes == 2 * 2 * 5 * 64 * itemsize + 2 * 5  # h1, h2, mask
        assert backward.wire_bytes == 2 * 2 * 5 * 64 * itemsize
        assert forward.raw_bytes == backward.raw_bytes == 2 * 2 * 5 * 64 * 4
        assert forward.server_s > 0 and backward.server_s > 0
        assert forward.alone and backward.alone


def test_generation_reply_encoding(backbone: Deployment) -> None:
    h1, mask = bf16_exact(1, 4, 64, seed=4), torch.ones(1, 4, dtype=torch.long)
    channel, client = backbone.connect()
    with channel:
        session = open_lora(client)
        stream = GenerateStream(client, session, RAW)
        raw = stream.forward(h1, mask)
        stream.reset()
        stream.encodings = WireEncodings("bf16", "raw")
        bf16 = stream.forward(h1, mask)
        stream.close()
        client.close_session(session)
    assert torch.equal(bf16, as_bf16(raw))


@pytest.mark.parametrize("requested", ["int8", "fp4", "x" * 5000])
def test_a_reply_encoding_not_accepted_is_invalid_argument(
    backbone: Deployment, requested: str
) -> None:
    h1, mask = torch.randn(1, 3, 64), torch.ones(1, 3, dtype=torch.long)
    channel, client = backbone.connect()
    with channel:
        session = open_lora(client)
        stream = TrainStream(client, session, RAW)
        fields = {"op": backbone_pb2.TRAIN_OP_FORWARD, "step": 1, "micro_batch": 0}
        for name, tensor in (("h1", h1), ("attention_mask", mask.to(torch.int8))):
            # What a hostile client sends: an encoding name of its choosing.
            stream._stream.send_tensor(
                tensor, name, TRAIN_REQUEST, "raw", reply_encoding=requested, **fields
            )
        with pytest.raises(InvalidArgumentError, match=r"reply encoding .* is not accepted") as err:
            stream.receive()
        assert len(str(err.value)) < 500
        stream.close()
        # The session and the service carry on: a new stream trains the same step.
        stream = TrainStream(client, session, RAW)
        h2 = stream.forward(1, 0, h1, mask)
        assert h2.shape == h1.shape
        assert stream.backward(1, 0, torch.ones_like(h2)).shape == h1.shape
        assert stream.step(1, 0.0, 1.0).already_applied is False
        stream.close()
        client.close_session(session)


def train(dep: Deployment, steps: int = 3, **overrides: Any) -> tuple[SplitTrainer, list[Any]]:
    values: dict[str, Any] = {
        "data": BUNDLED_DATASET,
        "model_path": dep.model_path,
        "batch_size": 2,
        "accumulation": 2,
        "max_steps": steps,
        "max_length": 32,
        "seed": 5,
    }
    channel, client = dep.connect()
    with channel:
        trainer = SplitTrainer(client, TrainSettings(**values | overrides), LORA, OPTIMIZER)
        reports = trainer.run()
        trainer.close(delete_session=True)
    return trainer, reports


@pytest.mark.slow
def test_trainer_encodings_auto_measures_and_explicit_ones_are_used(
    backbone: Deployment,
) -> None:
    trainer, auto = train(backbone, encoding="auto", encoding_every=1)
    # It starts raw and decides from measurements (what it picks depends on this
    # machine's timings, so only its start and that it measured are checked here).
    assert auto[0].encodings == RAW
    assert all(r.encodings in LADDER for r in auto)
    assert trainer.auto is not None and trainer.auto.estimate is not None
    _, raw = train(backbone)
    _, bf16 = train(backbone, encoding="bf16", gradient_encoding="bf16")
    assert [r.encodings for r in raw] == [RAW] * 3
    assert [r.encodings for r in bf16] == [BF16] * 3
    assert auto[0].loss == raw[0].loss
    # bf16 on all four tensors: the same losses within bf16's rounding.
    torch.testing.assert_close(
        torch.tensor([r.loss for r in bf16]), torch.tensor([r.loss for r in raw]), rtol=1e-2, atol=0
    )
