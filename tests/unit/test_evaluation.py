"""Evaluation scores: ROUGE against hand-computed values, candidate log-likelihoods and
loss against the unsplit Hugging Face model, accuracy on a model whose answers are known."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from splitfed.clients.data import Example, encode
from splitfed.clients.evaluation import (
    EvalItem,
    EvalSet,
    EvalSettings,
    accuracy_scores,
    choice_logprobs,
    evaluate_set,
    load_tokenizer,
    local_model,
    loss_scores,
    rouge,
)
from splitfed.models.tiny import BUNDLED_DATASET, make_tiny_checkpoint


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # Unigrams: 5 of 6 shared (the x2, cat, on, mat); bigrams: the cat, on the,
        # the mat = 3 of 5; longest common subsequence: the cat on the mat = 5 of 6.
        ("the cat lay on the mat", "the cat sat on the mat", (5 / 6, 3 / 5, 5 / 6)),
        # P = 2/2, R = 2/4: F = 2/3; the only bigram "a c" is not in the reference.
        ("a c", "a b c d", (2 / 3, 0.0, 2 / 3)),
        # Lower-cased, punctuation dropped, Porter-stemmed: running -> run, dogs -> dog.
        ("Running, dogs!", "run dog", (1.0, 1.0, 1.0)),
        # LCS "b c" = 2 of 3 both ways; unigrams all 3 shared; bigrams "b c" = 1 of 2.
        ("b c a", "a b c", (1.0, 1 / 2, 2 / 3)),
        ("", "a b", (0.0, 0.0, 0.0)),
    ],
)
def test_rouge_matches_hand_computed_values(
    prediction: str, reference: str, expected: tuple[float, float, float]
) -> None:
    scores = rouge([prediction], [reference])
    got = (scores["rouge1"], scores["rouge2"], scores["rougeL"])
    assert got == pytest.approx(expected, abs=1e-9)


def test_rouge_averages_over_examples() -> None:
    scores = rouge(["the cat lay on the mat", "a c"], ["the cat sat on the mat", "a b c d"])
    assert scores["rouge1"] == pytest.approx((5 / 6 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="as many predictions as references"):
        rouge(["a"], [])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [
        " ".join(str(v) for v in json.loads(line).values())
        for line in BUNDLED_DATASET.read_text().splitlines()
    ]
    directory = tmp_path_factory.mktemp("tiny") / "model"
    return make_tiny_checkpoint(directory, [*texts, "yes no"], layers=4, hidden_size=32)


ITEMS = (
    EvalItem("Is the fish green?", "yes", ("no", "yes"), 1),
    EvalItem("Add 1 and 2. Is it 4?", "no", ("no", "yes"), 0),
    EvalItem("Which color is the sky?", "blue", ("red", "blue", "green"), 1),
)


def reference_logprob(model: Any, tokenizer: Any, prompt: str, answer: str) -> float:
    """log p(answer's tokens | prompt) with the unsplit model, one sequence at a time."""
    ids, labels = encode(Example(prompt, answer), tokenizer, 512)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[t - 1, labels[t]]) for t in range(1, len(ids)) if labels[t] != -100)


def test_candidate_scores_and_loss_equal_the_unsplit_model(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    model = local_model(model_dir)
    settings = EvalSettings(batch_size=2)  # padded batches that split an item's choices
    scores = choice_logprobs(model, ITEMS, tokenizer, settings)
    expected = [
        [reference_logprob(reference, tokenizer, i.prompt, c) for c in i.choices] for i in ITEMS
    ]
    for got, want in zip(scores, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    accuracy = accuracy_scores(model, ITEMS, tokenizer, settings)["accuracy"]
    right = sum(w.index(max(w)) == i.label for w, i in zip(expected, ITEMS, strict=True))
    assert accuracy == pytest.approx(right / len(ITEMS))
    # Loss: the gold answers' tokens, weighted by token.
    loss = loss_scores(model, ITEMS, tokenizer, settings)
    golds = [reference_logprob(reference, tokenizer, i.prompt, i.target) for i in ITEMS]
    tokens = sum(
        sum(label != -100 for label in encode(Example(i.prompt, i.target), tokenizer, 512)[1])
        for i in ITEMS
    )
    assert loss["tokens"] == tokens
    assert loss["loss"] == pytest.approx(-sum(golds) / tokens, abs=1e-4)
    assert loss["perplexity"] == pytest.approx(math.exp(loss["loss"]))


class Answers:
    """A stand-in model that puts all probability on one token after every position, and
    generates the same tokens for every prompt."""

    def __init__(self, vocab: int, token: int, generated: list[int] | None = None) -> None:
        self.vocab, self.token, self.generated = vocab, token, generated or [token]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*input_ids.shape, self.vocab), -30.0)
        logits[..., self.token] = 0.0
        return logits

    def generate(self, input_ids: torch.Tensor, mask: torch.Tensor, options: Any) -> torch.Tensor:
        return torch.tensor([self.generated] * input_ids.shape[0])


def test_accuracy_picks_the_most_likely_candidate(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    yes = tokenizer.encode("yes", add_special_tokens=False)
    assert len(yes) == 1  # "yes" is one token, so the stand-in prefers it above all
    model = Answers(len(tokenizer), yes[0])
    # Item 0 (yes) is right, 1 (no) is wrong, and so is 2: without "yes" among its
    # choices, all are equally unlikely and the tie goes to the first, "red".
    items = (*ITEMS, EvalItem("Say yes.", "yes", ("yes", "no"), 0))
    assert accuracy_scores(model, items, tokenizer, EvalSettings())["accuracy"] == 0.5


def test_summaries_are_generated_and_scored(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    generated = [*tokenizer.encode("The cat", add_special_tokens=False), tokenizer.eos_token_id]
    model = Answers(len(tokenizer), 3, generated)
    data = EvalSet(
        Path("x"),
        "summarization",
        "document/summary",
        (EvalItem("p", "the cat sat"), EvalItem("q", "a dog")),
    )
    scores = evaluate_set(model, data, tokenizer, EvalSettings(batch_size=1))
    # "The cat" (eos dropped) against "the cat sat": P = 1, R = 2/3, F = 0.8 (ROUGE-1
    # and -L), bigrams 1 of 1 and 1 of 2: F = 2/3; against "a dog": 0.
    assert scores["rouge1"] == pytest.approx(0.8 / 2)
    assert scores["rouge2"] == pytest.approx(2 / 3 / 2)
    assert scores["rougeL"] == scores["rougeLsum"] == pytest.approx(0.8 / 2)  # one sentence
    rouges = {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert set(scores) == {"loss", "perplexity", "tokens", *rouges}
