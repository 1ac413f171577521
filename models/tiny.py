"""Tiny, random-initialised deployments for the demo and the tests: a byte-level BPE
tokenizer trained on a few lines, and a small causal LM saved with it. Nothing is
downloaded."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from splitfed.files import StrPath

# Package data of ``splitfed`` (splitfed/data/, see pyproject.toml): found in an editable
# and in an installed layout alike.
BUNDLED_DATASET = Path(str(resources.files("splitfed") / "data" / "tiny_instructions.jsonl"))
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes; pad=0, bos=1, eos=2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def pretrain(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    *,
    steps: int,
    seed: int = 0,
    learning_rate: float = 3e-3,
    batch_size: int = 16,
) -> float:
    """Full-parameter language-model training on ``texts``, so the tiny base model knows
    the words before it is fine-tuned; returns the last loss."""
    rows = [[tokenizer.bos_token_id, *tokenizer.encode(t), tokenizer.eos_token_id] for t in texts]
    length = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        pick = torch.randint(0, len(rows), (batch_size,), generator=generator)
        loss = model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def llama_config(
    vocab_size: int,
    hidden_size: int,
    layers: int,
    *,
    intermediate_size: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 512,
    pad_token_id: int | None = 0,
) -> LlamaConfig:
    """A Llama-layout config with the special ids of :data:`SPECIAL_TOKENS` (pad 0, bos 1,
    eos 2): the tiny checkpoints' (intermediate size 2 x ``hidden_size``) and, larger,
    the benchmarks' (bench/)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )


def make_tiny_checkpoint(
    directory: StrPath,
    texts: Iterable[str],
    *,
    layers: int = 6,
    hidden_size: int = 64,
    seed: int = 0,
    pretrain_texts: list[str] | None = None,
    pretrain_steps: int = 0,
) -> Path:
    """Save a random Llama-layout model and a tokenizer trained on ``texts``; with
    ``pretrain_texts``, first train the whole model on them for ``pretrain_steps``."""
    directory = Path(directory)
    tokenizer = train_tokenizer(texts)
    config = llama_config(len(tokenizer), hidden_size, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    if pretrain_texts and pretrain_steps:
        pretrain(model, tokenizer, pretrain_texts, steps=pretrain_steps, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
