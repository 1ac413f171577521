"""The demo's task (splitfed/cli/sample.py): a rule over the prompt, held-out questions
disjoint from the training ones."""

from __future__ import annotations

import re

from splitfed.cli.sample import HELD_OUT, task_rows


def test_held_out_questions_are_never_trained_on_and_follow_the_rule() -> None:
    train, heldout = task_rows()
    assert len(heldout) == HELD_OUT and len(train) + len(heldout) == 90
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    for row in train + heldout:
        match = re.fullmatch(r"Which is larger, (\d) or (\d)\?", row["prompt"])
        assert match is not None, row
        a, b = int(match[1]), int(match[2])
        assert a != b and row["response"] == str(max(a, b))
    assert task_rows() == (train, heldout)  # the same files on every run
