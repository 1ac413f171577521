"""One pass of the frozen body for the rows of several sessions, each with its own LoRA.

In ``per-client`` mode every session trains its own LoRA adapter on a body whose frozen
tensors are shared with every other session's (``SharedBody.body_for``). A
:class:`MultiAdapterBody` over those bodies runs ONE forward (and, through autograd, one
backward) for a batch made of all their micro-batches: the frozen matmuls, norms and
attention run once for the whole batch, and each row's LoRA delta comes from its own
session's A and B, so gradients reach each session's own adapter only (rows of other
sessions contribute nothing to it). Each session's optimizer then steps its own tensors.
For generation, :meth:`MultiAdapterBody.cached` runs the next positions of any subset
of the sessions, each after its own KV cache (continuous batching, models/continuous.py).

How rows map to adapters: the sessions' micro-batches are concatenated in order, so the
rows of session ``i`` are one contiguous segment. Each adapted projection computes
``base(x)`` once for all rows, then the delta segment by segment,
``(x_i @ A_i^T) @ B_i^T * scaling_i``; where every segment has as many rows and every
adapter the same rank, the segments are one batched matmul (``torch.bmm`` over the stacked
adapters, a grouped GEMM), otherwise one small matmul pair per segment. Nothing is copied
per row (no gathered weight tensors saved for backward).

P-Tuning v2 sessions batch with each other the same way: each row's keys and values
start with its own session's prefix (shorter prefixes left-padded with masked slots), so
attention over the prefix is per row and gradients reach each session's own prefix.
LoRA and prefix sessions do not share a pass.

Micro-batches of different lengths are right-padded to the longest, with mask 0 at the
padding: positions come from the mask and attention is causal, so real tokens see exactly
what they see alone; outputs are cut back to each session's own length.

Not a library's: peft's mixed-adapter batches (``adapter_names=``) refuse training mode
(peft 0.21: "Cannot pass `adapter_names` when the model is in training mode") and need all
adapters inside one module, while each session here owns its module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from transformers.cache_utils import DynamicCache

from splitfed.models.adapters import ADAPTER, PrefixEncoder
from splitfed.models.continuous import CachedStep, base_run, merged_cached_pass
from splitfed.models.parts import Body, PartCache
from splitfed.models.peft_import import LoraLayer, LoraLinear, TorchaoLoraLinear
from splitfed.models.quantization import frozen_memo

# Member sets whose stacked adapters one projection keeps (generation, eval).
STACKS_KEPT = 16


class _Routing:
    """The sessions in the pass that is running and the rows of each (shared by every
    layer): segment ``i`` of the batch is ``counts[i]`` rows of session ``members[i]``."""

    def __init__(self) -> None:
        self.members: list[int] = []
        self.counts: list[int] = []
        # Without autograd: a number that changes whenever an adapter tensor of the
        # sessions changed since the last pass (None: do not keep stacked adapters).
        self.epoch: int | None = None


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


class GroupedLoraLinear(nn.Module):
    """A LoRA projection for rows of several sessions: the frozen base layer once, each
    session's delta on its own segment of rows. The sessions' A and B stay theirs (not
    registered here): this module only reads them."""

    def __init__(self, base_layer: nn.Module, layers: Sequence[LoraLinear], routing: _Routing):
        super().__init__()
        self.base_layer = base_layer
        self._routing = routing
        self._a = [_weight(layer.lora_A[ADAPTER]) for layer in layers]
        self._b = [_weight(layer.lora_B[ADAPTER]) for layer in layers]
        self._scaling = [float(layer.scaling[ADAPTER]) for layer in layers]
        self._dropout = [float(getattr(layer.lora_dropout[ADAPTER], "p", 0.0)) for layer in layers]
        # Without autograd: the stacked, scaled adapters of the latest member sets, valid
        # for the routing's epoch they were made in.
        self._stacks: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._stacks_epoch: int | None = None

    def _stacked(self, members: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' A^T and scaled B^T, stacked for ``bmm`` (``[S, in, r]``,
        ``[S, r, out]``). Without autograd (generation, eval) the stacks are kept for
        the next passes of the same members while the adapters stay as they are."""
        epoch = self._routing.epoch
        if epoch is None or torch.is_grad_enabled():
            return self._stack(members)
        if epoch != self._stacks_epoch:
            self._stacks, self._stacks_epoch = {}, epoch
        key = tuple(members)
        stacks = self._stacks.get(key)
        if stacks is None:
            if len(self._stacks) >= STACKS_KEPT:
                self._stacks.clear()
            stacks = self._stacks[key] = self._stack(members)
        return stacks

    def _stack(self, members: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.stack([self._a[i] for i in members]).transpose(1, 2)
        b = torch.stack([self._b[i] * self._scaling[i] for i in members]).transpose(1, 2)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x)
        members, counts = self._routing.members, self._routing.counts
        if x.dim() != 3 or sum(counts) != x.shape[0]:
            raise ValueError(f"rows {list(x.shape)} do not match the pass's sessions {counts}")
        x = x.to(self._a[members[0]].dtype)
        dropout = self.training and any(self._dropout[i] for i in members)
        ranks = {int(self._a[i].shape[0]) for i in members}
        grouped_gemm = len(set(counts)) == 1 and len(ranks) == 1
        segments: list[torch.Tensor] = []
        if dropout or not grouped_gemm:  # without dropout, the grouped GEMM needs none
            segments = list(torch.split(x, counts))
        if dropout:
            segments = [
                F.dropout(s, self._dropout[i], True) for s, i in zip(segments, members, strict=True)
            ]
        if grouped_gemm:
            # Grouped GEMM: [S, rows*T, in] x [S, in, r] x [S, r, out]; the segments are
            # consecutive rows of x, so without dropout x itself is their stack.
            rows, tokens = counts[0], x.shape[1]
            grouped = torch.stack(segments) if dropout else x
            grouped = grouped.reshape(len(counts), rows * tokens, -1)
            stacked_a, stacked_b = self._stacked(members)
            delta = torch.bmm(torch.bmm(grouped, stacked_a), stacked_b)
            delta = delta.reshape(x.shape[0], tokens, -1)
        else:
            delta = torch.cat(
                [
                    (s @ self._a[i].t()) @ self._b[i].t() * self._scaling[i]
                    for s, i in zip(segments, members, strict=True)
                ]
            )
        return result + delta.to(result.dtype)


def _adapted(body: Body) -> dict[str, LoraLinear]:
    """The body's LoRA projections by module name; refuses what the grouped op lacks."""
    layers: dict[str, LoraLinear] = {}
    for name, module in body.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        # peft wraps a torchao-quantized projection (CPU int8) in TorchaoLoraLinear: the
        # same forward (base layer, then the delta), only merging differs.
        if not isinstance(module, LoraLinear) or type(module) not in (
            LoraLinear,
            TorchaoLoraLinear,
        ):
            raise ValueError(f"{name}: only LoRA on linear layers batches, not {type(module)}")
        if set(module.lora_A) != {ADAPTER} or module.merged or module.disable_adapters:
            raise ValueError(f"{name}: the session's LoRA must be its one unmerged adapter")
        if module.lora_variant or module.fan_in_fan_out or module.lora_B[ADAPTER].bias is not None:
            raise ValueError(f"{name}: DoRA, fan-in-fan-out and LoRA biases do not batch")
        layers[name] = module
    return layers


def _frozen(body: Body) -> dict[str, torch.Tensor]:
    return {
        name: p
        for name, p in body.named_parameters()
        if ".lora_" not in name and not p.requires_grad
    }


class MultiAdapterBody(nn.Module):
    """One batched pass over sessions' bodies that share their frozen tensors.

    ``bodies`` are the sessions' :class:`Body` objects, each with its own LoRA adapter, all
    for the same split (k, m) and sharing the tensors of one frozen body. Call it with each
    session's h1 and 2-D mask (no KV cache: training and eval passes) to get each
    session's h2; one ``torch.autograd.backward(outputs, grads)`` then fills each session's
    adapter gradients (and each h1's, where it requires grad); a session whose rows got a
    zero dL/dh2 gets zero gradients (not None). Use it from one thread at a
    time; build a new one when the set of sessions changes (it copies no tensor). The
    sessions are all LoRA sessions or all P-Tuning v2 sessions.
    """

    def __init__(self, bodies: Sequence[Body]) -> None:
        super().__init__()
        if not bodies:
            raise ValueError("a multi-adapter pass needs at least one session's body")
        first = bodies[0]
        frozen = _frozen(first)
        adapted = _adapted(first)
        if bool(adapted) == (first.prefix is not None):
            raise ValueError("session 0's body must have either a LoRA adapter or a prefix")
        # Each body's LoRA projections, walked once (not once per projection).
        each = [_adapted(body) for body in bodies]
        for index, body in enumerate(bodies):
            if body.layer_range != first.layer_range or body.family.name != first.family.name:
                raise ValueError(
                    f"session {index}'s body holds blocks {list(body.layer_range)}, session 0's "
                    f"{list(first.layer_range)}: only sessions with the same split batch"
                )
            if (body.prefix is None) != (first.prefix is None):
                raise ValueError(
                    f"sessions 0 and {index} train different adapter kinds (LoRA, prefix): "
                    "they run apart"
                )
            own = _frozen(body)
            for name, tensor in frozen.items():
                other = own.get(name)
                if other is None or other.data_ptr() != tensor.data_ptr():
                    raise ValueError(
                        f"session {index}'s body does not share the frozen tensor {name} of "
                        "session 0's: batched sessions must share one frozen body"
                    )
            if set(each[index]) != set(adapted):
                raise ValueError(f"session {index}'s LoRA adapts other modules than session 0's")
        self.sessions = len(bodies)
        self._routing = _Routing()
        # Every session's adapter tensors and, at the last cached pass, their versions.
        self._adapter_tensors = [
            p for body in bodies for n, p in body.named_parameters() if p.requires_grad
        ]
        self._versions: tuple[tuple[int, int], ...] = ()
        self._epochs = 0
        # The module tree only: tensors shared, and a quantized projection's state too
        # (an int8 projection keeps its weight in its matmul state as well).
        self.body: Body = copy.deepcopy(first, frozen_memo(first))
        self.body.prefix = None
        # The sessions' prefixes stay theirs: read here, not registered.
        self._prefixes: list[PrefixEncoder] = [b.prefix for b in bodies if b.prefix is not None]
        for name, layer in adapted.items():
            layers = [own[name] for own in each]
            self.body.set_submodule(
                name, GroupedLoraLinear(layer.base_layer, layers, self._routing)
            )
        self.train(first.training)

    def forward(
        self, inputs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each session's h2 for its h1 ``inputs[i]`` ``[rows, tokens, hidden]`` and its
        mask ``masks[i]`` ``[rows, tokens]``, in the order of the bodies."""
        if len(inputs) != self.sessions or len(masks) != self.sessions:
            raise ValueError(
                f"a pass over {self.sessions} sessions needs {self.sessions} inputs and masks, "
                f"got {len(inputs)} and {len(masks)}"
            )
        for index, (hidden, mask) in enumerate(zip(inputs, masks, strict=True)):
            if hidden.dim() != 3 or hidden.shape[0] < 1 or mask.shape != hidden.shape[:2]:
                raise ValueError(
                    f"session {index}: h1 must be [rows >= 1, tokens, hidden] and its mask "
                    f"[rows, tokens]; got {list(hidden.shape)} and mask {list(mask.shape)}"
                )
        lengths = [int(hidden.shape[1]) for hidden in inputs]
        longest = max(lengths)
        hidden = torch.cat([F.pad(h, (0, 0, 0, longest - h.shape[1])) for h in inputs])
        mask = torch.cat([F.pad(m, (0, longest - m.shape[1])) for m in masks])
        counts = [int(h.shape[0]) for h in inputs]
        with self._routed(list(range(self.sessions)), counts):
            output = (
                self._prefixed(hidden, mask, counts) if self._prefixes else self.body(hidden, mask)
            )
        return [
            piece[:, :length] for piece, length in zip(output.split(counts), lengths, strict=True)
        ]

    @contextmanager
    def _routed(
        self, members: list[int], counts: list[int], epoch: int | None = None
    ) -> Iterator[None]:
        """Rows ``counts[i]`` of the batch belong to session ``members[i]`` meanwhile."""
        if not members or any(not 0 <= i < self.sessions for i in members):
            raise ValueError(f"sessions {members} are not all among the {self.sessions} bodies")
        routing = self._routing
        routing.members, routing.counts, routing.epoch = members, counts, epoch
        try:
            yield
        finally:
            routing.members, routing.counts, routing.epoch = [], [], None

    def cached(
        self,
        members: Sequence[int],
        inputs: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        caches: Sequence[PartCache],
    ) -> list[torch.Tensor]:
        """Generation, continuously batched: ONE pass for the next positions of the
        sessions ``members`` (indices into the bodies, each at most once), each after
        what its own KV cache ``caches[i]`` holds (``inputs[i]`` ``[rows, t, hidden]``,
        ``masks[i]`` ``[rows, cache length + t]``, as :class:`Body` takes them alone);
        each cache takes its new positions (:func:`merged_cached_pass`)."""
        if not len(members) == len(inputs) == len(masks) == len(caches):
            raise ValueError("each session of a pass needs its input, mask and cache")
        if len(set(members)) != len(members):
            raise ValueError(f"a session appears twice in one pass: {list(members)}")
        steps = [
            CachedStep(hidden, mask, cache, self._prefixes[i] if self._prefixes else None)
            for i, hidden, mask, cache in zip(members, inputs, masks, caches, strict=True)
        ]
        run = base_run(self.body.base)
        with self._routed(list(members), [step.rows for step in steps], self._epoch()):
            return merged_cached_pass(self.body.family, steps, run)

    def _epoch(self) -> int:
        """A number that changes when any session's adapter tensor was written since the
        last call (their version counters move on an optimizer step or an import)."""
        versions = tuple((t.data_ptr(), t._version) for t in self._adapter_tensors)
        if versions != self._versions:
            self._versions = versions
            self._epochs += 1
        return self._epochs

    def _prefixed(
        self, hidden: torch.Tensor, mask: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """The body's blocks with each row's own session's prefix in front of its keys and
        values (as ``Body.forward`` puts one session's); positions come from ``mask``
        alone, as there."""
        longest = max(prefix.length for prefix in self._prefixes)
        kv = DynamicCache(config=self.body.part_config)
        for layer in range(len(self.body.layer_range)):
            keys, values = [], []
            for prefix, rows in zip(self._prefixes, counts, strict=True):
                pad = (0, 0, longest - prefix.length, 0)  # [kv heads, length, head dim]
                keys.append(F.pad(prefix.keys[layer], pad).expand(rows, -1, -1, -1))
                values.append(F.pad(prefix.values[layer], pad).expand(rows, -1, -1, -1))
            kv.update(torch.cat(keys), torch.cat(values), layer)
        seen = torch.cat(
            [
                F.pad(mask.new_ones((rows, prefix.length)), (longest - prefix.length, 0))
                for prefix, rows in zip(self._prefixes, counts, strict=True)
            ]
        )
        output = self.body.base(
            input_ids=None,
            inputs_embeds=hidden,
            attention_mask=torch.cat([seen, mask], -1),
            position_ids=self.body.family.positions(mask, hidden.shape[1]),
            cache=kv,
            use_cache=True,
        )
        result: torch.Tensor = output.last_hidden_state
        return result
