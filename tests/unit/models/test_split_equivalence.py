"""Split equals unsplit: logits, LoRA loss and gradients, P-Tuning v2, greedy and sampled
generation, for every family, at several cut points, with padding in the batch."""

from __future__ import annotations

import copy

import pytest
import torch
from modelkit import TINY_FAMILIES, assert_adapter_grads_equal, padded_batch, tiny_model
from peft import inject_adapter_in_model
from transformers.cache_utils import DynamicCache

from splitfed.models import SplitSpec, family_for, positions_from_mask, split_model
from splitfed.models.adapters import LoraSettings, adapter_state, add_prefix
from splitfed.models.generation import LocalStage, SamplingOptions, SplitGenerator

CUTS = [(1, 1), (2, 3), (4, 1)]
ATOL = 1e-5


def run_split(parts, ids, mask):  # type: ignore[no-untyped-def]
    head, body, tail = parts
    return tail(body(head(ids, mask), mask), mask)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize(("k", "m"), CUTS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_equal_the_unsplit_model(family: str, k: int, m: int, side: str) -> None:
    model = tiny_model(family)
    ids, mask = padded_batch(side=side)
    expected = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, 9))
    parts = split_model(copy.deepcopy(model), k, m)
    # What crosses the wire: hidden states and an int8 2-D mask.
    got = run_split(parts, ids, mask.to(torch.int8))
    torch.testing.assert_close(got, expected.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4", "gpt2"])
@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 2)])
def test_lora_loss_and_every_gradient_equal_the_unsplit_model(family: str, k: int, m: int) -> None:
    model = tiny_model(family)
    settings = LoraSettings(r=4, alpha=8, init=False)
    inject_adapter_in_model(settings.peft_config(family_for(model.config).lora_targets), model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    ids, mask = padded_batch(side="right")
    labels = ids.masked_fill(mask == 0, -100)
    parts = split_model(copy.deepcopy(model), k, m)

    expected = model(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, 9), labels=labels
    )
    expected.loss.backward()
    logits = run_split(parts, ids, mask)
    loss = model.loss_function(logits, labels, vocab_size=model.config.vocab_size)
    loss.backward()

    torch.testing.assert_close(loss, expected.loss, atol=ATOL, rtol=0)
    assert_adapter_grads_equal(model, parts, ATOL)


def reference_prefix_forward(model, prefix_keys, prefix_values, ids, mask):  # type: ignore[no-untyped-def]
    """P-Tuning v2 on the unsplit model: every layer's prefix in front of its cache."""
    batch = ids.shape[0]
    cache = DynamicCache(config=model.config)
    for layer in range(prefix_keys.shape[0]):
        cache.update(
            prefix_keys[layer].unsqueeze(0).expand(batch, -1, -1, -1),
            prefix_values[layer].unsqueeze(0).expand(batch, -1, -1, -1),
            layer,
        )
    length = prefix_keys.shape[2]
    extended = torch.cat([mask.new_ones((batch, length)), mask], -1)
    return model(
        input_ids=ids,
        attention_mask=extended,
        position_ids=positions_from_mask(mask, ids.shape[1]),
        cache=cache,
        use_cache=True,
    ).logits


@pytest.mark.parametrize("family", ["llama", "glm4", "gpt2"])
def test_p_tuning_v2_split_equals_unsplit(family: str) -> None:
    model = tiny_model(family)
    model.requires_grad_(False)
    ids, mask = padded_batch(side="right")
    parts = split_model(copy.deepcopy(model), 2, 1)
    prefixes = [add_prefix(part, length=5) for part in parts]
    keys = torch.cat([p.keys.detach() for p in prefixes]).requires_grad_(True)
    values = torch.cat([p.values.detach() for p in prefixes]).requires_grad_(True)

    expected = reference_prefix_forward(model, keys, values, ids, mask)
    got = run_split(parts, ids, mask)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    expected.square().mean().backward()
    got.square().mean().backward()
    split_keys = torch.cat([p.keys.grad for p in prefixes])  # type: ignore[misc]
    split_values = torch.cat([p.values.grad for p in prefixes])  # type: ignore[misc]
    torch.testing.assert_close(split_keys, keys.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(split_values, values.grad, atol=ATOL, rtol=0)
    # The exported state names each block's prefix by its global index.
    names = set().union(*(adapter_state(part) for part in parts))
    assert {f"prefix.{i}.keys" for i in range(6)} <= names


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 3)])
def test_greedy_generation_equals_generate(family: str, k: int, m: int) -> None:
    model = tiny_model(family)
    ids, mask = padded_batch(side="left")
    expected = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[:, ids.shape[1] :]
    head, body, tail = split_model(copy.deepcopy(model), k, m)
    got = SplitGenerator(head, LocalStage(body), tail).generate(
        ids, mask, SamplingOptions(max_new_tokens=32)
    )
    assert torch.equal(got, expected)


def test_stop_tokens_repetition_penalty_and_sampling_equal_generate() -> None:
    model = tiny_model("llama")
    ids, mask = padded_batch(side="left")
    head, body, tail = split_model(copy.deepcopy(model), 1, 2)
    generator = SplitGenerator(head, LocalStage(body), tail)

    expected = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=[5, 7],
        repetition_penalty=1.3,
    )[:, ids.shape[1] :]
    got = generator.generate(
        ids, mask, SamplingOptions(max_new_tokens=32, stop_token_ids=(5, 7), repetition_penalty=1.3)
    )
    assert torch.equal(got, expected[:, : got.shape[1]])

    torch.manual_seed(7)
    expected = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=24,
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        pad_token_id=0,
        eos_token_id=None,
    )[:, ids.shape[1] :]
    torch.manual_seed(7)
    got = generator.generate(
        ids,
        mask,
        SamplingOptions(max_new_tokens=24, do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    )
    assert torch.equal(got, expected)


def test_finished_sequences_get_padding_and_generation_stops() -> None:
    model = tiny_model("llama")
    ids, mask = padded_batch(side="left")
    head, body, tail = split_model(copy.deepcopy(model), 1, 1)
    generator = SplitGenerator(head, LocalStage(body), tail)
    first = generator.generate(ids, mask, SamplingOptions(max_new_tokens=4))
    stop = int(first[0, 1])
    steps = list(
        generator.stream(
            ids, mask, SamplingOptions(max_new_tokens=10, stop_token_ids=(stop,), pad_token_id=0)
        )
    )
    assert steps[1].finished[0]
    assert all(int(s.tokens[0]) == 0 for s in steps[2:])


@pytest.mark.parametrize(
    ("k", "m", "message"), [(0, 1, "at least 1"), (3, 3, "less than the number")]
)
def test_bad_cut_points_are_refused(k: int, m: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SplitSpec(6, k, m)


def test_unknown_architectures_name_the_supported_families() -> None:
    from transformers import BertConfig

    with pytest.raises(ValueError, match=r"model type 'bert' is not supported.*glm.*gpt2.*llama"):
        family_for(BertConfig())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_split_is_close_to_half_precision_unsplit(dtype: torch.dtype) -> None:
    model = tiny_model("llama").to(dtype)
    ids, mask = padded_batch()
    expected = model(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, 9)
    ).logits
    got = run_split(split_model(copy.deepcopy(model), 2, 1), ids, mask)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
