"""The papers' tasks (clients/tasks.py): each official format read from a small fixture
(tests/data/tasks/), its prompts and labels, its metrics on chosen predictions against
hand-computed values, readable errors, and one run of every task through
``evaluate_models`` and ``splitfed eval`` with a tiny local model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from splitfed.cli import cli
from splitfed.cli.evaluate import TASK_CHOICES
from splitfed.clients import evaluation as ev
from splitfed.clients.tasks import TASK_NAMES, TASKS, TaskItem, load_task_set
from splitfed.models.generation import SamplingOptions
from splitfed.models.tiny import make_tiny_checkpoint

DATA = Path(__file__).parents[1] / "data" / "tasks"
FILES = {name: DATA / (f"{name}.json" if name == "coqa" else f"{name}.jsonl") for name in TASKS}


def items_of(name: str) -> list[TaskItem]:
    items = [i for i in load_task_set(FILES[name], name).items if isinstance(i, TaskItem)]
    assert items
    return items


def test_the_cli_offers_every_task() -> None:
    assert (*ev.TASKS, *TASK_NAMES) == TASK_CHOICES
    assert set(TASK_NAMES) == {
        *("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc", "coqa", "xsum")
    }


@pytest.mark.parametrize(
    ("name", "labels", "choices"),
    [
        ("boolq", [1, 0, 1], ("no", "yes")),
        ("cb", [0, 1, 2, 0], ("true", "false", "neither")),
        ("rte", [0, 1], ("yes", "no")),
        ("wic", [0, 1], ("no", "yes")),
        ("wsc", [1, 0], ("no", "yes")),
        ("multirc", [1, 1, 0, 1, 0], ("no", "yes")),
    ],
)
def test_superglue_labels_and_candidates(
    name: str, labels: list[int], choices: tuple[str, ...]
) -> None:
    items = items_of(name)
    assert [i.label for i in items] == labels
    assert all(i.choices == choices and i.target == choices[i.label] for i in items)


def test_superglue_prompts() -> None:
    boolq, cb, copa = items_of("boolq")[0], items_of("cb")[2], items_of("copa")
    assert boolq.prompt == (
        "Fish - The fish in the pond is green and small.\n"
        "Question: is the fish green?\nAnswer yes or no."
    )
    assert cb.prompt == (
        "I wonder whether the train is late.\nQuestion: given this, is "
        '"the train is late" true, false or neither?\nAnswer true, false or neither.'
    )
    # COPA: the premise continued by "because" (cause) or "so" (effect); the choices as
    # the continuation, first letter lower-cased.
    assert [(i.prompt, i.choices, i.label) for i in copa] == [
        (
            "My body cast a shadow over the grass because",
            ("the sun was rising.", "the grass was cut."),
            0,
        ),
        ("The woman dropped the glass so", ("she bought a new dress.", "the glass broke."), 1),
    ]
    wsc = items_of("wsc")[1]
    assert 'does the pronoun "it" refer to "trophy"?' in wsc.prompt
    wic = items_of("wic")[0]
    assert wic.prompt.startswith("Sentence 1: He sat on the bank of the river.\nSentence 2: ")
    assert 'is the word "bank" used in the same sense' in wic.prompt
    multirc = items_of("multirc")
    assert [i.group for i in multirc] == ["0/0", "0/0", "0/0", "0/1", "0/1"]
    assert 'Question: Which animals does Anna keep?\nIs "A horse" a correct answer?' in (
        multirc[2].prompt
    )


def test_record_substitutes_each_entity() -> None:
    first, second = items_of("record")
    # Entity spans are inclusive; "Paris" and "Curie" occur twice and are offered once.
    assert first.candidates == ("Paris", "Marie Curie", "Stockholm", "Curie", "Warsaw")
    assert first.choices[1] == "Marie Curie moved to France to study."
    assert (first.answers, first.label) == (("Marie Curie", "Curie"), 1)
    assert (second.answers, second.label) == (("Stockholm",), 2)
    # The @highlight lines become a list under the article.
    assert first.prompt == (
        "Paris (CNN) Marie Curie won the Nobel Prize twice, in Stockholm.\n\n"
        "- Curie was born in Warsaw\n- She worked in Paris"
    )


def test_coqa_turns_carry_the_gold_history_and_every_human_answer() -> None:
    turns = items_of("coqa")
    assert [t.answers for t in turns] == [
        ("Anna", "Anna did", "Anna"),
        ("Tom", "Tom", "It was called Tom"),
        ("no", "No, the owner took it", "no"),
    ]
    assert turns[2].target == "no"
    assert turns[2].prompt.endswith(
        "took the cat home.\n\nQ: Who found a cat?\nA: Anna\nQ: What did she call it?\n"
        "A: Tom\nQ: Did she keep it?\nA:"
    )
    assert turns[0].prompt.endswith("home.\n\nQ: Who found a cat?\nA:")


def test_task_metrics_of_chosen_predictions() -> None:
    # MultiRC, labels T T F | T F; picks (1 = yes) T F F | T F:
    # F1a: TP 2, FP 0, FN 1 -> P 1, R 2/3, F1a = 0.8; EM: question 0/1 right only -> 1/2
    multirc = items_of("multirc")
    assert TASKS["multirc"].choice_metrics is not None
    got = TASKS["multirc"].choice_metrics(multirc, [1, 0, 0, 1, 0])
    assert got == pytest.approx({"accuracy": 0.8, "f1a": 0.8, "em": 0.5})
    # ReCoRD: query 1 picks "Curie" (3), a gold answer: F1 1, EM 1; query 2 picks "Paris"
    # (0) for "Stockholm": 0 -> F1 = EM = 1/2
    record = TASKS["record"].choice_metrics
    assert record is not None
    assert record(items_of("record"), [3, 0]) == pytest.approx({"f1": 0.5, "em": 0.5})
    # CB, labels E C N E; picks E E N C: right 2 of 4.
    # entailment: TP 1, FP 1, FN 1 -> 2/4; contradiction: TP 0 -> 0; neutral: TP 1 -> 1
    # macro-F1 = (0.5 + 0 + 1) / 3 = 0.5
    cb = TASKS["cb"].choice_metrics
    assert cb is not None
    assert cb(items_of("cb"), [0, 0, 2, 1]) == pytest.approx({"accuracy": 0.5, "macro_f1": 0.5})
    # CoQA: "Anna" on every turn: turn 1 F1 = EM = 1 (each leave-one-out set has "Anna"),
    # turns 2 and 3: no shared token -> 0. Overall F1 = EM = 1/3.
    coqa = TASKS["coqa"].text_metrics
    assert coqa is not None
    assert coqa(items_of("coqa"), ["Anna"] * 3) == pytest.approx({"f1": 1 / 3, "em": 1 / 3})


@pytest.mark.parametrize(
    ("name", "row", "message"),
    [
        ("boolq", {"question": "q", "passage": "p", "idx": 0}, "missing field 'label'; "),
        ("boolq", {"question": "q", "label": True}, "missing field 'passage'; BoolQ rows need"),
        ("cb", {"premise": "p", "hypothesis": "h", "label": "maybe"}, "label 'maybe' is not"),
        ("copa", {"premise": "p", "choice1": "a", "choice2": "b", "question": "why"}, "cause"),
        ("wsc", {"text": "t", "target": {"span2_text": "it"}, "label": 1}, "'target.span1_text'"),
        (
            "multirc",
            {
                "idx": 0,
                "passage": {
                    "text": "t",
                    "questions": [{"question": "q", "answers": [{"text": "a", "idx": 0}]}],
                },
            },
            "missing field 'passage.questions[0].answers[0].label'",
        ),
        (
            "record",
            {"passage": {"text": "Ann", "entities": [{"start": 0, "end": 2}]}, "qas": [{}]},
            "missing field 'qas[0].query'",
        ),
        ("xsum", {"document": "d", "id": "1"}, "missing field 'summary'; XSum rows need"),
    ],
)
def test_a_missing_field_names_the_file_line_and_field(
    tmp_path: Path, name: str, row: dict[str, Any], message: str
) -> None:
    path = tmp_path / f"{name}.jsonl"
    good = FILES[name].read_text().splitlines()[0]
    path.write_text(good + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r".") as info:
        load_task_set(path, name)
    assert str(info.value).startswith(f"{path}:2: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_coqa_errors_name_the_story(tmp_path: Path) -> None:
    document = json.loads(FILES["coqa"].read_text())
    del document["data"][0]["answers"][1]
    path = tmp_path / "coqa.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"coqa.json data\[0\]: 3 questions but 2 answers"):
        load_task_set(path, "coqa")
    del document["data"][0]["story"]
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"data\[0\]: missing field 'story'; CoQA rows need"):
        load_task_set(path, "coqa")


def test_max_rows_cuts_passages_and_stories() -> None:
    assert len(load_task_set(FILES["boolq"], "boolq", 2).items) == 2
    assert len(load_task_set(FILES["coqa"], "coqa", 1).items) == 3  # one story, 3 turns
    # Other task names are evaluation's own.
    assert load_task_set(FILES["boolq"], "auto").task == "classification"


# --- through a model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny") / "model"
    texts = [line for path in FILES.values() for line in path.read_text().splitlines()]
    return make_tiny_checkpoint(directory, texts, layers=3, hidden_size=32)


class Says:
    """A stand-in model that generates the same tokens for every prompt."""

    def __init__(self, vocab: int, tokens: list[int]) -> None:
        self.vocab, self.tokens = vocab, tokens

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*input_ids.shape, self.vocab))

    def generate(self, input_ids: torch.Tensor, mask: torch.Tensor, options: Any) -> torch.Tensor:
        return torch.tensor([self.tokens] * input_ids.shape[0])


def test_coqa_answers_are_the_first_generated_line(model_dir: Path) -> None:
    tokenizer = ev.load_tokenizer(model_dir)
    said = tokenizer.encode(" Anna\nQ: and then?", add_special_tokens=False)
    model = Says(len(tokenizer), [*said, tokenizer.eos_token_id])
    coqa = load_task_set(FILES["coqa"], "coqa")
    scores = ev.evaluate_set(model, coqa, tokenizer, ev.EvalSettings())
    # "Anna" each turn: F1 = EM = 1/3 (see test_task_metrics_of_chosen_predictions)
    assert scores["f1"] == pytest.approx(1 / 3) and scores["em"] == pytest.approx(1 / 3)
    assert {"loss", "perplexity", "tokens"} <= set(scores)


EXPECTED_METRICS = {
    "boolq": {"accuracy"},
    "cb": {"accuracy", "macro_f1"},
    "copa": {"accuracy"},
    "multirc": {"accuracy", "f1a", "em"},
    "record": {"f1", "em"},
    "rte": {"accuracy"},
    "wic": {"accuracy"},
    "wsc": {"accuracy"},
    "coqa": {"f1", "em"},
    "xsum": {"rouge1", "rouge2", "rougeL", "rougeLsum"},
}


def test_every_task_through_a_model(model_dir: Path) -> None:
    tokenizer = ev.load_tokenizer(model_dir)
    settings = ev.EvalSettings(
        batch_size=4,
        sampling=SamplingOptions(
            max_new_tokens=3, stop_token_ids=(2,), pad_token_id=int(tokenizer.pad_token_id)
        ),
    )
    sets = [load_task_set(FILES[name], name) for name in TASKS]
    report = ev.evaluate_models(ev.local_models(model_dir, None), sets, tokenizer, settings)
    for name, result in zip(TASKS, report.results, strict=True):
        scores = result.scores["model"]
        assert (result.task, result.layout) == (name, TASKS[name].name)
        assert set(scores) == {"loss", "perplexity", "tokens", *EXPECTED_METRICS[name]}, name
        assert all(0 <= scores[m] <= 1 for m in EXPECTED_METRICS[name]), (name, scores)
    # The prediction is the candidate the model finds most likely.
    boolq = sets[0]
    logprobs = ev.choice_logprobs(ev.local_model(model_dir), boolq.items, tokenizer, settings)
    right = [s.index(max(s)) == i.label for s, i in zip(logprobs, boolq.items, strict=True)]
    assert report.results[0].scores["model"]["accuracy"] == pytest.approx(sum(right) / 3)


def test_splitfed_eval_runs_a_task(model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "eval.json"
    args = ["eval", "--model", str(model_dir), "--task", "multirc"]
    args += ["--data", str(FILES["multirc"]), "--output", str(output)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for text in ("multirc.jsonl", "multirc, n=5", "f1a", "em", "accuracy"):
        assert text in result.output
    (only,) = json.loads(output.read_text())["results"]
    assert (only["task"], only["layout"], only["examples"]) == ("multirc", "MultiRC", 5)
    assert {"f1a", "em", "accuracy"} <= set(only["scores"]["model"])
    # A task's file in another task's format: a one-line usage error.
    args = ["eval", "--model", str(model_dir), "--task", "record", "--data", str(FILES["boolq"])]
    result = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "x.json")])
    assert result.exit_code == 2, result.output
    assert "boolq.jsonl:1: missing field 'passage.text'; ReCoRD rows need" in result.output
