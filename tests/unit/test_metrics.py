"""The papers' metrics (clients/metrics.py) against values computed by hand; the
arithmetic is in the comments."""

from __future__ import annotations

import pytest

from splitfed.clients.metrics import (
    accuracy,
    binary_f1,
    coqa_scores,
    coqa_turn_scores,
    exact_match,
    macro_f1,
    multirc_scores,
    normalize_answer,
    record_scores,
    rouge,
    token_f1,
)


def test_answers_are_normalised_as_squad_does() -> None:
    # lower-case, punctuation out ("cat's" -> "cats"), articles out, whitespace collapsed
    assert normalize_answer("The  Cat's, an apple!") == "cats apple"
    assert normalize_answer("Theater") == "theater"  # "the" only as a word
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("cats", "cat") == 0.0


def test_token_f1() -> None:
    # pred: cat sat on mat (4 tokens), gold: cat on mat (3); shared 3.
    # P = 3/4, R = 3/3, F1 = 2PR / (P + R) = 1.5 / 1.75 = 6/7
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # Repeated tokens count as often as both sides have them: pred a1 a1 a1, gold a1:
    # shared 1, P = 1/3, R = 1, F1 = (2/3) / (4/3) = 1/2
    assert token_f1("a1 a1 a1", "a1") == pytest.approx(1 / 2)
    # Nothing left after normalisation: SQuAD and ReCoRD say 0, CoQA 1 if both are empty.
    assert token_f1("the", "a") == 0.0
    assert token_f1("the", "a", empty_agrees=True) == 1.0
    assert token_f1("cat", "", empty_agrees=True) == 0.0


def test_accuracy_and_cb_macro_f1() -> None:
    labels = [0, 0, 1, 2, 2, 1]
    predictions = [0, 1, 1, 2, 0, 1]
    # right at 0, 2, 3, 5: 4 of 6
    assert accuracy(predictions, labels) == pytest.approx(2 / 3)
    # class 0: TP 1 (#0), FP 1 (#4), FN 1 (#1): F1 = 2TP / (2TP + FP + FN) = 2/4 = 0.5
    # class 1: TP 2 (#2, #5), FP 1 (#1), FN 0: F1 = 4/5 = 0.8
    # class 2: TP 1 (#3), FP 0, FN 1 (#4): F1 = 2/3
    # macro = (0.5 + 0.8 + 2/3) / 3
    assert macro_f1(predictions, labels, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # A class never predicted nor seen counts as F1 0 (the mean is over the 3 classes).
    assert macro_f1([0, 1], [0, 1], 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="as many predictions as references"):
        accuracy([1], [])


def test_multirc_f1a_over_options_and_em_over_questions() -> None:
    # 2 questions, 5 options. q1: labels T T F, predicted T F F; q2: labels T F, right.
    labels = [True, True, False, True, False]
    predictions = [True, False, False, True, False]
    questions = ["q1", "q1", "q1", "q2", "q2"]
    # F1a: TP 2, FP 0, FN 1: P = 2/2 = 1, R = 2/3, F1a = 2PR/(P+R) = (4/3)/(5/3) = 0.8
    # EM: q1 has a wrong option, q2 none: 1 of 2 questions = 0.5; accuracy 4 of 5 options
    assert multirc_scores(predictions, labels, questions) == pytest.approx(
        {"accuracy": 0.8, "f1a": 0.8, "em": 0.5}
    )
    # Everything true: TP 3, FP 2: P = 3/5, R = 1, F1a = 1.2/1.6 = 0.75; no question right
    assert multirc_scores([True] * 5, labels, questions) == pytest.approx(
        {"accuracy": 0.6, "f1a": 0.75, "em": 0.0}
    )
    assert binary_f1([False, False], [True, False]) == 0.0  # nothing predicted true


def test_record_takes_the_best_gold_answer() -> None:
    # query 1: "Curie" against "Marie Curie": P = 1, R = 1/2, F1 = 2/3, EM 0;
    #          against "Curie": 1 and 1 -> max F1 1, EM 1
    # query 2: "Paris" against "Stockholm": 0
    scores = record_scores(["Curie", "Paris"], [["Marie Curie", "Curie"], ["Stockholm"]])
    assert scores == pytest.approx({"f1": (1 + 0) / 2, "em": (1 + 0) / 2})
    # With "Marie Curie" alone the partial match counts: F1 (2/3 + 0) / 2, EM 0
    scores = record_scores(["Curie", "Paris"], [["Marie Curie"], ["Stockholm"]])
    assert scores == pytest.approx({"f1": 1 / 3, "em": 0.0})


def test_coqa_scores_each_human_answer_against_the_others() -> None:
    # One reference: the plain score.
    assert coqa_turn_scores("Tom", ["tom."]) == (1.0, 1.0)
    assert coqa_turn_scores("", [""]) == (1.0, 1.0)  # both empty agree (CoQA's rule)
    # Three references; prediction "called Tom" (tokens: called tom).
    # vs "Tom": shared 1, P = 1/2, R = 1, F1 = 2/3; vs "It was called Tom": shared 2,
    # P = 1, R = 1/2, F1 = 2/3. For each reference left out, the max over the other two
    # is 2/3; EM always 0.  -> F1 = 2/3, EM = 0
    f1, em = coqa_turn_scores("called Tom", ["Tom", "Tom", "It was called Tom"])
    assert (f1, em) == (pytest.approx(2 / 3), 0.0)
    # "the owner took it" (owner took it) vs "No, the owner took it" (no owner took it):
    # shared 3, P = 1, R = 3/4, F1 = 1.5/1.75 = 6/7; vs "no": 0. References
    # ["No, the owner took it", "no", "no"]: leave out #0 -> others "no", "no": 0;
    # leave out #1 -> max(6/7, 0) = 6/7; leave out #2 -> 6/7
    # F1 = (0 + 6/7 + 6/7) / 3 = 4/7; EM = 0
    f1, em = coqa_turn_scores("the owner took it", ["No, the owner took it", "no", "no"])
    assert (f1, em) == (pytest.approx(4 / 7), 0.0)
    # "Anna" vs ["Anna", "Anna did", "Anna"]: every leave-one-out set holds an "Anna": 1, 1
    # overall = mean over the three turns: F1 (1 + 2/3 + 4/7) / 3 = 47/63, EM 1/3
    scores = coqa_scores(
        ["Anna", "called Tom", "the owner took it"],
        [
            ["Anna", "Anna did", "Anna"],
            ["Tom", "Tom", "It was called Tom"],
            ["No, the owner took it", "no", "no"],
        ],
    )
    assert scores == pytest.approx({"f1": 47 / 63, "em": 1 / 3})


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # Newlines separate sentences. Tokens: the cat sat the dog ran / the dog ran the cat
        # sat. ROUGE-1: all 6 shared = 1. Bigrams: the cat, cat sat, sat the, the dog, dog
        # ran vs the dog, dog ran, ran the, the cat, cat sat: 4 of 5 = 0.8. ROUGE-L over the
        # whole text: the longest common subsequence is 3 tokens (the cat sat), 3/6 = 0.5.
        # ROUGE-Lsum: per reference sentence, the union of its LCS with each summary
        # sentence: "the dog ran" 3, "the cat sat" 3: 6 of 6 = 1.
        ("the cat sat\nthe dog ran", "the dog ran\nthe cat sat", (1.0, 0.8, 0.5, 1.0)),
        # One sentence each: Lsum is L (5 of 6 in LCS: the cat on the mat).
        ("the cat lay on the mat", "the cat sat on the mat", (5 / 6, 3 / 5, 5 / 6, 5 / 6)),
    ],
)
def test_rouge_with_lsum(
    prediction: str, reference: str, expected: tuple[float, float, float, float]
) -> None:
    scores = rouge([prediction], [reference])
    got = (scores["rouge1"], scores["rouge2"], scores["rougeL"], scores["rougeLsum"])
    assert got == pytest.approx(expected, abs=1e-9)
