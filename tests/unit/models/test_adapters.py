"""Adapters: LoRA and prefixes on parts, export/import under global names, averaging."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from modelkit import padded_batch, tiny_model

from splitfed.models import split_model
from splitfed.models.adapters import (
    LoraSettings,
    adapter_state,
    add_lora,
    add_prefix,
    average_adapters,
    load_adapter,
    load_adapter_state,
    save_adapter,
)
from splitfed.models.placement import body_device_map, place_part


def lora_parts(seed: int = 0):  # type: ignore[no-untyped-def]
    parts = split_model(tiny_model("llama"), 2, 1)
    torch.manual_seed(seed)
    for part in parts:
        add_lora(part, LoraSettings(r=4, alpha=8, init=False))
    return parts


def test_default_lora_targets_the_attention_projections_and_freezes_the_rest() -> None:
    head, _, _ = split_model(tiny_model("llama"), 2, 1)
    adapted = add_lora(head)
    assert adapted == sorted(
        f"layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("k", "o", "q", "v")
    )
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    lora_a = head.base.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.shape == (16, 32)  # default rank 16


def test_exported_names_are_global_and_parts_do_not_overlap() -> None:
    states = [adapter_state(part) for part in lora_parts()]
    names = [set(s) for s in states]
    assert not (names[0] & names[1]) and not (names[1] & names[2])
    assert {n.split(".")[2] for n in names[0]} == {"0", "1"}
    assert {n.split(".")[2] for n in names[2]} == {"5"}
    assert "model.layers.5.self_attn.q_proj.lora_A.weight" in names[2]


def test_adapters_move_between_deployments_through_safetensors(tmp_path: Path) -> None:
    source, target = lora_parts(seed=1), lora_parts(seed=2)
    ids, mask = padded_batch()
    before = target[2](target[1](target[0](ids, mask), mask), mask)
    state: dict[str, torch.Tensor] = {}
    for part in source:
        state.update(adapter_state(part))
    save_adapter(tmp_path / "adapter.safetensors", state, {"k": "2", "m": "1"})
    loaded = load_adapter(tmp_path / "adapter.safetensors")
    for part in target:
        load_adapter_state(part, loaded)
    got = target[2](target[1](target[0](ids, mask), mask), mask)
    want = source[2](source[1](source[0](ids, mask), mask), mask)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(before, got)


def test_no_tensors_round_trip(tmp_path: Path) -> None:
    """An optimizer checkpointed before its first step has no tensors (safetensors would
    write an unreadable header for them with an empty metadata dict)."""
    for metadata in (None, {}, {"step": "0"}):
        save_adapter(tmp_path / "empty.safetensors", {}, metadata)
        assert load_adapter(tmp_path / "empty.safetensors") == {}


def test_loading_needs_every_tensor_of_the_part_with_its_shape() -> None:
    head = lora_parts()[0]
    state = adapter_state(head)
    partial = dict(list(state.items())[1:])
    with pytest.raises(ValueError, match="lacks 1 tensors of the head"):
        load_adapter_state(head, partial)
    name = next(iter(state))
    wrong = {**state, name: torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=f"adapter tensor {name}: shape"):
        load_adapter_state(head, wrong)


def test_weighted_average() -> None:
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([0.0], dtype=torch.bfloat16)}
    b = {"x": torch.tensor([3.0, 6.0]), "y": torch.tensor([4.0], dtype=torch.bfloat16)}
    avg = average_adapters([a, b], [1, 3])
    torch.testing.assert_close(avg["x"], torch.tensor([2.5, 5.0]))
    assert avg["y"].dtype == torch.bfloat16 and float(avg["y"]) == 3.0
    assert torch.equal(average_adapters([a, b])["x"], torch.tensor([2.0, 4.0]))


@pytest.mark.parametrize(
    ("states", "weights", "message"),
    [
        ([], None, "nothing to average"),
        ([{"x": torch.ones(1)}, {"z": torch.ones(1)}], None, "different tensors"),
        ([{"x": torch.ones(1)}, {"x": torch.ones(2)}], None, "shapes"),
        ([{"x": torch.ones(1)}], [-1.0], "non-negative"),
        ([{"x": torch.ones(1)}], [1.0, 2.0], "1 states but 2 weights"),
    ],
)
def test_average_refuses_what_cannot_be_averaged(states, weights, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        average_adapters(states, weights)


def test_prefix_lives_in_its_part_and_never_changes_what_crosses_the_wire() -> None:
    head, body, _ = split_model(tiny_model("llama"), 2, 1)
    add_prefix(body, length=4)
    ids, mask = padded_batch()
    hidden = head(ids, mask)
    out = body(hidden, mask)
    assert out.shape == hidden.shape  # the prefix adds no positions to the activations
    cache = body.new_cache()
    body(hidden, mask, cache)
    assert cache.length == ids.shape[1] and cache.prefix_length == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"r": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout")],
)
def test_lora_settings_validate(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraSettings(**kwargs)  # type: ignore[arg-type]


def test_body_placement_keeps_blocks_whole_and_in_order() -> None:
    _, body, _ = split_model(tiny_model("llama", layers=10), 1, 1)
    block = sum(p.numel() * p.element_size() for p in body.blocks[0].parameters())
    device_map = body_device_map(body, {0: 3 * block, 1: 3 * block, 2: 10 * block, "cpu": 0})
    devices = [device_map[f"base.layers.{i}"] for i in range(len(body.blocks))]
    assert devices == sorted(devices, key=str) and len(set(devices)) >= 2
    assert set(devices) <= {0, 1, 2}
    ids, mask = padded_batch()
    hidden = torch.randn(ids.shape[0], ids.shape[1], 32)
    expected = body(hidden, mask)
    place_part(body, dict.fromkeys(device_map, "cpu"))
    torch.testing.assert_close(body(hidden, mask), expected, atol=0, rtol=0)


def test_cache_reset_trim_and_size() -> None:
    head, _, _ = split_model(copy.deepcopy(tiny_model("llama")), 1, 1)
    ids, mask = padded_batch()
    cache = head.new_cache()
    head(ids, mask, cache)
    assert cache.length == 9 and cache.nbytes() == 2 * 3 * 2 * 9 * 8 * 4
    cache.trim(4)
    assert cache.length == 4
    with pytest.raises(ValueError, match="cannot trim"):
        cache.trim(10)
    with pytest.raises(ValueError, match="the cache holds 4 and this step brings 9"):
        head(ids, mask, cache)
    cache.reset()
    assert cache.length == 0
