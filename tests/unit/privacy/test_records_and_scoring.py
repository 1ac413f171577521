"""The synthetic private records, where their sensitive values land among the tokens, and
the scores of an attack, against values worked out by hand."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from splitfed.clients.data import Example, encode
from splitfed.models.tiny import train_tokenizer
from splitfed.privacy.records import (
    FIELDS,
    PrivateRecord,
    Span,
    chance_rate,
    make_corpora,
    patient_notes,
    read_records_file,
    record_of,
    write_records,
)
from splitfed.privacy.scoring import Scorer, field_positions


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    corpora = make_corpora(300, 4, 2, seed=3)
    return train_tokenizer([r.prompt + "\n" + r.response for r in corpora.public], 512)


def test_records_are_reproducible_and_mark_their_values() -> None:
    first, again = patient_notes(20, seed=5), patient_notes(20, seed=5)
    assert first == again
    assert first != patient_notes(20, seed=6)
    for record in first:
        fields = [s.field for s in record.sensitive]
        assert sorted(fields[:6]) == sorted(FIELDS)  # in the template's order
        assert fields[6:] == ["name", "diagnosis", "amount"]  # the response repeats three
        by_field: dict[str, set[str]] = {}
        for span in record.sensitive:
            by_field.setdefault(span.field, set()).add(record.value(span))
        assert all(len(values) == 1 for values in by_field.values())  # same value both times
        name, diagnosis, amount = (record.value(s) for s in record.sensitive[6:])
        assert record.response == f"Name: {name}. Diagnosis: {diagnosis}. Amount: {amount}."
        assert by_field["name"] == {name} and by_field["amount"] == {amount}


def test_corpora_share_no_note() -> None:
    c = make_corpora(200, 50, 20, seed=1)
    public, train, evaluation = ({r.prompt for r in rs} for rs in (c.public, c.train, c.eval))
    assert len(public) == 200 and len(train) == 50 and len(evaluation) == 20
    assert not public & train and not public & evaluation and not train & evaluation


def test_records_round_trip_through_a_file(tmp_path: Any) -> None:
    records = patient_notes(5, seed=2)
    path = write_records(tmp_path / "notes.jsonl", records)
    assert read_records_file(path) == records


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a"}, "needs prompt and response"),
        ({"prompt": "ab", "response": "c", "sensitive": [{"field": "x"}]}, "needs field, part"),
        (
            {
                "prompt": "ab",
                "response": "c",
                "sensitive": [{"field": "x", "part": "prompt", "start": 1, "end": 9}],
            },
            "outside its 'prompt' text",
        ),
        (
            {
                "prompt": "ab",
                "response": "c",
                "sensitive": [{"field": "x", "part": "title", "start": 0, "end": 1}],
            },
            "outside its 'title' text",
        ),
    ],
)
def test_bad_sensitive_marks_are_refused(row: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        record_of(row, "notes.jsonl:3")


def test_chance_is_the_best_blind_guess() -> None:
    def note(name: str, diagnosis: str) -> PrivateRecord:
        prompt = f"{name} {diagnosis}"
        return PrivateRecord(
            prompt,
            "",
            (
                Span("name", "prompt", 0, len(name)),
                Span("diagnosis", "prompt", len(name) + 1, len(prompt)),
            ),
        )

    public = [note("Ann", "flu"), note("Ann", "gout"), note("Bo", "gout"), note("Cy", "gout")]
    private = [note("Ann", "gout"), note("Bo", "flu")]
    # The guesses are Ann and gout: right on 2 of the 4 private values.
    assert chance_rate(public, private) == pytest.approx(2 / 4)


def test_each_sensitive_value_maps_to_the_tokens_that_spell_it(tokenizer: Any) -> None:
    for record in patient_notes(10, seed=9):
        ids, _ = encode(Example(record.prompt, record.response), tokenizer, 512)
        placed = field_positions(tokenizer, record, 512, chat_template=False)
        assert [span for span, _ in placed] == list(record.sensitive)
        for span, positions in placed:
            assert positions == list(range(positions[0], positions[-1] + 1))
            # Byte-level BPE keeps the space before a word in the word's token.
            assert tokenizer.decode([ids[i] for i in positions]).strip() == record.value(span)


def test_values_cut_off_by_max_length_are_left_out(tokenizer: Any) -> None:
    record = patient_notes(1, seed=4)[0]
    placed = field_positions(tokenizer, record, 12, chat_template=False)
    assert all(positions[-1] < 12 for _, positions in placed)
    assert len(placed) < len(record.sensitive)


def test_scores_against_hand_counts(tokenizer: Any) -> None:
    records = patient_notes(2, seed=11)
    scorer = Scorer(tokenizer, records, 512, chat_template=False)
    rows = [encode(Example(r.prompt, r.response), tokenizer, 512) for r in records]
    length = max(len(ids) for ids, _ in rows)
    truth = torch.zeros((2, length), dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        truth[i, : len(ids)] = torch.tensor(ids)
    claimed = torch.full_like(truth, -1)
    claimed[0, : len(rows[0][0])] = truth[0, : len(rows[0][0])]  # example 0: all right
    claimed[1, : len(rows[1][0])] = truth[1, : len(rows[1][0])]
    placed = field_positions(tokenizer, records[1], 512, chat_template=False)
    name_positions = next(p for span, p in placed if span.field == "name" and span.part == "prompt")
    claimed[1, name_positions[0]] = (truth[1, name_positions[0]] + 1) % len(tokenizer)  # one wrong
    scorer.add([0, 1], truth, claimed)
    score = scorer.score
    tokens = len(rows[0][0]) + len(rows[1][0])
    assert score.tokens.total == tokens and score.tokens.hits == tokens - 1
    assert score.fields.total == 18 and score.fields.hits == 17  # example 1's prompt name
    assert score.summary()["by_field"]["name"] == pytest.approx(3 / 4)
    assert 0.9 < score.rouge_l < 1.0

    scorer.reset()
    nothing = torch.full_like(truth, -1)
    nothing[:, 1] = truth[:, 1]  # a claim on one position only: fields are not scored
    scorer.add([0, 1], truth, nothing)
    assert scorer.score.tokens.total == 2 and scorer.score.fields.total == 0
    assert scorer.score.field_exact_match is None
