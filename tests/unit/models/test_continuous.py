"""Continuous batching of generation (models/continuous.py): merged passes over sessions
that each keep their own KV cache equal each session's passes alone, whatever joins,
leaves, pads or sits out between passes."""

from __future__ import annotations

import pytest
import torch
from modelkit import SESSIONS, micro_batch, session_body, shared_body

from splitfed.models import Body
from splitfed.models.adapters import AdapterSettings
from splitfed.models.continuous import CachedStep, base_run, mergeable, merged_cached_pass
from splitfed.models.multi_adapter import MultiAdapterBody
from splitfed.models.parts import PartCache

ATOL = 1e-5

# Each pass: the sessions in it and the new positions of each (a prompt, or a chunk of
# one, then decode steps of one position). Sessions join late, sit passes out, take
# chunks while others decode, and leave.
SCHEDULE: tuple[dict[int, int], ...] = (
    {0: 6, 1: 4},
    {0: 1, 1: 1, 2: 3},  # 2 joins with the first chunk of its prompt
    {0: 1, 2: 2},  # 1 sits out; the rest of 2's prompt
    {1: 1, 2: 1, 3: 5},
    {0: 1, 1: 1, 2: 1, 3: 1},
    {3: 1, 1: 1},  # 0 and 2 have left
)
ROWS = (2, 1, 3, 2)


class Stream:
    """One session's generation as the backbone sees it: h1 of each step and the mask
    the client extends (left padding in some rows of the first step)."""

    def __init__(self, index: int, body: Body) -> None:
        self.index, self.body = index, body
        self.alone: PartCache = body.new_cache()
        self.merged: PartCache = body.new_cache()
        self.mask: torch.Tensor | None = None
        self.seed = 100 * index

    def next_step(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.seed += 1
        hidden, new = micro_batch(self.seed, ROWS[self.index], tokens)
        if self.mask is not None:
            new = torch.ones_like(new)  # padding only in the prompt
        self.mask = new if self.mask is None else torch.cat([self.mask, new], -1)
        return hidden, self.mask


def run_schedule(bodies: list[Body], merged_pass: object) -> None:
    streams = [Stream(i, body) for i, body in enumerate(bodies)]
    for number, members in enumerate(SCHEDULE):
        steps = {i: streams[i].next_step(tokens) for i, tokens in members.items()}
        with torch.no_grad():
            alone = {i: streams[i].body(h, m, streams[i].alone) for i, (h, m) in steps.items()}
            merged = merged_pass(  # type: ignore[operator]
                list(steps),
                [h for h, _ in steps.values()],
                [m for _, m in steps.values()],
                [streams[i].merged for i in steps],
            )
        for i, output in zip(steps, merged, strict=True):
            torch.testing.assert_close(output, alone[i], atol=ATOL, rtol=0, msg=f"pass {number}")
            assert streams[i].merged.length == streams[i].alone.length
            assert streams[i].merged.nbytes() == streams[i].alone.nbytes()


def test_sessions_with_their_own_lora_merge_and_equal_each_alone() -> None:
    frozen = shared_body()
    bodies = [session_body(frozen, settings) for settings in SESSIONS]
    for body in bodies:
        body.eval()
    multi = MultiAdapterBody(bodies).eval()
    run_schedule(bodies, multi.cached)


def test_p_tuning_v2_sessions_merge_with_their_own_prefix() -> None:
    frozen = shared_body()
    bodies = [
        session_body(frozen, AdapterSettings(kind="prefix", prefix_length=n, seed=30 + i))
        for i, n in enumerate((3, 5, 2, 4))
    ]
    multi = MultiAdapterBody(bodies).eval()
    run_schedule(bodies, multi.cached)


def test_sessions_of_one_shared_body_merge_without_routing() -> None:
    body = session_body(shared_body(), SESSIONS[0]).eval()
    run = base_run(body.base)

    def merged(members: list[int], inputs: list, masks: list, caches: list) -> list:  # type: ignore[type-arg]
        steps = [CachedStep(h, m, c) for h, m, c in zip(inputs, masks, caches, strict=True)]
        return merged_cached_pass(body.family, steps, run)

    run_schedule([body] * len(SESSIONS), merged)


def test_a_mask_that_does_not_cover_the_cache_is_refused() -> None:
    body = shared_body().eval()
    cache = body.new_cache()
    hidden, mask = micro_batch(1, 1, 3)
    with torch.no_grad():
        merged_cached_pass(body.family, [CachedStep(hidden, mask, cache)], base_run(body.base))
        with pytest.raises(ValueError, match="cache holds 3"):
            merged_cached_pass(
                body.family, [CachedStep(hidden[:, :1], mask[:, :2], cache)], base_run(body.base)
            )
    assert mergeable(cache)


def test_a_session_twice_in_one_pass_is_refused() -> None:
    frozen = shared_body()
    multi = MultiAdapterBody([session_body(frozen, s) for s in SESSIONS[:2]])
    hidden, mask = micro_batch(1, 1, 3)
    caches = [multi.body.new_cache(), multi.body.new_cache()]
    with pytest.raises(ValueError, match="twice"):
        multi.cached([0, 0], [hidden, hidden], [mask, mask], caches)
    with pytest.raises(ValueError, match="among"):
        multi.cached([2], [hidden], [mask], caches[:1])
