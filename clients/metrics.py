"""The papers' metrics, as their official scripts define them: accuracy, CommitmentBank's
macro-F1, MultiRC's F1a and exact match, ReCoRD's and SQuAD's answer F1 and exact match,
CoQA's F1 with several human answers, and ROUGE-1/2/L/Lsum.

Pure Python (ROUGE through Google's ``rouge-score``); no model here. Each definition, and
the official script it follows, is in docs/evaluation.md.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation (also ReCoRD's and CoQA's): lower-case, drop ASCII
    punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str, *, empty_agrees: bool = False) -> float:
    """F1 of the normalised tokens (bag of words, clipped counts). Where either side has no
    token left: 0 (SQuAD v1.1 and ReCoRD), or with ``empty_agrees`` 1 if both are empty
    (CoQA)."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if empty_agrees and (not predicted or not wanted):
        return float(predicted == wanted)
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def _check(predictions: Sequence[object], golds: Sequence[object]) -> None:
    if len(predictions) != len(golds) or not predictions:
        raise ValueError("a metric needs as many predictions as references, at least one")


def accuracy(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    _check(predictions, labels)
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def _f1(true_positive: int, false_positive: int, false_negative: int) -> float:
    """2PR / (P + R) = 2TP / (2TP + FP + FN); 0 where nothing is predicted or wanted."""
    denominator = 2 * true_positive + false_positive + false_negative
    return 2 * true_positive / denominator if true_positive else 0.0


def macro_f1(predictions: Sequence[int], labels: Sequence[int], classes: int) -> float:
    """The unweighted mean over ``classes`` of each class's F1 (CommitmentBank: 3 classes;
    a class never predicted has F1 0)."""
    _check(predictions, labels)
    total = 0.0
    for c in range(classes):
        pairs = list(zip(predictions, labels, strict=True))
        tp = sum(p == c and y == c for p, y in pairs)
        fp = sum(p == c and y != c for p, y in pairs)
        fn = sum(p != c and y == c for p, y in pairs)
        total += _f1(tp, fp, fn)
    return total / classes


def binary_f1(predictions: Sequence[bool], labels: Sequence[bool]) -> float:
    """F1 of the positive class (MultiRC's F1a, over all answer options)."""
    _check(predictions, labels)
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p and y for p, y in pairs)
    fp = sum(p and not y for p, y in pairs)
    fn = sum(y and not p for p, y in pairs)
    return _f1(tp, fp, fn)


def multirc_scores(
    predictions: Sequence[bool], labels: Sequence[bool], questions: Sequence[Hashable]
) -> dict[str, float]:
    """MultiRC as SuperGLUE scores it: ``f1a``, the binary F1 over all answer options,
    and ``em``, the share of questions whose options are all labelled right (each option
    belongs to ``questions[i]``); ``accuracy`` over the options beside them."""
    _check(predictions, labels)
    right: dict[Hashable, bool] = {}
    for p, y, q in zip(predictions, labels, questions, strict=True):
        right[q] = right.get(q, True) and p == y
    return {
        "accuracy": accuracy(predictions, labels),
        "f1a": binary_f1(predictions, labels),
        "em": sum(right.values()) / len(right),
    }


def record_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """ReCoRD (and SQuAD v1.1): per query the best token F1 and exact match over its gold
    answers, averaged over queries."""
    _check(predictions, answers)
    f1 = em = 0.0
    for prediction, golds in zip(predictions, answers, strict=True):
        if not golds:
            raise ValueError("every query needs at least one gold answer")
        f1 += max(token_f1(prediction, g) for g in golds)
        em += max(exact_match(prediction, g) for g in golds)
    return {"f1": f1 / len(predictions), "em": em / len(predictions)}


def coqa_turn_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(F1, EM) of one CoQA turn as evaluate-v1.0.py computes them: with several human
    answers, for each one the best score against the *others*, averaged (so a human
    answer is scored the same way); with one, the score against it."""
    if not golds:
        raise ValueError("every turn needs at least one gold answer")
    if len(golds) == 1:
        return token_f1(prediction, golds[0], empty_agrees=True), exact_match(prediction, golds[0])
    f1 = em = 0.0
    for i in range(len(golds)):
        others = [*golds[:i], *golds[i + 1 :]]
        f1 += max(token_f1(prediction, g, empty_agrees=True) for g in others)
        em += max(exact_match(prediction, g) for g in others)
    return f1 / len(golds), em / len(golds)


def coqa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """CoQA's overall F1 and EM: the turn scores averaged over all turns (the official
    script reports them times 100)."""
    _check(predictions, answers)
    turns = [coqa_turn_scores(p, golds) for p, golds in zip(predictions, answers, strict=True)]
    return {
        "f1": sum(f for f, _ in turns) / len(turns),
        "em": sum(e for _, e in turns) / len(turns),
    }


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F1 (Google's rouge-score: lower-cased,
    split on anything but letters and digits, Porter-stemmed; Lsum is the summary-level
    LCS over sentences split on newlines)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ValueError("ROUGE needs the rouge-score package: pip install rouge-score") from None
    if len(predictions) != len(references) or not predictions:
        raise ValueError("rouge needs as many predictions as references, at least one")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for name in ROUGE_TYPES:
            totals[name] += float(scores[name].fmeasure)
    return {name: total / len(predictions) for name, total in totals.items()}
