"""Evaluation of a model on local data: loss and perplexity, accuracy on
classification-style prompts (scored by the log-likelihood of each candidate answer), and
ROUGE-1/2/L/Lsum of generated summaries (the papers' tasks, in clients/tasks.py, bring
their own metrics, from clients/metrics.py). The base model and a trained adapter are
evaluated side by side, through the split path (head and tail here, the body on the
backbone, over its Generate stream) or in this process for a full local checkpoint.

How each score is computed is in docs/evaluation.md.

One module on purpose (it is a little over 500 lines): the evaluator, its scores and the
report they make are one feature, and each score is small.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoTokenizer

from splitfed.clients.app import ClientConfig, split_session
from splitfed.clients.backbone import BackboneClient
from splitfed.clients.data import (
    IGNORE,
    LAYOUTS,
    Conversation,
    Example,
    Message,
    Record,
    collate,
    encode,
    example_of,
    left_padded,
    messages_tokens,
    prompt_tokens,
    read_records,
)
from splitfed.clients.keys import KeyManagerClient
from splitfed.clients.metrics import ROUGE_TYPES, rouge
from splitfed.files import StrPath
from splitfed.models.generation import BodyStage, LocalStage, SamplingOptions, SplitGenerator
from splitfed.models.loading import load_body, load_head, load_tail
from splitfed.models.parts import Head, Tail
from splitfed.security.releases import EVALUATION

logger = logging.getLogger(__name__)

TASKS = ("auto", "lm", "classification", "summarization")
# Lower is better for these; higher for the rest.
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})

BOOLQ_PROMPT = "{passage}\nQuestion: {question}?\nAnswer yes or no."
RTE_PROMPT = '{premise}\nQuestion: does this imply that "{hypothesis}"?\nAnswer yes or no.'
SUMMARY_PROMPT = "Summarize the following text.\n\n{document}"
# (document field, summary field) of the summarisation layouts: XSum, CNN/DailyMail, SAMSum.
SUMMARY_FIELDS = (("document", "summary"), ("article", "highlights"), ("dialogue", "summary"))
ALL_LAYOUTS = (
    f"{LAYOUTS}, passage/question/label (BoolQ), premise/hypothesis/label (RTE), "
    "prompt/choices/label, document/summary, article/highlights or dialogue/summary"
)


@dataclass(frozen=True)
class EvalItem:
    """One example: the prompt, the reference answer (its loss is measured; ROUGE compares
    generations with it), and for classification the candidate answers and the index of
    the right one. A ``messages`` row keeps its conversation in ``messages`` (the loss is
    that of all its assistant turns), with its last assistant turn as ``target`` (what
    generation is compared with) and no ``prompt``."""

    prompt: str
    target: str
    choices: tuple[str, ...] = ()
    label: int = -1
    messages: tuple[Message, ...] = ()
    # The file and line it came from (errors name it; not compared).
    where: str = field(default="", compare=False)


# A task's own scores (the papers' tasks, clients/tasks.py): model, tokenizer, settings.
TaskScorer = Callable[["EvalModel", Any, "EvalSettings"], dict[str, float]]


@dataclass(frozen=True)
class EvalSet:
    path: Path
    task: str  # lm, classification, summarization, or one of the papers' tasks
    layout: str
    items: tuple[EvalItem, ...]
    # The papers' tasks score themselves (after loss and perplexity).
    scorer: TaskScorer | None = field(default=None, compare=False, repr=False)


def _label(value: Any, names: Sequence[tuple[str, ...]], where: str) -> int:
    """The index of ``value`` among label ``names`` (each a tuple of spellings)."""
    if isinstance(value, bool):
        value = int(value)
    text = str(value).strip().lower()
    for index, spellings in enumerate(names):
        if text == str(index) or text in spellings:
            return index
    allowed = ", ".join(f"{i} or {'/'.join(s)}" for i, s in enumerate(names))
    raise ValueError(f"{where}: label {value!r} is not one of {allowed}")


def _choices(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):  # CSV: "a|b|c"
        value = value.split("|")
    if not isinstance(value, Sequence) or len(value) < 2:
        raise ValueError(f"{where}: choices must be a list of at least two answers (CSV: a|b)")
    return tuple(str(c) for c in value)


def classification_item(row: Mapping[str, Any], where: str) -> tuple[str, EvalItem] | None:
    """(layout, item) of a classification row, or None if the row is not one."""
    if "label" not in row:
        return None
    if "passage" in row and "question" in row:  # SuperGLUE BoolQ
        choices: tuple[str, ...] = ("no", "yes")
        label = _label(row["label"], [("false", "no"), ("true", "yes")], where)
        prompt = BOOLQ_PROMPT.format(passage=row["passage"], question=row["question"])
        layout = "boolq"
    elif "premise" in row and "hypothesis" in row:  # SuperGLUE RTE
        choices = ("yes", "no")
        label = _label(row["label"], [("entailment",), ("not_entailment",)], where)
        prompt = RTE_PROMPT.format(premise=row["premise"], hypothesis=row["hypothesis"])
        layout = "rte"
    elif "prompt" in row and "choices" in row:
        choices = _choices(row["choices"], where)
        label = _label(row["label"], [(c.strip().lower(),) for c in choices], where)
        prompt, layout = str(row["prompt"]), "choices"
    else:
        return None
    return layout, EvalItem(prompt, choices[label], choices, label)


def summarization_item(row: Mapping[str, Any], where: str) -> tuple[str, EvalItem] | None:
    for document, summary in SUMMARY_FIELDS:
        if document in row and summary in row:
            prompt = SUMMARY_PROMPT.format(document=row[document])
            return f"{document}/{summary}", EvalItem(prompt, str(row[summary]))
    return None


def lm_item(row: Mapping[str, Any], where: str) -> tuple[str, EvalItem]:
    example = example_of(row, where)
    if isinstance(example, Conversation):
        last = [m for m in example.messages if m.role == "assistant"][-1]
        return "messages", EvalItem("", last.content, messages=example.messages, where=where)
    layout = "text" if not example.prompt else "prompt/response"
    return layout, EvalItem(example.prompt, example.response)


def _item(row: Mapping[str, Any], where: str, task: str) -> tuple[str, str, EvalItem]:
    """(task, layout, item) of a row for ``task`` (``auto``: by the row's fields)."""
    if task in ("auto", "classification"):
        found = classification_item(row, where)
        if found is not None:
            return "classification", *found
        if task == "classification":
            raise ValueError(
                f"{where}: not a classification row (fields {', '.join(sorted(row))}); "
                "give passage/question/label, premise/hypothesis/label or prompt/choices/label"
            )
    if task in ("auto", "summarization"):
        found = summarization_item(row, where)
        if found is not None:
            return "summarization", *found
    if "messages" in row:  # its errors are the row's, whatever the task
        layout, item = lm_item(row, where)
    else:
        try:
            layout, item = lm_item(row, where)
        except ValueError:
            layout, item = "", EvalItem("", "")
    if task == "summarization" and not (item.prompt or item.messages):
        raise ValueError(
            f"{where}: not a summarization row (fields {', '.join(sorted(row))}); it needs "
            "a document and a reference summary: document/summary, article/highlights, "
            "dialogue/summary or prompt/response"
        )
    if not layout:
        raise ValueError(
            f"{where}: unknown columns {', '.join(sorted(row)) or '(none)'}; "
            f"rename them to one of {ALL_LAYOUTS}"
        )
    return ("lm" if task == "auto" else task), layout, item


def load_eval_set(path: StrPath, task: str = "auto", max_examples: int | None = None) -> EvalSet:
    """Read an evaluation file; ``task`` ``auto`` takes the task from the first row's
    fields, and every row must then fit it."""
    path = Path(path)
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    records: list[Record] = read_records(path)
    if max_examples is not None:
        records = records[:max_examples]
    first_task, layout, _ = _item(records[0].fields, records[0].where, task)
    items = []
    for record in records:
        row_task, _, item = _item(record.fields, record.where, first_task)
        assert row_task == first_task
        items.append(item)
    return EvalSet(Path(path), first_task, layout, tuple(items))


# --- models --------------------------------------------------------------------------


class EvalModel(Protocol):
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, options: SamplingOptions
    ) -> torch.Tensor: ...


class PartsModel:
    """Head and tail here and the body wherever ``body`` runs it (the backbone's
    Generate stream, or :class:`LocalStage` in this process)."""

    def __init__(self, head: Head, body: BodyStage, tail: Tail) -> None:
        self.head, self.body, self.tail = head, body, tail

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.body.reset()
        hidden = self.head(input_ids, attention_mask)
        hidden = self.body.step(hidden, attention_mask)
        logits: torch.Tensor = self.tail(hidden, attention_mask)
        return logits

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, options: SamplingOptions
    ) -> torch.Tensor:
        generator = SplitGenerator(self.head, self.body, self.tail)
        return generator.generate(input_ids, attention_mask, options)


def local_model(path: StrPath, *, quantization: str = "none") -> PartsModel:
    """A full local checkpoint, run in this process through the same split parts (with
    ``quantization``, their blocks' projections quantized as a backbone's and a client's
    would be: to compare a merged adapter with the quantized split model it came from)."""
    path = Path(path)
    head = load_head(path, quantization=quantization)
    body = load_body(path, quantization=quantization)
    return PartsModel(head, LocalStage(body), load_tail(path, quantization=quantization))


# --- scores --------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 8
    max_length: int = 512
    chat_template: bool = True
    sampling: SamplingOptions = field(default_factory=SamplingOptions)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")


def _chunks(rows: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def sequence_nll(
    model: EvalModel,
    rows: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
) -> list[tuple[float, int]]:
    """For each (ids, labels) row: the summed negative log-likelihood of its labelled
    tokens (labels != -100) given the tokens before them, and how many there are."""
    out: list[tuple[float, int]] = []
    for chunk in _chunks(rows, batch_size):
        batch = collate(chunk, pad_id)
        logits = model.logits(batch.input_ids, batch.attention_mask)
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = batch.labels[:, 1:]
        valid = targets != IGNORE
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums = -(picked * valid).sum(dim=1)
        out.extend(
            (float(s), int(n))
            for s, n in zip(sums.tolist(), valid.sum(dim=1).tolist(), strict=True)
        )
    return out


def loss_scores(
    model: EvalModel, items: Sequence[EvalItem], tokenizer: Any, settings: EvalSettings
) -> dict[str, float]:
    """Mean next-token loss over all reference tokens (weighted by tokens, not by
    example) and its exponential, the perplexity."""
    rows = [
        encode(
            Conversation(i.messages, i.where) if i.messages else Example(i.prompt, i.target),
            tokenizer,
            settings.max_length,
            chat_template=settings.chat_template,
        )
        for i in items
    ]
    results = sequence_nll(model, rows, int(tokenizer.pad_token_id), settings.batch_size)
    total = sum(s for s, _ in results)
    tokens = sum(n for _, n in results)
    if tokens == 0:
        raise ValueError(f"no reference token fits in max_length {settings.max_length}")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(tokens)}


def _keep_end(row: tuple[list[int], list[int]], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a too long row from the front, so the answer at its end survives."""
    ids, labels = row
    return ids[-max_length:], labels[-max_length:]


def choice_logprobs(
    model: EvalModel, items: Sequence[EvalItem], tokenizer: Any, settings: EvalSettings
) -> list[list[float]]:
    """For each item, the log-likelihood of each candidate answer (its tokens as training
    formats a response, end of turn included) given the prompt."""
    rows, owners = [], []
    for index, item in enumerate(items):
        for choice in item.choices:
            row = encode(
                Example(item.prompt, choice),
                tokenizer,
                1 << 30,
                chat_template=settings.chat_template,
            )
            rows.append(_keep_end(row, settings.max_length))
            owners.append(index)
    results = sequence_nll(model, rows, int(tokenizer.pad_token_id), settings.batch_size)
    scores: list[list[float]] = [[] for _ in items]
    for owner, (nll, _) in zip(owners, results, strict=True):
        scores[owner].append(-nll)
    return scores


def accuracy_scores(
    model: EvalModel, items: Sequence[EvalItem], tokenizer: Any, settings: EvalSettings
) -> dict[str, float]:
    """The share of items whose right answer has the highest log-likelihood (ties go to
    the earlier candidate)."""
    scores = choice_logprobs(model, items, tokenizer, settings)
    correct = sum(s.index(max(s)) == item.label for s, item in zip(scores, items, strict=True))
    return {"accuracy": correct / len(items)}


def generation_prompt(item: EvalItem, tokenizer: Any, *, chat_template: bool) -> list[int]:
    """The tokens ``item``'s answer is generated from: its prompt as training formats it;
    for a ``messages`` row, the conversation before its last assistant turn and the
    generation prompt (later turns are left out)."""
    if item.messages:
        last = max(i for i, m in enumerate(item.messages) if m.role == "assistant")
        ids, _ = messages_tokens(
            tokenizer,
            item.messages[:last],
            chat_template=chat_template,
            generation_prompt=True,
            where=item.where,
        )
        return ids
    return prompt_tokens(tokenizer, item.prompt, chat_template=chat_template)


def generate_texts(
    model: EvalModel, prompts: Sequence[str], tokenizer: Any, settings: EvalSettings
) -> list[str]:
    """Completions of ``prompts`` (as training formats them), decoded without special
    tokens."""
    rows = [prompt_tokens(tokenizer, p, chat_template=settings.chat_template) for p in prompts]
    return generate_from(model, rows, tokenizer, settings)


def generate_from(
    model: EvalModel, prompts: Sequence[list[int]], tokenizer: Any, settings: EvalSettings
) -> list[str]:
    """Completions of prompt tokens (their end kept where they are too long), decoded
    without special tokens."""
    keep = max(1, settings.max_length - settings.sampling.max_new_tokens)
    texts: list[str] = []
    for chunk in _chunks(prompts, settings.batch_size):
        rows = [p[-keep:] for p in chunk]
        ids, mask = left_padded(rows, int(tokenizer.pad_token_id))
        tokens = model.generate(ids, mask, settings.sampling)
        texts.extend(
            str(tokenizer.decode(row, skip_special_tokens=True)).strip() for row in tokens.tolist()
        )
    return texts


def evaluate_set(
    model: EvalModel, eval_set: EvalSet, tokenizer: Any, settings: EvalSettings
) -> dict[str, float]:
    """Every score of ``eval_set``'s task: loss and perplexity always, accuracy for
    classification, ROUGE for summarization, a paper's task its own metrics."""
    items = eval_set.items
    scores = loss_scores(model, items, tokenizer, settings)
    if eval_set.scorer is not None:
        scores.update(eval_set.scorer(model, tokenizer, settings))
    elif eval_set.task == "classification":
        scores.update(accuracy_scores(model, items, tokenizer, settings))
    elif eval_set.task == "summarization":
        prompts = [
            generation_prompt(i, tokenizer, chat_template=settings.chat_template) for i in items
        ]
        predictions = generate_from(model, prompts, tokenizer, settings)
        scores.update(rouge(predictions, [i.target for i in items]))
    return scores


# --- reports -------------------------------------------------------------------------


# A model column: what it is, and how to open it (once, for all data sets).
ModelSource = tuple[str, Callable[[], AbstractContextManager[EvalModel]]]


@dataclass
class SetResult:
    path: str
    task: str
    layout: str
    examples: int
    # model column ("base", "adapter"; local: "model", "trained-model") -> metric -> value
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Report:
    # column -> what it is (a checkpoint, a session)
    models: dict[str, str]
    results: list[SetResult]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_models(
    models: Mapping[str, ModelSource],
    sets: Sequence[EvalSet],
    tokenizer: Any,
    settings: EvalSettings,
) -> Report:
    """Evaluate every set with each model: ``models`` maps a column name to a description
    and a function returning a context manager that yields the :class:`EvalModel`
    (opened once per model, for all sets)."""
    results = [SetResult(str(s.path), s.task, s.layout, len(s.items)) for s in sets]
    for name, (_, open_model) in models.items():
        with open_model() as model:
            for eval_set, result in zip(sets, results, strict=True):
                logger.info("[eval] %s on %s (%s)", name, eval_set.path, eval_set.task)
                result.scores[name] = evaluate_set(model, eval_set, tokenizer, settings)
    return Report({name: description for name, (description, _) in models.items()}, results)


METRIC_ORDER = ("loss", "perplexity", "accuracy", "macro_f1", "f1a", "f1", "em", *ROUGE_TYPES)


def results_table(report: Report) -> Any:
    """The report as a rich table: a row per data set and metric, a column per model,
    and the change from the first model to the last."""
    from rich.table import Table

    columns = list(report.models)
    table = Table(title="splitfed eval")
    table.add_column("data")
    table.add_column("metric")
    for column in columns:
        table.add_column(column, justify="right")
    if len(columns) > 1:
        table.add_column("change", justify="right")
    for result in report.results:
        labels = [Path(result.path).name, f"{result.task}, n={result.examples}"]
        metrics = [m for m in METRIC_ORDER if m in result.scores[columns[0]]]
        for index, metric in enumerate(metrics):
            values = [result.scores[c][metric] for c in columns]
            row = [labels[index] if index < len(labels) else "", metric]
            row += [f"{v:.4f}" for v in values]
            if len(columns) > 1:
                change = values[-1] - values[0]
                better = change < 0 if metric in LOWER_IS_BETTER else change > 0
                style = "green" if better else "red"
                row.append(f"[{style}]{change:+.4f}[/{style}]" if change else f"{change:+.4f}")
            table.add_row(*row, end_section=index == len(metrics) - 1)
    return table


def load_tokenizer(path: StrPath) -> Any:
    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# --- where the models come from ------------------------------------------------------


def trained_checkpoint(config: ClientConfig) -> Path | None:
    """The training checkpoint of ``config``, if training has written one."""
    directory = config.training.checkpoint_dir
    if directory is None or not (directory / "client.json").is_file():
        return None
    return directory


def split_models(
    client: BackboneClient,
    config: ClientConfig,
    keymanager: KeyManagerClient | None = None,
    *,
    base: bool = True,
    adapter: bool = True,
) -> dict[str, ModelSource]:
    """The base model and the checkpoint's trained adapter, each as a split model: head
    and tail here, the body in a session on the backbone (over its Generate stream)."""
    if config.training.perturbation.enabled:
        logger.warning(
            "[eval] evaluation sends the hidden states of the evaluation data without "
            "perturbation (counted in the privacy ledger as evaluation releases sent "
            "without noise, outside epsilon); use data that may be seen by the backbone"
        )

    @contextmanager
    def open_split(trained: bool) -> Iterator[EvalModel]:
        with split_session(client, config, keymanager, trained=trained) as split:
            if trained and not split.trained:
                raise ValueError("the config names no training checkpoint with an adapter")
            yield PartsModel(split.head, split.body(EVALUATION, perturb=False), split.tail)

    where = f"{config.training.model_path} via {config.backbone.address}"
    models: dict[str, ModelSource] = {}
    if base:
        models["base"] = (f"{where}, base model", lambda: open_split(False))
    if adapter:
        checkpoint = trained_checkpoint(config)
        if checkpoint is None:
            raise ValueError("no trained adapter: [training] checkpoint_dir holds no client.json")
        models["adapter"] = (f"{where}, adapter of {checkpoint}", lambda: open_split(True))
    return models


# The columns of a local evaluation: ``--model`` and ``--trained-model``.
LOCAL_COLUMNS = ("model", "trained-model")


def local_models(base: StrPath | None, trained: StrPath | None) -> dict[str, ModelSource]:
    """Full local checkpoints (``trained``: e.g. one with a merged adapter), run here, in
    the columns :data:`LOCAL_COLUMNS` (what they are, not what they might hold)."""

    @contextmanager
    def open_local(path: Path) -> Iterator[EvalModel]:
        yield local_model(path)

    models: dict[str, ModelSource] = {}
    for name, path in zip(LOCAL_COLUMNS, (base, trained), strict=True):
        if path is not None:
            models[name] = (f"{path}, local", partial(open_local, Path(path)))
    return models
