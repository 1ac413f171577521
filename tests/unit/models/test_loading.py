"""Selective loading: a part reads only its own tensors, from single or sharded
safetensors checkpoints, and equals the same part split from the whole model."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from modelkit import padded_batch, tiny_model
from safetensors import safe_open

from splitfed.models import loading, split_model
from splitfed.models.loading import load_part


class RecordingOpen:
    """Wraps safetensors.safe_open and records every tensor actually read."""

    def __init__(self) -> None:
        self.read: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        recorder = self
        handle = safe_open(*args, **kwargs)

        class Handle:
            def __enter__(self) -> Any:
                self.inner = handle.__enter__()
                return self

            def __exit__(self, *exc: Any) -> Any:
                return handle.__exit__(*exc)

            def keys(self) -> Any:
                return self.inner.keys()

            def get_tensor(self, name: str) -> torch.Tensor:
                recorder.read.append(name)
                return self.inner.get_tensor(name)

        return Handle()


@pytest.fixture(params=["single", "sharded"])
def checkpoint(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Any, Path]:
    model = tiny_model("llama")
    shard = "2MB" if request.param == "single" else "20KB"
    model.save_pretrained(tmp_path, max_shard_size=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (request.param == "sharded")
    return model, tmp_path


def test_loaded_parts_equal_the_split_model(checkpoint: tuple[Any, Path]) -> None:
    model, path = checkpoint
    ids, mask = padded_batch()
    expected = split_model(copy.deepcopy(model), 2, 3)
    parts = [load_part(path, name, 2, 3) for name in ("head", "body", "tail")]
    hidden = ids
    for part, reference in zip(parts, expected, strict=True):
        want = reference(hidden, mask)
        got = part(hidden, mask)
        assert torch.equal(got, want)
        hidden = want
    assert all(not p.requires_grad for part in parts for p in part.parameters())


def test_client_never_reads_body_weights(
    checkpoint: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = checkpoint
    recorder = RecordingOpen()
    monkeypatch.setattr(loading, "safe_open", recorder)
    load_part(path, "head", 2, 3)
    load_part(path, "tail", 2, 3)
    client_reads = set(recorder.read)
    body_layers = {f"model.layers.{i}." for i in range(2, 3)}
    assert not [n for n in client_reads if any(n.startswith(b) for b in body_layers)]
    assert "model.embed_tokens.weight" in client_reads and "lm_head.weight" in client_reads
    recorder.read.clear()
    body = load_part(path, "body", 2, 3)
    assert set(recorder.read) == set(body.source_tensors)
    assert all(n.startswith("model.layers.2.") for n in recorder.read)


def test_tied_lm_head_is_read_from_the_embeddings(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path)
    tail = load_part(tmp_path, "tail", 1, 1)
    assert "transformer.wte.weight" in tail.source_tensors
    assert tail.lm_head is not None
    assert torch.equal(tail.lm_head.weight, model.transformer.wte.weight)


def test_dtype_conversion_on_load(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    body = load_part(tmp_path, "body", dtype=torch.bfloat16)
    assert {p.dtype for p in body.parameters()} == {torch.bfloat16}


def test_missing_directory_and_non_safetensors_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no config\.json"):
        load_part(tmp_path / "nope", "head")
    tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only safetensors checkpoints"):
        load_part(tmp_path, "head")


def test_missing_shard_and_missing_tensor_are_named(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    index["weight_map"]["model.layers.2.mlp.up_proj.weight"] = "gone.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"names gone\.safetensors, which does not exist"):
        load_part(tmp_path, "body")
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert shard
    with pytest.raises(
        ValueError, match=r"lacks tensors of the body: base\.layers\.1\.mlp\.up_proj"
    ):
        load_part(tmp_path, "body", 1, 1)
