"""Continuous batching of generation: one forward of a body for the next positions of
several generation sessions, each with its own KV cache.

Every session keeps its own :class:`~splitfed.models.parts.PartCache` (its own length,
its own padding, joining and leaving between steps). For a merged pass the caches are
laid side by side in one temporary cache, each row as

    [zeros up to the longest past] [its past] [its new positions] [zeros up to the longest step]

with the 2-D mask 0 at every added slot. Positions come from each session's own mask
(as alone), so real tokens see exactly the keys and values they see alone: the added
slots in front are masked, the ones behind come later (causal). After the pass each
session's cache takes the keys and values of its own new positions, and its rows of the
output are cut back to its own length. Decode steps (one new position each) and chunks
of prompts (several) merge the same way; a pass costs rows x the longest step.

Only full-attention caches merge (a sliding-window cache forgets positions and has no
slot for the padding); :func:`mergeable` says which. The family must take padding
anywhere in the mask (``Family.pads_anywhere``); families that do not merge only
sessions at the same past and step lengths (no slot added).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from splitfed.models.adapters import PrefixEncoder
from splitfed.models.families import Family
from splitfed.models.parts import PartCache

# (hidden [rows, T, H], 2-D mask [rows, P + T], positions [rows, T], cache of P) -> h2
BaseRun = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]


@dataclass(eq=False)
class CachedStep:
    """One session's part of a merged pass: ``hidden`` ``[rows, t, H]`` after what its
    ``cache`` holds, ``mask`` ``[rows, cache.length + t]`` as the session sent it, and
    the P-Tuning v2 ``prefix`` its body puts in front of its cache (None: no prefix)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    cache: PartCache
    prefix: PrefixEncoder | None = None

    @property
    def rows(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[1])


def mergeable(cache: PartCache) -> bool:
    """Whether ``cache`` can be laid beside others (full-attention layers only)."""
    return all(type(layer) is DynamicLayer for layer in cache.kv.layers)


def _past(step: CachedStep) -> int:
    """Positions the session's cache holds, its prefix included (filled first)."""
    if step.prefix is not None and step.cache.prefix_length == 0:
        step.cache.prefix_length = step.prefix.fill(step.cache.kv, step.rows)
    return int(step.cache.kv.get_seq_length())


def _tensors(kv: DynamicCache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values layer ``index`` of ``kv`` holds (``[rows, heads, length, dim]``)."""
    layer = kv.layers[index]
    assert isinstance(layer, DynamicLayer) and layer.keys is not None
    assert layer.values is not None
    return layer.keys, layer.values


def _merged_cache(steps: Sequence[CachedStep], pasts: list[int], longest: int) -> DynamicCache:
    kv = DynamicCache()
    if longest == 0:
        return kv
    # The geometry of a layer's keys from a session whose cache holds some.
    shaped = next(s for s, past in zip(steps, pasts, strict=True) if past)
    for index in range(len(shaped.cache.kv.layers)):
        like = _tensors(shaped.cache.kv, index)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for step, past in zip(steps, pasts, strict=True):
            for merged, own, template in zip(
                (keys, values), _tensors(step.cache.kv, index) if past else like, like, strict=True
            ):
                if past:
                    merged.append(F.pad(own, (0, 0, longest - past, 0)))
                else:
                    heads, dim = template.shape[1], template.shape[3]
                    merged.append(template.new_zeros((step.rows, heads, longest, dim)))
        kv.update(torch.cat(keys), torch.cat(values), index)
    return kv


def base_run(base: nn.Module) -> BaseRun:
    """``run`` for a part's base model (``SplitPart.base``), called as its forward calls
    it."""

    def run(
        hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv: DynamicCache
    ) -> torch.Tensor:
        output = base(
            input_ids=None,
            inputs_embeds=hidden,
            attention_mask=mask,
            position_ids=positions,
            cache=kv,
            use_cache=True,
        )
        result: torch.Tensor = output.last_hidden_state
        return result

    return run


def merged_cached_pass(
    family: Family, steps: Sequence[CachedStep], run: BaseRun
) -> list[torch.Tensor]:
    """Each session's h2 for its step, from ONE call of ``run`` over all of them; each
    session's cache then holds its new positions, as if it had run alone."""
    if not steps:
        return []
    pasts = [_past(step) for step in steps]
    longest_past = max(pasts)
    longest = max(step.tokens for step in steps)
    hidden, masks, positions = [], [], []
    for step, past in zip(steps, pasts, strict=True):
        own_past = step.mask.shape[1] - step.tokens
        if own_past != past - step.cache.prefix_length:
            raise ValueError(
                f"the mask covers {step.mask.shape[1]} positions but the cache holds "
                f"{past - step.cache.prefix_length} and this step brings {step.tokens}"
            )
        behind = longest - step.tokens
        hidden.append(F.pad(step.hidden, (0, 0, 0, behind)))
        seen = step.mask.new_ones((step.rows, step.cache.prefix_length))
        masks.append(F.pad(torch.cat([seen, step.mask], -1), (longest_past - past, behind)))
        own = family.positions(step.mask, step.tokens)
        positions.append(F.pad(own, (0, behind), value=1))
    kv = _merged_cache(steps, pasts, longest_past)
    output = run(torch.cat(hidden), torch.cat(masks), torch.cat(positions), kv)
    results, start = [], 0
    for step in steps:
        rows = slice(start, start + step.rows)
        new = slice(longest_past, longest_past + step.tokens)
        for index in range(len(kv.layers)):
            keys, values = _tensors(kv, index)
            step.cache.kv.update(keys[rows, :, new], values[rows, :, new], index)
        results.append(output[rows, : step.tokens])
        start += step.rows
    return results
