"""The U-shaped split of a causal LM into head, body and tail.

    head = embeddings + blocks[0:k]      (client)
    body = blocks[k:L-m]                 (backbone)
    tail = blocks[L-m:L] + norm + lm head (client)

Every part wraps an instance of the architecture's own base model class (``AutoModel``)
that holds only the part's blocks: the head keeps the input embeddings, the tail the
final norm, and the others replace what they lack with identities. Each part therefore
builds attention masks, rotary positions and its KV cache exactly as the unsplit model
does, and split outputs equal unsplit ones. Between parts only two tensors travel:
hidden states ``[batch, tokens, hidden]`` and the 2-D padding mask
``[batch, past + tokens]``; each side rebuilds positions and causal masks from the mask.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache

from splitfed.models.families import Family, family_for
from splitfed.models.masks import check_mask

if TYPE_CHECKING:
    from splitfed.models.adapters import PrefixEncoder

PartName = Literal["head", "body", "tail"]
PARTS: tuple[PartName, ...] = ("head", "body", "tail")


@dataclass(frozen=True)
class SplitSpec:
    """Where a model of ``num_layers`` blocks is cut: ``k`` blocks in the head, ``m`` in
    the tail, the rest (at least one) in the body."""

    num_layers: int
    k: int = 1
    m: int = 1

    def __post_init__(self) -> None:
        if self.k < 1 or self.m < 1:
            raise ValueError(f"k and m must be at least 1, got k={self.k}, m={self.m}")
        if self.k + self.m >= self.num_layers:
            raise ValueError(
                f"k + m must be less than the number of layers ({self.num_layers}) so the "
                f"body keeps at least one; got k={self.k}, m={self.m}"
            )

    def layers(self, part: PartName) -> range:
        if part == "head":
            return range(0, self.k)
        if part == "body":
            return range(self.k, self.num_layers - self.m)
        if part == "tail":
            return range(self.num_layers - self.m, self.num_layers)
        raise ValueError(f"unknown part {part!r}; expected one of {', '.join(PARTS)}")


def part_config(config: PretrainedConfig, family: Family, layers: range) -> PretrainedConfig:
    """A copy of ``config`` describing only ``layers`` (counts and per-layer lists)."""
    total = family.num_layers(config)
    sub = copy.deepcopy(config)
    setattr(sub, family.num_layers_attr, len(layers))
    for name in family.per_layer_config:
        values = getattr(config, name, None)
        if isinstance(values, list | tuple) and len(values) == total:
            setattr(sub, name, list(values)[layers.start : layers.stop])
    return sub


def _reindex(layers: Iterable[nn.Module]) -> None:
    """Blocks address their KV-cache slot by ``layer_idx``; a part's cache is its own."""
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                setattr(module, "layer_idx", index)  # noqa: B010


_meta = threading.local()
_patch_lock = threading.Lock()
_original_register_parameter = nn.Module.register_parameter


def _register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _original_register_parameter(self, name, param)
    if param is not None and getattr(_meta, "active", False):
        current = self._parameters[name]
        assert current is not None
        extra = dict(current.__dict__)
        extra["requires_grad"] = current.requires_grad
        self._parameters[name] = type(current)(current.to("meta"), **extra)


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Parameters of modules built in this block land on the meta device (buffers stay
    real), like accelerate's ``init_empty_weights`` but for this thread only: building
    a part never disturbs modules that other threads build at the same time."""
    with _patch_lock:
        if nn.Module.register_parameter is not _register_parameter:
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
    previous = getattr(_meta, "active", False)
    _meta.active = True
    try:
        yield
    finally:
        _meta.active = previous


def empty_base(
    config: PretrainedConfig, family: Family, part: PartName, layers: range
) -> nn.Module:
    """The part's base model with parameters on the meta device (nothing allocated);
    buffers such as rotary frequencies are real."""
    sub = part_config(config, family, layers)
    with meta_parameters():
        base = family.build_base(sub)
    if part != "head":
        family.drop_embeddings(base, sub)
    if part != "tail":
        setattr(base, family.norm_attr, nn.Identity())
    return base


class PartCache:
    """One part's KV cache for one generation session.

    Holds the keys and values of the part's own blocks only (and, with P-Tuning v2, the
    part's prefix). ``length`` counts the sequence positions seen so far, padding
    included, which is what the 2-D mask of the next step must extend.
    """

    def __init__(self, config: PretrainedConfig) -> None:
        self._config = config
        self.kv = DynamicCache(config=config)
        self.prefix_length = 0

    @property
    def length(self) -> int:
        return int(self.kv.get_seq_length()) - self.prefix_length

    @property
    def batch(self) -> int | None:
        """Rows the cache holds (None while it is empty): later steps must have as many."""
        for layer in self.kv.layers:
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor) and keys.dim() == 4:
                return int(keys.shape[0])
        return None

    def reset(self) -> None:
        self.kv = DynamicCache(config=self._config)
        self.prefix_length = 0

    def trim(self, length: int) -> None:
        """Forget everything after the first ``length`` positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot trim a cache of {self.length} positions to {length}")
        if length == 0:
            self.reset()
        elif length < self.length:
            self.kv.crop(length - self.length)  # transformers 5 crops by -tokens_to_remove

    def nbytes(self) -> int:
        total = 0
        for layer in self.kv.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total


class SplitPart(nn.Module):
    """Common machinery of :class:`Head`, :class:`Body` and :class:`Tail`."""

    part: PartName

    def __init__(
        self,
        family: Family,
        config: PretrainedConfig,
        spec: SplitSpec,
        base: nn.Module,
        lm_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.spec = spec
        self.layer_range = spec.layers(self.part)
        self.part_config = part_config(config, family, self.layer_range)
        self.base = base
        self.lm_head = lm_head
        # A P-Tuning v2 prefix for this part's blocks, set by splitfed.models.adapters.
        self.prefix: PrefixEncoder | None = None
        _reindex(family.layers(base))
        meta = [name for name, p in self.named_parameters() if p.is_meta]
        if meta:
            raise ValueError(f"{self.part} has parameters without data: {', '.join(meta[:5])}")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.family.layers(self.base)

    def new_cache(self) -> PartCache:
        return PartCache(self.part_config)

    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: PartCache | None = None,
    ) -> torch.Tensor:
        """The hidden states after this part's blocks; ``inputs``: token ids (the head)
        or the hidden states of the part before."""
        batch, tokens = inputs.shape[0], inputs.shape[1]
        check_mask(attention_mask, batch, tokens)
        past = cache.length if cache is not None else 0
        if attention_mask.shape[1] != past + tokens:
            raise ValueError(
                f"attention mask covers {attention_mask.shape[1]} positions but the cache holds "
                f"{past} and this step brings {tokens}"
            )
        positions = self.family.positions(attention_mask, tokens)
        kv = cache.kv if cache is not None else None
        mask = attention_mask
        if self.prefix is not None:
            # The prefix lives in the cache, in front of every sequence; it never travels.
            if kv is None:
                kv = DynamicCache(config=self.part_config)
            if cache is None or cache.prefix_length == 0:
                length = self.prefix.fill(kv, batch)
                if cache is not None:
                    cache.prefix_length = length
            prefix_length = cache.prefix_length if cache is not None else self.prefix.length
            mask = torch.cat([attention_mask.new_ones((batch, prefix_length)), attention_mask], -1)
        takes_ids = self.part == "head"  # the head embeds token ids; the others get hidden states
        output = self.base(
            input_ids=inputs if takes_ids else None,
            inputs_embeds=None if takes_ids else inputs,
            attention_mask=mask,
            position_ids=positions,
            cache=kv,
            use_cache=kv is not None,
        )
        hidden: torch.Tensor = output.last_hidden_state
        return hidden


class Head(SplitPart):
    """Embeddings and the first ``k`` blocks: token ids in, hidden states out."""

    part = "head"


class Body(SplitPart):
    """The middle blocks: hidden states in, hidden states out."""

    part = "body"


class Tail(SplitPart):
    """The last ``m`` blocks, the final norm and the lm head: hidden states in, logits out."""

    part = "tail"

    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: PartCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits for every position, or only the last ``logits_to_keep`` (generation
        needs one: the lm head is the costliest matmul of a decoding step)."""
        hidden = super().forward(inputs, attention_mask, cache)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        assert self.lm_head is not None
        logits: torch.Tensor = self.lm_head(hidden)
        return logits


PART_CLASSES: dict[PartName, type[SplitPart]] = {"head": Head, "body": Body, "tail": Tail}


class SplitModel(NamedTuple):
    head: Head
    body: Body
    tail: Tail


def split_model(model: PreTrainedModel, k: int = 1, m: int = 1) -> SplitModel:
    """Cut an in-memory causal LM into head, body and tail.

    The parts take the model's own modules (no copy), so the model itself must not be
    used afterwards; split a ``copy.deepcopy`` to keep it. Parts start in the model's
    train/eval mode.
    """
    config = model.config
    family = family_for(config)
    spec = SplitSpec(family.num_layers(config), k, m)
    source = getattr(model, family.base_attr)
    layers = family.layers(source)
    parts: dict[PartName, SplitPart] = {}
    for name in PARTS:
        span = spec.layers(name)
        base = empty_base(config, family, name, span)
        family.set_layers(base, [layers[i] for i in span])
        if name == "head":
            for attr in family.embed_attrs:
                setattr(base, attr, getattr(source, attr))
        if name == "tail":
            setattr(base, family.norm_attr, getattr(source, family.norm_attr))
        lm_head = model.get_output_embeddings() if name == "tail" else None  # type: ignore[no-untyped-call]
        parts[name] = PART_CLASSES[name](family, config, spec, base, lm_head).train(model.training)
    return SplitModel(parts["head"], parts["body"], parts["tail"])  # type: ignore[arg-type]
