"""Quantized parts (int8, NF4): split equals an unsplit model quantized the same way, for
every family, with LoRA and P-Tuning v2 training on top; loading quantizes from the
checkpoint one projection at a time; sizes; clear errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from modelkit import TINY_FAMILIES, padded_batch, tiny_config
from peft import inject_adapter_in_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from splitfed.models import family_for, positions_from_mask
from splitfed.models import quantization as quant
from splitfed.models.adapters import (
    AdapterSettings,
    LoraSettings,
    adapter_state,
    add_prefix,
)
from splitfed.models.families.chatglm import chatglm_mask
from splitfed.models.loading import load_part, load_trainable_ends
from splitfed.models.quantization import (
    QUANTIZATIONS,
    compute_dtype,
    quantization_of,
    quantize_modules,
    weight_bytes,
)

MODES = ("int8", "nf4")
CHATGLM = Path(__file__).resolve().parents[2] / "data" / "chatglm6b"
# Same machine, same kernels: the split runs the same quantized matmuls as the unsplit
# model, on the same rows.
ATOL = 1e-5


def save_tiny(family: str, path: Path, layers: int = 6, seed: int = 0) -> Path:
    """A tiny checkpoint with a hidden size of 64 (NF4 quantizes blocks of 64 weights)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, hidden=64)).eval()
    model.save_pretrained(str(path))
    return path


def unsplit(path: Path, mode: str, blocks: range | None = None) -> Any:
    """The whole model of ``path`` with the projections of ``blocks`` (all by default)
    quantized as the split quantizes them."""
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    family = family_for(model.config)
    layers = range(family.num_layers(model.config)) if blocks is None else blocks
    for index in layers:
        quantize_modules(model, family.layer_key(index).rstrip("."), mode)
    model.requires_grad_(False)
    return model


def parts_of(path: Path, k: int, m: int, client: str, body: str) -> list[Any]:
    return [
        load_part(path, name, k, m, quantization=mode)
        for name, mode in (("head", client), ("body", body), ("tail", client))
    ]


def batch_for(family: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, the 2-D mask that crosses the wire, and the unsplit model's keyword args."""
    ids, mask = padded_batch(side="left")
    return ids, mask, positions_from_mask(mask, ids.shape[1])


def run(parts: list[Any], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    head, body, tail = parts
    logits: torch.Tensor = tail(body(head(ids, mask), mask), mask)
    return logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {family: save_tiny(family, root / family) for family in TINY_FAMILIES}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_split_logits_equal_the_unsplit_model_quantized_the_same_way(
    checkpoints: dict[str, Path], family: str, mode: str
) -> None:
    path = checkpoints[family]
    ids, mask, positions = batch_for(family)
    expected = unsplit(path, mode)(input_ids=ids, attention_mask=mask, position_ids=positions)
    parts = parts_of(path, 2, 1, mode, mode)
    assert [quantization_of(p) for p in parts] == [mode] * 3
    got = run(parts, ids, mask.to(torch.int8))
    torch.testing.assert_close(got, expected.logits, atol=ATOL, rtol=0)
    # Quantizing changes the outputs (the test would not see a silent no-op).
    plain = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    dense = plain(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert not torch.allclose(got, dense, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_a_quantized_body_between_full_precision_client_parts(
    checkpoints: dict[str, Path], mode: str
) -> None:
    path = checkpoints["llama"]
    ids, mask, positions = batch_for("llama")
    expected = unsplit(path, mode, blocks=range(1, 5))
    want = expected(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    parts = parts_of(path, 1, 1, "none", mode)
    assert [quantization_of(p) for p in parts] == ["none", mode, "none"]
    torch.testing.assert_close(run(parts, ids, mask), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_chatglm_quantizes(mode: str) -> None:
    config = AutoModelForCausalLM.from_pretrained(str(CHATGLM), local_files_only=True).config
    reference = load_file(str(CHATGLM / "reference.safetensors"))
    ids = reference["input_ids"]
    mask = chatglm_mask(ids, reference["valid_positions"], config)
    expected = unsplit(CHATGLM, mode)(input_ids=ids, attention_mask=mask).logits
    parts = parts_of(CHATGLM, 1, 1, mode, mode)
    torch.testing.assert_close(run(parts, ids, mask), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_on_quantized_parts_trains_like_the_unsplit_model(
    checkpoints: dict[str, Path], family: str, mode: str
) -> None:
    """QLoRA: the loss and every adapter gradient of the split equal the unsplit model's,
    both quantized, and the adapters' tensors are floating point."""
    path = checkpoints[family]
    settings = LoraSettings(r=4, alpha=8, init=False)
    model = unsplit(path, mode)
    torch.manual_seed(1)
    inject_adapter_in_model(settings.peft_config(family_for(model.config).lora_targets), model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    parts = parts_of(path, 2, 2, mode, mode)
    expected_state = {
        name.replace(".default", ""): p for name, p in model.named_parameters() if ".lora_" in name
    }
    from splitfed.models.adapters import add_lora, load_adapter_state

    for part in parts:
        add_lora(part, settings)
        load_adapter_state(part, {k: v.detach() for k, v in expected_state.items()})
        assert all(t.is_floating_point() for t in adapter_state(part).values())
    ids, mask, positions = batch_for(family)
    labels = ids.masked_fill(mask == 0, -100)
    expected = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
    expected.loss.backward()
    logits = run(parts, ids, mask)
    loss = model.loss_function(logits, labels, vocab_size=model.config.vocab_size)
    loss.backward()
    torch.testing.assert_close(loss, expected.loss, atol=ATOL, rtol=0)
    grads = {name: p.grad for name, p in expected_state.items()}
    compared = 0
    for part in parts:
        for name, grad in adapter_state(part, grads=True).items():
            torch.testing.assert_close(grad, grads[name], atol=ATOL, rtol=0)
            compared += 1
    assert compared == len(grads) > 0


@pytest.mark.parametrize("mode", MODES)
def test_load_trainable_ends_quantizes_the_client_blocks(
    checkpoints: dict[str, Path], mode: str
) -> None:
    head, tail, params = load_trainable_ends(
        checkpoints["llama"], AdapterSettings(r=4), 1, 1, quantization=mode
    )
    assert quantization_of(head) == quantization_of(tail) == mode
    assert params and all(p.is_floating_point() and p.requires_grad for p in params)
    # The embeddings and the LM head stay in full precision.
    assert head.base.embed_tokens.weight.dtype == torch.float32
    assert isinstance(tail.lm_head, torch.nn.Linear)


@pytest.mark.parametrize("mode", MODES)
def test_a_prefix_on_a_quantized_part_is_floating_point(
    checkpoints: dict[str, Path], mode: str
) -> None:
    body = load_part(checkpoints["llama"], "body", 1, 1, quantization=mode)
    prefix = add_prefix(body, 4)
    assert prefix.keys.dtype == compute_dtype(body) == torch.float32
    hidden = torch.randn(2, 5, 64, requires_grad=True)
    out = body(hidden, torch.ones(2, 5, dtype=torch.int8))
    out.sum().backward()
    assert prefix.keys.grad is not None and hidden.grad is not None


def test_sizes_of_a_quantized_body(tmp_path: Path) -> None:
    """Weights of a body per mode against bfloat16 (the projections hold nearly all)."""
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    sizes = {
        mode: weight_bytes(load_part(tmp_path, "body", 1, 1, quantization=mode))
        for mode in QUANTIZATIONS
    }
    bf16 = weight_bytes(load_part(tmp_path, "body", 1, 1, dtype=torch.bfloat16))
    assert sizes["none"] == pytest.approx(2 * bf16, rel=0.01)  # float32: twice bfloat16
    assert sizes["int8"] / bf16 <= 0.55
    assert sizes["nf4"] / bf16 <= 0.35


def test_loading_holds_one_projection_in_full_precision_at_a_time(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each projection is quantized as soon as its tensors are read: never more than one
    dense projection's tensors wait."""
    from splitfed.models import loading

    waiting: list[int] = []
    take = loading._Quantizer.take

    def spy(self: Any, name: str, tensor: torch.Tensor) -> bool:
        kept = take(self, name, tensor)
        waiting.append(len(self.pending))
        return kept

    monkeypatch.setattr(loading._Quantizer, "take", spy)
    body = load_part(checkpoints["llama"], "body", 1, 1, quantization="nf4")
    assert quantization_of(body) == "nf4"
    assert waiting and max(waiting) <= 1


def test_a_projection_of_the_wrong_shape_is_refused(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    path = tmp_path / "bad"
    shutil.copytree(checkpoints["llama"], path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(8, 64)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"q_proj.weight has shape \[8, 64\], expected \[64, 64\]"):
        load_part(path, "body", 1, 1, quantization="int8")


def test_an_unknown_quantization_is_refused(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="quantization must be one of none, int8, nf4; got 'fp8'"):
        load_part(checkpoints["llama"], "body", 1, 1, quantization="fp8")


def test_quantize_modules_is_a_no_op_for_none() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = copy.deepcopy(module)
    assert quantize_modules(module, "", "none") == []
    assert type(module[0]) is torch.nn.Linear
    torch.testing.assert_close(module[0].weight, before[0].weight)
    assert quant.quantization_of(module) == "none"
