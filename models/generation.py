"""Generation with a split KV cache: each part keeps the keys and values of its own
blocks, and after the prompt every step moves one position of hidden states.

The body is anything with ``step(hidden, attention_mask) -> hidden`` and ``reset()``:
:class:`LocalStage` for a body in this process, the backbone client for a remote one.
Sampling reuses transformers' logits processors, in the order ``generate`` applies them,
so greedy output equals the unsplit model's, and sampled output does for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from splitfed.models.masks import extend_mask
from splitfed.models.parts import Head, PartCache, SplitPart, Tail


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    def processors(self, attention_mask: torch.Tensor) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            # Left padding is not part of the prompt (as in transformers' generate).
            padding = (attention_mask != 0).int().argmax(dim=1)
            processors.append(
                RepetitionPenaltyLogitsProcessor(
                    self.repetition_penalty, prompt_ignore_length=padding
                )
            )
        if self.do_sample:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors


class BodyStage(Protocol):
    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def reset(self) -> None: ...


class LocalStage:
    """A part in this process with its own cache: one generation session."""

    def __init__(self, part: SplitPart) -> None:
        self.part = part
        self.cache: PartCache = part.new_cache()

    def step(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.part(inputs, attention_mask, self.cache)
        return output

    def reset(self) -> None:
        self.cache.reset()


@dataclass(frozen=True)
class GenerationStep:
    tokens: torch.Tensor  # [batch] the token chosen for each sequence at this step
    finished: torch.Tensor  # [batch] bool, sequences that have stopped


class SplitGenerator:
    """Runs head and tail here and the body wherever ``body`` runs it."""

    def __init__(self, head: Head, body: BodyStage, tail: Tail) -> None:
        self.head = LocalStage(head)
        self.body = body
        self.tail = tail
        self.tail_cache = tail.new_cache()

    def reset(self) -> None:
        self.head.reset()
        self.body.reset()
        self.tail_cache.reset()

    @torch.no_grad()
    def stream(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, options: SamplingOptions
    ) -> Iterator[GenerationStep]:
        """Yield each step's tokens; stops when every sequence has hit a stop token or
        ``max_new_tokens`` steps are done. Finished sequences get ``pad_token_id``."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError("input_ids and attention_mask must both be [batch, tokens]")
        self.reset()
        generator = None
        if options.seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(options.seed)
        processors = options.processors(attention_mask)
        stop = torch.tensor(options.stop_token_ids, dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        sequence, step_input, mask = input_ids, input_ids, attention_mask
        for _ in range(options.max_new_tokens):
            hidden = self.head.step(step_input, mask)
            hidden = self.body.step(hidden, mask)
            logits = self.tail(hidden, mask, self.tail_cache, logits_to_keep=1)
            scores = processors(cast(torch.LongTensor, sequence), logits[:, -1, :].float())
            if options.do_sample:
                probs = torch.softmax(scores, dim=-1)
                tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                tokens = scores.argmax(dim=-1)
            tokens = torch.where(finished, options.pad_token_id, tokens)
            finished = finished | torch.isin(tokens, stop)
            yield GenerationStep(tokens, finished.clone())
            if bool(finished.all()):
                return
            sequence = torch.cat([sequence, tokens[:, None]], dim=-1)
            step_input = tokens[:, None]
            mask = extend_mask(mask)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, options: SamplingOptions
    ) -> torch.Tensor:
        """The new tokens, ``[batch, steps]``."""
        steps = [s.tokens for s in self.stream(input_ids, attention_mask, options)]
        return torch.stack(steps, dim=1)
