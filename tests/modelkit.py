"""Tiny random causal LMs for model tests (importable as ``modelkit``; needs only torch,
transformers and peft, so the model tests also run where the service stack is absent)."""

from __future__ import annotations

from typing import Any

# --- tiny random causal LMs, built from Hugging Face configs in the test itself -------

TINY_FAMILIES = ("llama", "qwen2", "mistral", "glm", "glm4", "gpt2")


def tiny_config(family: str, layers: int = 6, hidden: int = 32) -> Any:
    """A tiny config of ``family``: 4 attention heads over ``hidden`` (32; 64 where NF4's
    blocks of 64 weights need it)."""
    import transformers as tf

    common = {
        "vocab_size": 128,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":  # sliding-window attention in the upper layers
        return tf.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=6, max_window_layers=layers // 2
        )
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=6)
    if family == "glm":
        return tf.GlmConfig(**common, head_dim=hidden // 4)
    if family == "glm4":
        return tf.Glm4Config(**common, head_dim=hidden // 4)
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=128,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(family)


def tiny_model(family: str, layers: int = 6, seed: int = 0) -> Any:
    """A random-initialised causal LM in eval mode, with untied-by-default settings of
    its family (GPT-2 ties its lm head to the embeddings)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, layers)).eval()


def padded_batch(
    seed: int = 0, batch: int = 3, tokens: int = 9, side: str = "left"
) -> tuple[Any, Any]:
    """Token ids and a 2-D mask with different amounts of padding per sequence."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, tokens), generator=gen)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for row in range(1, batch):
        pad = min(tokens - 1, 2 * row + 1)
        if side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, tokens - pad :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def assert_adapter_grads_equal(model: Any, parts: Any, atol: float = 1e-5) -> int:
    """Every adapter gradient of the split parts equals the unsplit model's (by global
    name); returns how many were compared."""
    import torch

    from splitfed.models.adapters import adapter_state

    reference = {
        name.replace(".default", ""): p.grad
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    grads: dict[str, Any] = {}
    for part in parts:
        grads.update(adapter_state(part, grads=True))
    assert set(grads) == set(reference) and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], atol=atol, rtol=0, msg=name)
    return len(grads)


# --- sessions' adapted bodies over one frozen body (multi-adapter, continuous batching) --

from splitfed.models.adapters import AdapterSettings  # noqa: E402

HIDDEN = 32
# Distinct seeds, ranks and alphas: each session's adapter is its own.
SESSIONS = (
    AdapterSettings(kind="lora", r=4, alpha=8, seed=11),
    AdapterSettings(kind="lora", r=4, alpha=4, seed=12),
    AdapterSettings(kind="lora", r=2, alpha=8, seed=13),
    AdapterSettings(kind="lora", r=4, alpha=16, seed=14),
)
# Each session's micro-batch: (rows, tokens), padded differently.
SHAPES = ((2, 6), (1, 4), (3, 7), (2, 4))


def shared_body() -> Any:
    """The frozen body of a tiny 4-layer llama (k=1, m=1: two blocks), as SharedBody."""
    from splitfed.models import split_model

    body = split_model(tiny_model("llama", layers=4), 1, 1).body
    body.requires_grad_(False)
    return body


def session_body(frozen: Any, settings: AdapterSettings) -> Any:
    """A session's body as SharedBody.body_for makes it: the blocks' frozen tensors are
    shared, the adapter is the session's own (:func:`with_session_adapter`)."""
    import copy

    from splitfed.models.quantization import frozen_memo

    return with_session_adapter(copy.deepcopy(frozen, frozen_memo(frozen)), settings)


def with_session_adapter(body: Any, settings: AdapterSettings) -> Any:
    """``body`` with ``settings``' adapter, its LoRA B drawn at random (not zero) so that
    every adapter tensor gets a non-trivial gradient from the first step."""
    import torch

    from splitfed.models.adapters import adapter_state

    settings.apply(body)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        for name, tensor in adapter_state(body).items():
            if ".lora_B." in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return body


def micro_batch(seed: int, rows: int, tokens: int) -> Any:
    """h1 ``[rows, tokens, HIDDEN]`` and a mask with left padding in some rows, right
    padding in others."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, tokens, HIDDEN, generator=generator)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    for row in range(1, rows):
        pad = min(tokens - 1, row + 1)
        if row % 2:
            mask[row, :pad] = 0
        else:
            mask[row, tokens - pad :] = 0
    return hidden, mask
