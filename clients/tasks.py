"""The papers' evaluation tasks: the SuperGLUE tasks (BoolQ, CB, COPA, MultiRC, ReCoRD,
RTE, WiC, WSC), CoQA and XSum, each read from its official file format (local files; no
downloads), turned into prompts, and scored with its official metrics
(clients/metrics.py).

Classification tasks rank candidate answers by their log-likelihood
(:func:`~splitfed.clients.evaluation.choice_logprobs`); CoQA and XSum generate
(:func:`~splitfed.clients.evaluation.generate_texts`). Formats, prompts and metrics are
documented in docs/evaluation.md; adding a task is one reader and one entry in
:data:`TASKS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitfed.clients import metrics
from splitfed.clients.data import read_records
from splitfed.clients.evaluation import (
    BOOLQ_PROMPT,
    RTE_PROMPT,
    SUMMARY_PROMPT,
    EvalItem,
    EvalModel,
    EvalSet,
    EvalSettings,
    choice_logprobs,
    generate_texts,
    load_eval_set,
)
from splitfed.files import StrPath

CB_PROMPT = (
    '{premise}\nQuestion: given this, is "{hypothesis}" true, false or neither?\n'
    "Answer true, false or neither."
)
WIC_PROMPT = (
    "Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
    'Question: is the word "{word}" used in the same sense in the two sentences above?\n'
    "Answer yes or no."
)
WSC_PROMPT = (
    '{text}\nQuestion: in the passage above, does the pronoun "{pronoun}" refer to '
    '"{noun}"?\nAnswer yes or no.'
)
MULTIRC_PROMPT = (
    '{paragraph}\nQuestion: {question}\nIs "{answer}" a correct answer?\nAnswer yes or no.'
)
# COPA: the premise continued by a connective, the choices as its continuations.
COPA_CONNECTIVES = {"cause": "because", "effect": "so"}
COQA_TURN = "Q: {question}\nA: {answer}\n"
COQA_QUESTION = "Q: {question}\nA:"
YES_NO = ("no", "yes")


@dataclass(frozen=True)
class TaskItem(EvalItem):
    """An :class:`EvalItem` with what a paper's metric needs beside the label: the gold
    answer texts (ReCoRD, CoQA), the texts the choices stand for (ReCoRD: the entities)
    and the question an answer option belongs to (MultiRC)."""

    answers: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()
    group: str = ""


# What a task's metrics take: the items and, per item, the index of the chosen candidate
# (classification) or the generated text.
ChoiceMetrics = Callable[[Sequence[TaskItem], Sequence[int]], dict[str, float]]
TextMetrics = Callable[[Sequence[TaskItem], Sequence[str]], dict[str, float]]


@dataclass(frozen=True)
class Task:
    name: str
    fields: str  # the fields of the official format, for error messages
    read: Callable[[Path, int | None], list[TaskItem]]
    choice_metrics: ChoiceMetrics | None = None
    text_metrics: TextMetrics | None = None
    # Generated text -> prediction (CoQA: the first line).
    answer: Callable[[str], str] = str.strip


# --- fields and labels ---------------------------------------------------------------


def _field(row: Any, name: str, where: str, task: str, prefix: str = "") -> Any:
    """``row[name]``, or a ValueError naming the file and line and the missing field."""
    if not isinstance(row, Mapping) or name not in row or row[name] is None:
        raise ValueError(
            f"{where}: missing field {prefix + name!r}; {TASKS[task].name} rows need "
            f"{TASKS[task].fields} (the official format, see docs/evaluation.md)"
        )
    return row[name]


def _text(row: Any, name: str, where: str, task: str, prefix: str = "") -> str:
    return str(_field(row, name, where, task, prefix))


def _list(row: Any, name: str, where: str, task: str, prefix: str = "") -> list[Any]:
    value = _field(row, name, where, task, prefix)
    if not isinstance(value, list):
        raise ValueError(f"{where}: field {prefix + name!r} must be a list")
    return value


def _label(row: Any, where: str, names: Sequence[str], prefix: str = "") -> int:
    """The index of the row's label among ``names``; a bool, an index or a name (as a
    CSV or a Hugging Face copy may write it). Test files have no labels."""
    if not isinstance(row, Mapping) or row.get("label") is None:
        raise ValueError(
            f"{where}: missing field {prefix + 'label'!r}; evaluation needs labelled data "
            "(SuperGLUE's test.jsonl has none: evaluate val.jsonl)"
        )
    value = row["label"]
    text = str(int(value) if isinstance(value, bool) else value).strip().lower()
    lowered = [n.lower() for n in names]
    for index, name in enumerate(lowered):
        if text in (str(index), name):
            return index
    allowed = ", ".join(f"{i} or {n}" for i, n in enumerate(names))
    raise ValueError(f"{where}: label {value!r} is not one of {allowed}")


def _rows(path: Path, max_rows: int | None) -> list[tuple[Mapping[str, Any], str]]:
    records = read_records(path)[:max_rows]
    return [(r.fields, r.where) for r in records]


# --- SuperGLUE -----------------------------------------------------------------------


def _yes_no(prompt: str, label: int) -> TaskItem:
    return TaskItem(prompt, YES_NO[label], YES_NO, label)


def read_boolq(path: Path, max_rows: int | None) -> list[TaskItem]:
    items = []
    for row, where in _rows(path, max_rows):
        prompt = BOOLQ_PROMPT.format(
            passage=_text(row, "passage", where, "boolq"),
            question=_text(row, "question", where, "boolq"),
        )
        items.append(_yes_no(prompt, _label(row, where, ("false", "true"))))
    return items


CB_LABELS = ("entailment", "contradiction", "neutral")
CB_ANSWERS = ("true", "false", "neither")


def read_cb(path: Path, max_rows: int | None) -> list[TaskItem]:
    items = []
    for row, where in _rows(path, max_rows):
        prompt = CB_PROMPT.format(
            premise=_text(row, "premise", where, "cb"),
            hypothesis=_text(row, "hypothesis", where, "cb"),
        )
        label = _label(row, where, CB_LABELS)
        items.append(TaskItem(prompt, CB_ANSWERS[label], CB_ANSWERS, label))
    return items


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def read_copa(path: Path, max_rows: int | None) -> list[TaskItem]:
    items = []
    for row, where in _rows(path, max_rows):
        question = _text(row, "question", where, "copa")
        if question not in COPA_CONNECTIVES:
            raise ValueError(f"{where}: question {question!r} is not one of cause, effect")
        premise = _text(row, "premise", where, "copa").strip().rstrip(".")
        prompt = f"{premise} {COPA_CONNECTIVES[question]}"
        choices = tuple(
            _lower_first(_text(row, name, where, "copa").strip()) for name in ("choice1", "choice2")
        )
        label = _label(row, where, ("choice1", "choice2"))
        items.append(TaskItem(prompt, choices[label], choices, label))
    return items


def read_rte(path: Path, max_rows: int | None) -> list[TaskItem]:
    items = []
    for row, where in _rows(path, max_rows):
        prompt = RTE_PROMPT.format(
            premise=_text(row, "premise", where, "rte"),
            hypothesis=_text(row, "hypothesis", where, "rte"),
        )
        label = _label(row, where, ("entailment", "not_entailment"))
        choices = ("yes", "no")
        items.append(TaskItem(prompt, choices[label], choices, label))
    return items


def read_wic(path: Path, max_rows: int | None) -> list[TaskItem]:
    items = []
    for row, where in _rows(path, max_rows):
        prompt = WIC_PROMPT.format(
            word=_text(row, "word", where, "wic"),
            sentence1=_text(row, "sentence1", where, "wic"),
            sentence2=_text(row, "sentence2", where, "wic"),
        )
        items.append(_yes_no(prompt, _label(row, where, ("false", "true"))))
    return items


def read_wsc(path: Path, max_rows: int | None) -> list[TaskItem]:
    items = []
    for row, where in _rows(path, max_rows):
        target = _field(row, "target", where, "wsc")
        prompt = WSC_PROMPT.format(
            text=_text(row, "text", where, "wsc"),
            noun=_text(target, "span1_text", where, "wsc", "target."),
            pronoun=_text(target, "span2_text", where, "wsc", "target."),
        )
        items.append(_yes_no(prompt, _label(row, where, ("false", "true"))))
    return items


def read_multirc(path: Path, max_rows: int | None) -> list[TaskItem]:
    """An item per answer option, its ``group`` the question it answers."""
    items = []
    for row, where in _rows(path, max_rows):
        passage = _field(row, "passage", where, "multirc")
        paragraph = _text(passage, "text", where, "multirc", "passage.")
        questions = _list(passage, "questions", where, "multirc", "passage.")
        for q, question in enumerate(questions):
            prefix = f"passage.questions[{q}]."
            text = _text(question, "question", where, "multirc", prefix)
            group = f"{row.get('idx', where)}/{question.get('idx', q)}"
            for a, answer in enumerate(_list(question, "answers", where, "multirc", prefix)):
                option = f"{prefix}answers[{a}]."
                prompt = MULTIRC_PROMPT.format(
                    paragraph=paragraph,
                    question=text,
                    answer=_text(answer, "text", where, "multirc", option),
                )
                label = _label(answer, where, ("false", "true"), option)
                items.append(TaskItem(prompt, YES_NO[label], YES_NO, label, group=group))
    return items


def record_passage(text: str) -> str:
    """ReCoRD's passage with its ``@highlight`` lines as a list under the article."""
    article, *highlights = text.strip().split("\n@highlight\n")
    return "\n".join([article, "", *(f"- {h}" for h in highlights)]).strip()


def read_record(path: Path, max_rows: int | None) -> list[TaskItem]:
    """An item per query: the query with each entity of the passage in place of
    ``@placeholder`` (entity spans are inclusive: text[start : end + 1])."""
    items = []
    for row, where in _rows(path, max_rows):
        passage = _field(row, "passage", where, "record")
        text = _text(passage, "text", where, "record", "passage.")
        entities: list[str] = []
        for e, entity in enumerate(_list(passage, "entities", where, "record", "passage.")):
            prefix = f"passage.entities[{e}]."
            start = int(_field(entity, "start", where, "record", prefix))
            end = int(_field(entity, "end", where, "record", prefix))
            name = text[start : end + 1]
            if name not in entities:
                entities.append(name)
        if not entities:
            raise ValueError(f"{where}: passage.entities is empty; ReCoRD needs candidates")
        prompt = record_passage(text)
        for q, qa in enumerate(_list(row, "qas", where, "record")):
            prefix = f"qas[{q}]."
            query = _text(qa, "query", where, "record", prefix)
            if "@placeholder" not in query:
                raise ValueError(f"{where}: {prefix}query has no @placeholder")
            answers = tuple(
                _text(answer, "text", where, "record", f"{prefix}answers[{a}].")
                for a, answer in enumerate(_list(qa, "answers", where, "record", prefix))
            )
            if not answers:
                raise ValueError(f"{where}: {prefix}answers is empty; evaluation needs them")
            choices = tuple(query.replace("@placeholder", e) for e in entities)
            label = next((i for i, e in enumerate(entities) if e in answers), -1)
            target = query.replace("@placeholder", answers[0])
            items.append(
                TaskItem(
                    prompt, target, choices, label, answers=answers, candidates=tuple(entities)
                )
            )
    return items


# --- CoQA and XSum -------------------------------------------------------------------


def _coqa_stories(path: Path, max_rows: int | None) -> list[tuple[Mapping[str, Any], str]]:
    """The stories of the official JSON ({"version", "data": [...]}); a JSON Lines file of
    stories (one a line) is read as well."""
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        if isinstance(document, Mapping):
            stories = _list(document, "data", str(path), "coqa")
            if not stories:
                raise ValueError(f"{path}: 'data' holds no stories")
            return [(s, f"{path} data[{i}]") for i, s in enumerate(stories[:max_rows])]
    return _rows(path, max_rows)


def coqa_prompt(story: str, history: Sequence[tuple[str, str]], question: str) -> str:
    """The story, the earlier turns with their gold answers, and the question."""
    turns = "".join(COQA_TURN.format(question=q, answer=a) for q, a in history)
    return f"{story}\n\n{turns}{COQA_QUESTION.format(question=question)}"


def read_coqa(path: Path, max_rows: int | None) -> list[TaskItem]:
    """An item per turn, its answers the gold answer and the additional human answers."""
    items = []
    for story, where in _coqa_stories(path, max_rows):
        text = _text(story, "story", where, "coqa")
        questions = _list(story, "questions", where, "coqa")
        answers = _list(story, "answers", where, "coqa")
        extra = story.get("additional_answers") or {}
        if not isinstance(extra, Mapping):
            raise ValueError(f"{where}: additional_answers must map names to answer lists")
        references = [answers, *(extra[k] for k in sorted(extra, key=str))]
        for number, column in enumerate(references):
            if len(column) != len(questions):
                name = "answers" if number == 0 else "additional_answers"
                raise ValueError(
                    f"{where}: {len(questions)} questions but {len(column)} {name}; "
                    "every turn needs an answer"
                )
        history: list[tuple[str, str]] = []
        for turn, question in enumerate(questions):
            asked = _text(question, "input_text", where, "coqa", f"questions[{turn}].")
            golds = tuple(
                _text(column[turn], "input_text", where, "coqa", f"answers[{turn}].")
                for column in references
            )
            items.append(TaskItem(coqa_prompt(text, history, asked), golds[0], answers=golds))
            history.append((asked, golds[0]))
    return items


def coqa_answer(text: str) -> str:
    """The answer of a generated turn: its first line (a model may go on with the next
    question)."""
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def read_xsum(path: Path, max_rows: int | None) -> list[TaskItem]:
    items = []
    for row, where in _rows(path, max_rows):
        document = _text(row, "document", where, "xsum")
        items.append(
            TaskItem(SUMMARY_PROMPT.format(document=document), _text(row, "summary", where, "xsum"))
        )
    return items


# --- metrics of predictions ----------------------------------------------------------


def _accuracy(items: Sequence[TaskItem], picks: Sequence[int]) -> dict[str, float]:
    return {"accuracy": metrics.accuracy(picks, [i.label for i in items])}


def _cb(items: Sequence[TaskItem], picks: Sequence[int]) -> dict[str, float]:
    labels = [i.label for i in items]
    return {
        "accuracy": metrics.accuracy(picks, labels),
        "macro_f1": metrics.macro_f1(picks, labels, len(CB_LABELS)),
    }


def _multirc(items: Sequence[TaskItem], picks: Sequence[int]) -> dict[str, float]:
    return metrics.multirc_scores(
        [p == 1 for p in picks], [i.label == 1 for i in items], [i.group for i in items]
    )


def _record(items: Sequence[TaskItem], picks: Sequence[int]) -> dict[str, float]:
    predictions = [i.candidates[p] for i, p in zip(items, picks, strict=True)]
    return metrics.record_scores(predictions, [i.answers for i in items])


def _coqa(items: Sequence[TaskItem], texts: Sequence[str]) -> dict[str, float]:
    return metrics.coqa_scores(texts, [i.answers for i in items])


def _rouge(items: Sequence[TaskItem], texts: Sequence[str]) -> dict[str, float]:
    return metrics.rouge(texts, [i.target for i in items])


TASKS: dict[str, Task] = {
    task.name.lower(): task
    for task in (
        Task("BoolQ", "question, passage, label", read_boolq, _accuracy),
        Task("CB", "premise, hypothesis, label", read_cb, _cb),
        Task("COPA", "premise, choice1, choice2, question, label", read_copa, _accuracy),
        Task(
            "MultiRC",
            "passage.text and passage.questions[].question, answers[].text, answers[].label",
            read_multirc,
            _multirc,
        ),
        Task(
            "ReCoRD",
            "passage.text, passage.entities[].start/end, qas[].query, qas[].answers[].text",
            read_record,
            _record,
        ),
        Task("RTE", "premise, hypothesis, label", read_rte, _accuracy),
        Task("WiC", "word, sentence1, sentence2, label", read_wic, _accuracy),
        Task("WSC", "text, target.span1_text, target.span2_text, label", read_wsc, _accuracy),
        Task(
            "CoQA",
            "story, questions[].input_text, answers[].input_text",
            read_coqa,
            text_metrics=_coqa,
            answer=coqa_answer,
        ),
        Task("XSum", "document, summary", read_xsum, text_metrics=_rouge),
    )
}
TASK_NAMES = tuple(TASKS)


def task_scores(
    task: Task, items: Sequence[TaskItem], model: EvalModel, tokenizer: Any, settings: EvalSettings
) -> dict[str, float]:
    """``task``'s metrics of ``model`` on ``items``: the most likely candidate of each
    (classification), or the generated answers."""
    if task.choice_metrics is not None:
        logprobs = choice_logprobs(model, items, tokenizer, settings)
        return task.choice_metrics(items, [s.index(max(s)) for s in logprobs])
    assert task.text_metrics is not None
    texts = generate_texts(model, [i.prompt for i in items], tokenizer, settings)
    return task.text_metrics(items, [task.answer(t) for t in texts])


def load_task_set(path: StrPath, name: str, max_rows: int | None = None) -> EvalSet:
    """The items of a paper's task (:data:`TASK_NAMES`) from its official file; another
    ``name`` (auto, lm, classification, summarization) is :func:`load_eval_set`'s.
    ``max_rows`` cuts the file's rows (MultiRC and ReCoRD: passages; CoQA: stories)."""
    path = Path(path)
    task = TASKS.get(name)
    if task is None:
        return load_eval_set(path, name, max_rows)
    items = tuple(task.read(path, max_rows))
    if not items:
        raise ValueError(f"{path} holds no {task.name} examples")

    def scorer(model: EvalModel, tokenizer: Any, settings: EvalSettings) -> dict[str, float]:
        return task_scores(task, items, model, tokenizer, settings)

    return EvalSet(path, name, task.name, items, scorer=scorer)
