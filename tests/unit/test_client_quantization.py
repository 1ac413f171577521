"""The client's parts quantized ([training] quantization), and what the training
checkpoint records of the quantization it trained against: the body's (as the session's
backbone states it) and the client parts'; a resumed session warns when either differs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from splitfed.clients.app import ClientConfig
from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.models.quantization import quantization_of
from splitfed.models.tiny import make_tiny_checkpoint
from splitfed.protocol.backbone import ModelInfo, SessionInfo, SessionRequest

TEXTS = ["Add 1 and 2.", "The answer is 3."]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("client-quantization")
    # Hidden size 64: NF4 quantizes blocks of 64 weights.
    model = make_tiny_checkpoint(root / "model", TEXTS, layers=3, hidden_size=64)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": t, "response": "3"}) + "\n" for t in TEXTS))
    return model, data


class FakeBackbone:
    """OpenSession only: a backbone whose body is quantized ``quantization``."""

    def __init__(self, quantization: str) -> None:
        self.info = ModelInfo(quantization=quantization)
        self.opened: list[SessionRequest] = []

    def open_session(self, request: SessionRequest) -> SessionInfo:
        self.opened.append(request)
        return SessionInfo(request.session_id or "s-1", 0, bool(request.session_id), self.info)


def trainer(files: tuple[Path, Path], backbone: Any, **training: Any) -> SplitTrainer:
    model, data = files
    settings = TrainSettings(data=data, model_path=model, batch_size=2, **training)
    made = SplitTrainer(
        backbone, settings, AdapterSettings(r=2, alpha=4.0, seed=7), OptimizerSettings()
    )
    made._open_stream = lambda: None  # type: ignore[method-assign]  # no stream: OpenSession only
    return made


def test_a_wrong_quantization_is_a_clear_error(files: tuple[Path, Path]) -> None:
    model, data = files
    with pytest.raises(ValueError, match=r"must be one of none, int8, nf4; got 'int4'"):
        TrainSettings(data=data, model_path=model, quantization="int4")
    config = {
        "backbone": {"address": "127.0.0.1:7443", "tls_dir": str(model.parent)},
        "training": {"data": str(data), "model_path": str(model), "quantization": "fp4"},
    }
    with pytest.raises(ValueError, match=r"^\[training\] quantization must be one of"):
        ClientConfig.from_mapping(config)
    config["training"]["quantization"] = "nf4"
    assert ClientConfig.from_mapping(config).training.quantization == "nf4"


@pytest.mark.parametrize("mode", ["none", "int8", "nf4"])
def test_the_client_parts_load_quantized(files: tuple[Path, Path], mode: str) -> None:
    """The blocks' projections are quantized; embeddings and LM head stay in float and
    the adapter trains on top in float."""
    made = trainer(files, FakeBackbone(""), k=1, m=1, quantization=mode)
    for part in (made.head, made.tail):
        assert quantization_of(part) == mode
    assert made.head.base.embed_tokens.weight.dtype == torch.float32
    assert made.tail.lm_head.weight.dtype == torch.float32
    assert made.params and all(p.dtype == torch.float32 for p in made.params)


def identity_of(directory: Path) -> tuple[dict[str, Any], dict[str, str]]:
    state = json.loads((directory / "client.json").read_text())
    with safe_open(str(directory / "adapter.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return state, metadata


def test_the_checkpoint_records_what_it_trained_against(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    made = trainer(files, FakeBackbone("nf4"), quantization="int8", checkpoint_dir=tmp_path)
    made.start()
    state, metadata = identity_of(tmp_path)
    assert (state["body_quantization"], state["quantization"]) == ("nf4", "int8")
    assert (metadata["body_quantization"], metadata["quantization"]) == ("nf4", "int8")
    # A backbone from before quantization states nothing: an unquantized body.
    other = tmp_path / "old-backbone"
    trainer(files, FakeBackbone(""), checkpoint_dir=other).start()
    state, _ = identity_of(other)
    assert (state["body_quantization"], state["quantization"]) == ("none", "none")


def test_resuming_against_another_body_quantization_warns(
    files: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer(files, FakeBackbone("nf4"), checkpoint_dir=tmp_path).start()
    with caplog.at_level(logging.WARNING, logger="splitfed.clients.trainer"):
        backbone = FakeBackbone("nf4")
        trainer(files, backbone, checkpoint_dir=tmp_path).start()
        assert backbone.opened[0].session_id == "s-1"  # resumed
        assert not caplog.records
        trainer(files, FakeBackbone("int8"), checkpoint_dir=tmp_path).start()
    [record] = caplog.records
    assert record.getMessage().startswith("[trainer] session ")
    assert record.getMessage().endswith(
        "the adapter was trained against an nf4 body but this backbone serves int8: "
        "its outputs will differ"
    )


def test_resuming_with_other_client_parts_warns(
    files: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer(files, FakeBackbone(""), checkpoint_dir=tmp_path, quantization="nf4").start()
    with caplog.at_level(logging.WARNING, logger="splitfed.clients.trainer"):
        trainer(files, FakeBackbone("none"), checkpoint_dir=tmp_path).start()
    [record] = caplog.records
    assert "client parts (head and tail) quantized nf4 but [training] quantization is none" in (
        record.getMessage()
    )


def test_a_checkpoint_from_before_quantization_is_not_warned_about(
    files: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer(files, FakeBackbone(""), checkpoint_dir=tmp_path).start()
    state = json.loads((tmp_path / "client.json").read_text())
    del state["body_quantization"], state["quantization"]
    (tmp_path / "client.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="splitfed.clients.trainer"):
        trainer(files, FakeBackbone("nf4"), checkpoint_dir=tmp_path).start()
    assert not caplog.records
