"""ChatGLM-6B (THUDM/chatglm-6b, the original GLM-130B-style 6B model; not ChatGLM2/3),
implemented natively: transformers 5 cannot run the published remote code.

One module on purpose (it is long): the family is one published model, and its mask,
positions, block and loading rules must agree with each other bit for bit; split apart,
the invariants below would be checked in no single place.

Layout: ``transformer`` holds ``word_embeddings``, ``layers`` (GLM blocks) and
``final_layernorm``; ``lm_head`` is tied to the embeddings. What sets it apart:

* **Prompt mask.** The prompt up to and including ``[gMASK]`` (everything before the first
  ``<sop>`` = bos) is attended bidirectionally; ``<sop>`` and everything after it is causal.
  On the wire this travels in the 2-D mask itself: 0 = padding, 2 = context token,
  1 = causal token (:func:`chatglm_mask` builds it from token ids). Key ``j`` is visible to
  query ``i`` iff ``mask[j] != 0`` and (``j <= i`` or ``mask[j] == 2``); padding queries see
  nothing (uniform attention, as in the published code, whose masked logits are finite).
  Tokens appended during generation get 1, which is exactly what
  :func:`splitfed.models.masks.extend_mask` appends.
* **2-D positions** ``[batch, 2, T]``: position ids (0.. over the context, then the position
  of ``[gMASK]`` for every later token) and block position ids (0 over the context, then
  1, 2, ...), rotated into the two halves of each head. :func:`chatglm_positions` rebuilds
  them from the 2-D mask alone, so parts without token ids agree with the head.
* **Blocks** scale the *normalised* input of both residual branches by
  ``sqrt(2 * residual_num_layers)`` (28 for every published config), use a fused,
  per-head interleaved ``query_key_value``, tanh-GELU MLP, rotary frequencies rounded to
  float16 and Megatron's query-key layer scaling (``coeff = global layer index + 1``).

Internally the blocks work sequence-first, in the published operation order, so float32
outputs equal the published model's bit for bit when both run on the same CPU with the
same kernels. Across CPUs the BLAS and vector kernels round differently, and the tiny test
model amplifies that to a few 1e-4 in its logits (tests/data/chatglm6b/README.md). The KV
cache is a transformers ``DynamicCache`` holding rotated keys and values as
``[batch, heads, seq, head_dim]``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from splitfed.models.families.base import Family, register_family

MODEL_TYPE = "chatglm"
PADDING, CAUSAL, CONTEXT = 0, 1, 2
# Masked attention logits before the layer scaling (finite, as published: a query that
# sees nothing attends uniformly instead of producing NaN).
MASKED_SCORE = -10000.0
# Config fields of ChatGLM2/ChatGLM3/GLM-4 remote code, which shares model_type "chatglm".
_LATER_GENERATION_FIELDS = (
    "padded_vocab_size",
    "multi_query_attention",
    "kv_channels",
    "ffn_hidden_size",
    "rmsnorm",
)


class ChatGLMConfig(PretrainedConfig):  # type: ignore[no-untyped-call]
    """The configuration of ChatGLM-6B; field names as in its ``config.json``, defaults
    those of THUDM/chatglm-6b."""

    model_type = MODEL_TYPE
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_layers",
        "max_position_embeddings": "max_sequence_length",
        "intermediate_size": "inner_hidden_size",
    }

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int | None = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 130004
    eos_token_id: int | list[int] | None = 130005
    pad_token_id: int | None = 3
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    tie_word_embeddings: bool = True
    # The published GLMBlock computes its residual scale from a ``num_layers`` argument
    # that defaults to 28 and is never passed, so alpha = sqrt(2 * 28) for every config.
    residual_num_layers: int = 28
    # Global index of each block (its attention scaling coefficient is index + 1). Filled
    # with 0..num_layers-1; the config of a split part holds the slice of its blocks.
    layer_ids: list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.layer_ids is None:
            self.layer_ids = list(range(self.num_layers))
        super().__post_init__(**kwargs)  # type: ignore[no-untyped-call]


def check_chatglm_config(config: PretrainedConfig) -> None:
    """Raise ``ValueError`` for ChatGLM configurations this implementation cannot run."""
    later = [name for name in _LATER_GENERATION_FIELDS if getattr(config, name, None) is not None]
    if later:
        raise ValueError(
            f"this chatglm config has {', '.join(later)}: it is ChatGLM2/ChatGLM3/GLM-4, whose "
            "architecture differs; only the original ChatGLM-6B is supported"
        )
    if not getattr(config, "position_encoding_2d", True):
        raise ValueError("ChatGLM-6B with position_encoding_2d=false (1-D rotary) is not supported")
    if getattr(config, "quantization_bit", 0):
        raise ValueError(
            f"quantization_bit={config.quantization_bit} checkpoints (ChatGLM's own int4/int8 "
            "kernels) are not supported; load the float16 checkpoint and set quantization = "
            '"int8" or "nf4" (splitfed quantizes it while loading)'
        )
    if getattr(config, "pre_seq_len", None) is not None:
        raise ValueError(
            "ChatGLM's built-in P-Tuning v2 prefix encoder (pre_seq_len) is not supported; "
            "use splitfed.models.adapters.add_prefix on the split parts instead"
        )
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    if hidden % (4 * heads) != 0:
        raise ValueError(
            f"hidden_size ({hidden}) must be a multiple of 4 * num_attention_heads ({heads}) "
            "for the 2-D rotary embedding"
        )
    layer_ids = getattr(config, "layer_ids", None)
    if layer_ids is not None and len(layer_ids) != int(config.num_layers):
        raise ValueError(
            f"layer_ids has {len(layer_ids)} entries but num_layers is {config.num_layers}"
        )


# --- what crosses the wire: the 2-D mask, and the positions rebuilt from it ---------------


def chatglm_mask(
    input_ids: torch.Tensor, padding_mask: torch.Tensor | None, config: PretrainedConfig
) -> torch.Tensor:
    """The 2-D ChatGLM mask of a (padded) batch: 2 for the context (every token before the
    first ``<sop>``), 1 for ``<sop>`` and what follows, 0 for padding; ``int8``.

    Each row with tokens must hold a ``<sop>`` (bos) preceded by the ``[gMASK]`` (or, in a
    row without one, the ``[MASK]``) that the published model takes as the position of
    every later token, as the published tokenizer builds prompts. Left and right padding
    both work.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got {list(input_ids.shape)}")
    real = (
        torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask != 0
    )
    if real.shape != input_ids.shape:
        raise ValueError(
            f"padding mask {list(real.shape)} does not match input_ids {list(input_ids.shape)}"
        )
    bos = (input_ids == int(config.bos_token_id)) & real
    context = (bos.long().cumsum(-1) == 0) & real
    for row in range(input_ids.shape[0]):
        if not bool(real[row].any()):
            continue
        if not bool(bos[row].any()):
            raise ValueError(
                f"row {row} has no <sop> (bos_token_id {config.bos_token_id}): ChatGLM prompts "
                "end with [gMASK] <sop>"
            )
        tokens = input_ids[row][real[row]].tolist()
        length = int(context[row].sum())
        gmask, mask = int(config.gmask_token_id), int(config.mask_token_id)
        marker = gmask if gmask in tokens else mask
        if length == 0 or marker not in tokens or tokens.index(marker) != length - 1:
            raise ValueError(
                f"row {row}: the token before <sop> must be the first [gMASK] ({gmask}), or "
                f"[MASK] ({mask}) in a row without [gMASK]; other prompt layouts cannot be "
                "described by the 2-D mask"
            )
    out = torch.where(context, CONTEXT, CAUSAL)
    return out.masked_fill(~real, PADDING).to(torch.int8)


def _check_values(attention_mask: torch.Tensor) -> None:
    if attention_mask.dim() != 2:
        raise ValueError(
            f"ChatGLM takes a 2-D mask [batch, positions] (0 pad, 1 causal, 2 context), got "
            f"{list(attention_mask.shape)}"
        )
    if attention_mask.dtype == torch.bool:
        raise ValueError("ChatGLM masks are integer: 0 pad, 1 causal, 2 context (see chatglm_mask)")
    if bool(((attention_mask < PADDING) | (attention_mask > CONTEXT)).any()):
        raise ValueError("ChatGLM mask values must be 0 (pad), 1 (causal) or 2 (context)")


def chatglm_positions(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """ChatGLM's 2-D position ids ``[batch, 2, query_length]`` of the last ``query_length``
    positions of a ChatGLM mask (see :func:`chatglm_mask`).

    Row 0 counts context tokens from 0 and gives every later token the position of the
    last context token (``[gMASK]``); row 1 is 0 over the context and counts 1, 2, ... from
    ``<sop>``. Padding gets (0, 0). This is what the published tokenizer builds (on the
    unpadded prompt, then padded) and its generation loop extends.
    """
    _check_values(attention_mask)
    mask = attention_mask.long()
    real = mask != PADDING
    context = mask == CONTEXT
    causal = real & ~context
    lengths = context.sum(-1, keepdim=True)
    if bool(((lengths == 0) & real.any(-1, keepdim=True)).any()):
        raise ValueError(
            "a ChatGLM mask row has tokens but no context (2): build prompt masks with "
            "chatglm_mask (the prompt up to [gMASK] is 2, <sop> and later tokens 1)"
        )
    in_context = context.long().cumsum(-1) - 1
    position = torch.where(context, in_context, (lengths - 1).expand_as(mask))
    position = position.masked_fill(~real, 0)
    block = torch.where(causal, causal.long().cumsum(-1), 0)
    return torch.stack([position, block], dim=1)[..., -query_length:]


def chatglm_blocked(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """The 4-D boolean mask ``[batch, 1, query_length, keys]`` (True = blocked) of the
    last ``query_length`` positions of a ChatGLM 2-D mask."""
    _check_values(attention_mask)
    keys = attention_mask.shape[1]
    real = attention_mask != PADDING
    context = attention_mask == CONTEXT
    key_index = torch.arange(keys, device=attention_mask.device)
    query_index = key_index[keys - query_length :]
    earlier = key_index[None, :] <= query_index[:, None]  # [T, S]
    visible = real[:, None, :] & (earlier[None] | context[:, None, :])
    visible = visible & real[:, keys - query_length :, None]
    return ~visible[:, None]


# --- the model ---------------------------------------------------------------------------


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, in the published operation order."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary2D(NamedTuple):
    """cos and sin of ChatGLM's 2-D rotary embedding for each token, ``[T, B, 1, dim]``:
    of the position (first half of each head) and of the block position (second half)."""

    cos_position: torch.Tensor
    sin_position: torch.Tensor
    cos_block: torch.Tensor
    sin_block: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[T, B, heads, head_dim]``."""
        first, second = x.chunk(2, dim=-1)
        first = first * self.cos_position + _rotate_half(first) * self.sin_position
        second = second * self.cos_block + _rotate_half(second) * self.sin_block
        return torch.cat([first, second], dim=-1)


def rotary_2d(positions: torch.Tensor, head_dim: int, like: torch.Tensor) -> Rotary2D:
    """The rotary tables of ``positions`` ``[B, 2, T]`` (NeoX style, base 10000, over
    ``head_dim // 2`` dimensions per half) in ``like``'s dtype.

    The frequencies are rounded to float16, as the published model stores them, and the
    angles are computed in float16 for float16 models and in float32 otherwise (bfloat16
    models round the float32 cos and sin).
    """
    dim = head_dim // 2
    dtype = torch.float16 if like.dtype == torch.float16 else torch.float32
    exponent = torch.arange(0, dim, 2, device=like.device).float() / dim
    inv_freq = (1.0 / (10000**exponent)).half().to(dtype)
    steps = torch.arange(int(positions.max()) + 1, device=like.device, dtype=dtype)
    freqs = torch.outer(steps, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos().to(like.dtype), angles.sin().to(like.dtype)
    position = positions[:, 0, :].transpose(0, 1)
    block = positions[:, 1, :].transpose(0, 1)
    return Rotary2D(
        F.embedding(position, cos).unsqueeze(2),
        F.embedding(position, sin).unsqueeze(2),
        F.embedding(block, cos).unsqueeze(2),
        F.embedding(block, sin).unsqueeze(2),
    )


class ChatGLMAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int, layer_id: int) -> None:
        super().__init__()
        # ``layer_idx`` is the cache slot (re-indexed per split part); ``layer_id`` the
        # block's index in the whole model, which sets the query-key scaling.
        self.layer_idx = layer_idx
        self.layer_id = layer_id
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(self.hidden_size, 3 * self.hidden_size)
        self.dense = nn.Linear(self.hidden_size, self.hidden_size)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: Rotary2D,
        blocked: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """``hidden`` ``[T, B, H]`` (sequence-first), ``rotary`` of its tokens,
        ``blocked`` ``[B, 1, T, S]`` (True = masked) or None when nothing is masked."""
        length, batch = hidden.shape[0], hidden.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        fused = self.query_key_value(hidden).view(length, batch, heads, 3 * head_dim)
        query, key, value = torch.split(fused, head_dim, dim=-1)

        query, key = rotary.apply(query), rotary.apply(key)

        # Keys and values as [B, heads, S, head_dim], the layout of transformers' caches.
        keys = key.permute(1, 2, 0, 3)
        values = value.permute(1, 2, 0, 3)
        if cache is not None:
            keys, values = cache.update(keys, values, self.layer_idx)
        total = keys.shape[2]

        # Megatron's query-key layer scaling: divide by coeff, multiply back in float32.
        coeff = float(self.layer_id + 1)
        query = query / (math.sqrt(head_dim) * coeff)
        scores = torch.baddbmm(
            torch.zeros(1, 1, 1, dtype=query.dtype, device=query.device),
            query.view(length, batch * heads, head_dim).transpose(0, 1),
            keys.reshape(batch * heads, total, head_dim).transpose(1, 2),
            beta=0.0,
            alpha=1.0,
        ).view(batch, heads, length, total)
        if blocked is not None:
            scores = scores.masked_fill(blocked, MASKED_SCORE)
        probs = F.softmax(scores.float() * coeff, dim=-1).to(scores.dtype)
        context = torch.bmm(
            probs.view(batch * heads, length, total), values.reshape(batch * heads, total, head_dim)
        )
        context = context.view(batch, heads, length, head_dim).permute(2, 0, 1, 3)
        output: torch.Tensor = self.dense(
            context.contiguous().view(length, batch, self.hidden_size)
        )
        return output


class ChatGLMMLP(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        inner = config.inner_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, inner)
        self.dense_4h_to_h = nn.Linear(inner, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.dense_4h_to_h(_gelu(self.dense_h_to_4h(hidden)))
        return output


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int, layer_id: int) -> None:
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = ChatGLMAttention(config, layer_idx, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = ChatGLMMLP(config)
        self.alpha = (2 * config.residual_num_layers) ** 0.5

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: Rotary2D,
        blocked: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        # Both residual branches start from the *normalised* input, scaled by alpha.
        attention_input = self.input_layernorm(hidden)
        hidden = attention_input * self.alpha + self.attention(
            attention_input, rotary, blocked, cache
        )
        mlp_input = self.post_attention_layernorm(hidden)
        output: torch.Tensor = mlp_input * self.alpha + self.mlp(mlp_input)
        return output


class ChatGLMPreTrainedModel(PreTrainedModel):  # type: ignore[no-untyped-call]
    config_class = ChatGLMConfig
    config: ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["GLMBlock"]  # noqa: RUF012
    # The published checkpoints store rotary frequencies, which are always recomputed.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]  # noqa: RUF012


class ChatGLMModel(ChatGLMPreTrainedModel):  # type: ignore[no-untyped-call]
    """The ChatGLM-6B base model: embeddings, GLM blocks, final layer norm.

    ``attention_mask`` is the 2-D ChatGLM mask (0 pad, 1 causal, 2 context), covering the
    cached positions and this step's; ``position_ids`` ``[batch, 2, T]`` default to
    :func:`chatglm_positions` of it. Without a mask, one is built from ``input_ids`` with
    :func:`chatglm_mask` (no padding, no cache).
    """

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        check_chatglm_config(config)
        layer_ids = config.layer_ids or list(range(config.num_layers))
        self.word_embeddings: nn.Embedding | None = nn.Embedding(
            config.vocab_size, config.hidden_size
        )
        self.layers = nn.ModuleList(
            [GLMBlock(config, index, layer_ids[index]) for index in range(config.num_layers)]
        )
        self.final_layernorm: nn.Module = nn.LayerNorm(
            config.hidden_size, eps=config.layernorm_epsilon
        )
        self.post_init()  # type: ignore[no-untyped-call]

    def get_input_embeddings(self) -> nn.Module:
        assert self.word_embeddings is not None
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.word_embeddings = value  # type: ignore[assignment]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            assert input_ids is not None
            if self.word_embeddings is None:
                raise ValueError("this part has no embeddings: pass inputs_embeds")
            inputs_embeds = self.word_embeddings(input_ids)
        assert inputs_embeds is not None
        batch, length = inputs_embeds.shape[0], inputs_embeds.shape[1]
        if use_cache is None:  # a fresh cache only for inference
            use_cache = cache is not None or (bool(self.config.use_cache) and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = int(cache.get_seq_length()) if cache is not None else 0

        if attention_mask is None:
            if input_ids is None or past:
                raise ValueError(
                    "ChatGLM needs its 2-D attention mask (see chatglm_mask) with inputs_embeds "
                    "or a non-empty cache"
                )
            attention_mask = chatglm_mask(input_ids, None, self.config)
        _check_values(attention_mask)
        if attention_mask.shape != (batch, past + length):
            raise ValueError(
                f"attention mask {list(attention_mask.shape)} must be [batch={batch}, "
                f"cached {past} + new {length}]"
            )
        if position_ids is None:
            position_ids = chatglm_positions(attention_mask, length)
        if position_ids.shape != (batch, 2, length):
            raise ValueError(
                f"ChatGLM position ids must be [batch, 2, {length}], got {list(position_ids.shape)}"
            )
        blocked = chatglm_blocked(attention_mask, length)
        masked = blocked if bool(blocked.any()) else None  # nothing to mask: skip the fill
        rotary = rotary_2d(
            position_ids, self.config.hidden_size // self.config.num_attention_heads, inputs_embeds
        )
        hidden = inputs_embeds.transpose(0, 1)  # sequence-first, as the published model
        for layer in self.layers:
            hidden = layer(hidden, rotary, masked, cache)
        hidden = self.final_layernorm(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden.transpose(0, 1).contiguous(),
            cache=cache if use_cache else None,
        )


class ChatGLMForCausalLM(ChatGLMPreTrainedModel):  # type: ignore[no-untyped-call]
    """ChatGLM-6B with its (tied) lm head, under the published checkpoint names
    (``transformer.*``, ``lm_head.weight``)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}  # noqa: RUF012

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.transformer: ChatGLMModel = ChatGLMModel(config)
        self.lm_head: nn.Module = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # type: ignore[no-untyped-call]

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        logits: torch.Tensor = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


AutoConfig.register(MODEL_TYPE, ChatGLMConfig)
AutoModel.register(ChatGLMConfig, ChatGLMModel)
AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForCausalLM)


class ChatGLMFamily(Family):
    def check_config(self, config: PretrainedConfig) -> None:
        check_chatglm_config(config)

    def build_base(self, config: PretrainedConfig) -> nn.Module:
        if not isinstance(config, ChatGLMConfig):
            config = ChatGLMConfig.from_dict(config.to_dict())
        return ChatGLMModel(config)

    def positions(self, attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
        return chatglm_positions(attention_mask, query_length)

    def prompt_mask(
        self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None, config: PretrainedConfig
    ) -> torch.Tensor:
        """The 2-D mask to send with a batch of prompts (see :func:`chatglm_mask`)."""
        return chatglm_mask(input_ids, padding_mask, config)


CHATGLM = register_family(
    ChatGLMFamily(
        name="chatglm",
        model_types=(MODEL_TYPE,),
        base_attr="transformer",
        layers_attr="layers",
        norm_attr="final_layernorm",
        embed_attrs=("word_embeddings",),
        lora_targets=("query_key_value", "attention.dense"),
        num_layers_attr="num_layers",
        per_layer_config=("layer_ids",),
        # The context (2) and causal (1) parts of its mask: not checked with padding
        # between a session's past and its new positions.
        pads_anywhere=False,
    )
)
