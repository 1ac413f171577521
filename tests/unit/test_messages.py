"""The ``messages`` layout: multi-turn conversations, with and without a chat template,
labels on the assistant turns only, their errors, every file format, and the same framing
in training, evaluation and chat."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from splitfed.cli import cli
from splitfed.clients.app import Chat
from splitfed.clients.data import (
    IGNORE,
    Conversation,
    Example,
    Message,
    MicroBatches,
    conversation_parts,
    conversation_tokens,
    encode,
    messages_of,
    messages_tokens,
    parse_messages,
    read_conversation,
    read_examples,
)
from splitfed.clients.evaluation import (
    EvalSettings,
    evaluate_set,
    generation_prompt,
    load_eval_set,
    load_tokenizer,
)
from splitfed.models.generation import LocalStage, SamplingOptions
from splitfed.models.loading import load_body, load_head, load_tail
from splitfed.models.tiny import make_tiny_checkpoint, train_tokenizer

# A ChatML-style template, as Qwen's and others' are.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ["Be brief. Add 1 and 2. The answer is 3. And 2 and 2? 4. Then 2 and 3? 5."] * 4

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 1 and 2."},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "And 2 and 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Then 2 and 3?"},
    {"role": "assistant", "content": "5"},
]
MESSAGES = tuple(Message(m["role"], m["content"]) for m in CONVERSATION)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The tiny test tokenizer with ChatML's markers as special tokens and its template
    (``chat_template=False`` gives the plain format)."""
    made = train_tokenizer(TEXTS)
    made.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    made.chat_template = CHATML
    return made


def labelled_runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each run of labelled tokens (labels equal to the ids there)."""
    runs: list[list[int]] = []
    previous = IGNORE
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run) for run in runs]


def test_with_a_template_only_assistant_turns_and_their_end_carry_labels(tokenizer: Any) -> None:
    ids, labels = messages_tokens(tokenizer, MESSAGES)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # Each assistant turn's content and what the template ends it with; not the system
    # or user turns, nor the "<|im_start|>assistant\n" header before each answer.
    assert labelled_runs(tokenizer, ids, labels) == [
        "3<|im_end|>\n",
        "4<|im_end|>\n",
        "5<|im_end|>\n",
    ]


def test_without_a_template_bos_lines_and_eos_after_each_answer(tokenizer: Any) -> None:
    ids, labels = messages_tokens(tokenizer, MESSAGES, chat_template=False)
    text = "<s>Be brief.\nAdd 1 and 2.\n3</s>And 2 and 2?\n4</s>Then 2 and 3?\n5</s>"
    assert tokenizer.decode(ids) == text
    assert labelled_runs(tokenizer, ids, labels) == ["3</s>", "4</s>", "5</s>"]


@pytest.mark.parametrize("template", [True, False])
def test_a_one_turn_conversation_is_exactly_a_prompt_response_row(
    tokenizer: Any, template: bool, tmp_path: Path
) -> None:
    path = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "Add 1 and 2.", "response": "3"},
        {"messages": [{"role": "user", "content": "Add 1 and 2."}, CONVERSATION[2]]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    single, conversation = read_examples(path)
    assert isinstance(single, Example) and isinstance(conversation, Conversation)
    expected = encode(single, tokenizer, 512, chat_template=template)
    assert encode(conversation, tokenizer, 512, chat_template=template) == expected
    assert any(label != IGNORE for label in expected[1])


@pytest.mark.parametrize("template", [True, False])
def test_a_chat_prompt_is_the_conversation_up_to_the_last_answer(
    tokenizer: Any, template: bool
) -> None:
    ids, labels = messages_tokens(tokenizer, MESSAGES, chat_template=template)
    answer = max(i for i, label in enumerate(labels) if label == IGNORE) + 1
    system, turns, prompt = conversation_parts(MESSAGES[:-1])
    assert (system, prompt) == ("Be brief.", "Then 2 and 3?")
    assert messages_of(system, turns, prompt or "") == MESSAGES[:-1]
    prompt_ids = conversation_tokens(
        tokenizer, turns, prompt or "", system=system, chat_template=template
    )
    assert prompt_ids == ids[:answer]


def test_a_cut_conversation_keeps_what_fits(tokenizer: Any) -> None:
    full = encode(Conversation(MESSAGES), tokenizer, 512)
    second = [i for i, label in enumerate(full[1]) if label != IGNORE][3]  # "4"'s turn
    cut = encode(Conversation(MESSAGES), tokenizer, second + 1)
    assert cut == (full[0][: second + 1], full[1][: second + 1])
    assert labelled_runs(tokenizer, *cut) == ["3<|im_end|>\n", "4"]


def test_a_template_that_rewrites_earlier_turns_is_an_error(tokenizer: Any, tmp_path: Path) -> None:
    # Earlier answers rendered differently from the last one (as templates that strip
    # reasoning from past turns do): the turn-by-turn difference does not exist.
    rewriting = copy.deepcopy(tokenizer)
    rewriting.chat_template = CHATML.replace(
        "{{ m['content'] }}",
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}"
        "{{ m['content'] }}{% endif %}",
    )
    with pytest.raises(ValueError, match=r"d.jsonl:1: the tokenizer's chat template does not") as e:
        encode(Conversation(MESSAGES, "d.jsonl:1"), rewriting, 512)
    assert "turn chat_template off" in str(e.value) and "\n" not in str(e.value)
    plain = encode(Conversation(MESSAGES), rewriting, 512, chat_template=False)
    assert plain == encode(Conversation(MESSAGES), tokenizer, 512, chat_template=False)
    # Evaluation names the row too.
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:1: the tokenizer's chat template does not"):
        evaluate_set(Recorder(len(tokenizer), [2]), load_eval_set(path), rewriting, EvalSettings())


def test_content_may_be_a_list_of_text_parts() -> None:
    parts = [{"type": "text", "text": "Add 1"}, {"type": "text", "text": "and 2."}]
    messages = parse_messages([{"role": "user", "content": parts}, CONVERSATION[2]], "x")
    assert messages[0] == Message("user", "Add 1\nand 2.")


USER, ANSWER = CONVERSATION[1], CONVERSATION[2]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "messages is empty"),
        ({"role": "user"}, "messages must be a list of .role, content. objects, got dict"),
        ("[not json", "messages is not JSON"),
        ([USER, {"role": "tool", "content": "x"}], "message 2 has unknown role 'tool'; use system"),
        ([USER, {"role": "assistant", "content": 3}], "message 2 content must be a string or a"),
        ([USER, {"role": "assistant"}], "message 2 is not an object with a role and a content"),
        (
            [{"role": "user", "content": [{"type": "image_url"}]}, ANSWER],
            "message 1 has a 'image_url' content part; only",
        ),
        ([USER], "no assistant turn, so nothing to learn or score"),
        ([USER, ANSWER, CONVERSATION[0]], "message 3 is a system message; only the first"),
        ([USER, USER, ANSWER], "message 2 is a second user turn in a row; merge them"),
        ([CONVERSATION[0], ANSWER], "message 2 is an assistant turn before any user turn"),
    ],
)
def test_bad_conversations_are_one_line_errors_naming_file_and_line(
    tmp_path: Path, messages: Any, message: str
) -> None:
    path = tmp_path / "d.jsonl"
    good = {"messages": [USER, ANSWER]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        read_examples(path)
    assert str(info.value).startswith(f"{path}:2: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_reads_messages(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    rows = [{"messages": CONVERSATION, "id": "a"}]
    if suffix == ".jsonl":
        path.write_text(json.dumps(rows[0]) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":  # the column holds the messages as a JSON string
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "messages"])
            writer.writeheader()
            writer.writerow({"id": "a", "messages": json.dumps(CONVERSATION)})
    else:  # a list of structs, as datasets writes chat data
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
    assert read_examples(path) == [Conversation(MESSAGES)]


def test_training_batches_hold_the_labelled_conversations(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps(ROW_2) + "\n")
    data = MicroBatches(read_examples(path), tokenizer, batch_size=2, shuffle=False)
    batch = data.batch(0)
    first = messages_tokens(tokenizer, MESSAGES)
    assert batch.input_ids[0, : len(first[0])].tolist() == first[0]
    assert batch.labels[0, : len(first[1])].tolist() == first[1]
    assert (batch.labels[0, len(first[1]) :] == IGNORE).all()


ROW_2 = {"messages": [USER, {"role": "assistant", "content": "3."}]}


class Recorder:
    """A stand-in model: uniform logits, and a fixed answer it records the prompts of."""

    def __init__(self, vocab: int, answer: list[int]) -> None:
        self.vocab, self.answer, self.prompts = vocab, answer, []

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*input_ids.shape, self.vocab))

    def generate(self, input_ids: torch.Tensor, mask: torch.Tensor, options: Any) -> torch.Tensor:
        self.prompts += [row[m.bool()].tolist() for row, m in zip(input_ids, mask, strict=True)]
        return torch.tensor([self.answer] * input_ids.shape[0])


def test_eval_scores_assistant_tokens_and_generates_the_last_answer(
    tokenizer: Any, tmp_path: Path
) -> None:
    path = tmp_path / "eval.jsonl"
    trailing = [*CONVERSATION, {"role": "user", "content": "Thanks."}]  # left out when generating
    path.write_text(json.dumps({"messages": trailing}) + "\n")
    data = load_eval_set(path)
    assert (data.task, data.layout, data.items[0].target) == ("lm", "messages", "5")
    model = Recorder(len(tokenizer), tokenizer.encode("5", add_special_tokens=False))
    scores = evaluate_set(model, data, tokenizer, EvalSettings())
    _, labels = messages_tokens(tokenizer, MESSAGES)
    assert scores["tokens"] == sum(label != IGNORE for label in labels)
    assert scores["loss"] == pytest.approx(float(torch.log(torch.tensor(len(tokenizer)))))
    generating = load_eval_set(path, "summarization")
    scores = evaluate_set(model, generating, tokenizer, EvalSettings())
    assert scores["rouge1"] == 1.0
    context = messages_tokens(tokenizer, MESSAGES[:-1], generation_prompt=True)[0]
    assert model.prompts == [context]
    assert generation_prompt(generating.items[0], tokenizer, chat_template=True) == context


def test_a_chat_starts_from_a_messages_file(tmp_path: Path) -> None:
    path = tmp_path / "start.json"
    path.write_text(json.dumps({"messages": CONVERSATION[:4]}))
    system, turns, pending = conversation_parts(read_conversation(path))
    assert (system, turns, pending) == ("Be brief.", [("Add 1 and 2.", "3")], "And 2 and 2?")
    row = tmp_path / "start.jsonl"
    row.write_text(json.dumps(CONVERSATION[:3]) + "\n")
    assert conversation_parts(read_conversation(row)) == (system, turns, None)
    row.write_text((json.dumps({"messages": CONVERSATION}) + "\n") * 2)
    with pytest.raises(ValueError, match=r"start.jsonl: holds 2 rows; give one conversation"):
        read_conversation(row)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose saved tokenizer has the ChatML template."""
    model = make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny") / "model", TEXTS, layers=3, hidden_size=16
    )
    saved = train_tokenizer(TEXTS)
    saved.chat_template = CHATML
    saved.save_pretrained(model)
    return model


def test_chat_answers_the_files_last_turn_and_resets_to_its_start(
    model_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "start.json"
    path.write_text(json.dumps(CONVERSATION[:4]))
    system, turns, pending = conversation_parts(read_conversation(path))
    assert pending is not None
    tokenizer = load_tokenizer(model_dir)
    split = SimpleNamespace(
        head=load_head(model_dir),
        body=lambda: LocalStage(load_body(model_dir)),
        tail=load_tail(model_dir),
    )
    options = SamplingOptions(max_new_tokens=2, stop_token_ids=(2,), pad_token_id=0)
    chat = Chat(split, tokenizer, options, system=system, turns=turns)  # type: ignore[arg-type]
    expected = messages_tokens(tokenizer, MESSAGES[:4], generation_prompt=True)[0]
    assert chat._tokens(pending) == expected
    reply = chat.say(pending)
    assert chat.turns == [*turns, (pending, reply)]
    chat.reset()
    assert chat.turns == turns


def test_cli_eval_reads_a_messages_file_with_the_models_template(
    model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps(ROW_2) + "\n")
    output = tmp_path / "eval.json"
    args = ["eval", "--model", str(model_dir), "--data", str(data), "--output", str(output)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(output.read_text())["results"][0]
    assert (report["task"], report["layout"], report["examples"]) == ("lm", "messages", 2)
    saved = load_tokenizer(model_dir)
    tokens = sum(
        sum(label != IGNORE for label in messages_tokens(saved, m)[1])
        for m in (MESSAGES, parse_messages(ROW_2["messages"], ""))
    )
    assert report["scores"]["model"]["tokens"] == tokens
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [USER]}) + "\n")
    result = CliRunner().invoke(cli, [*args[:4], str(bad), "--output", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert f"{bad}:1: the conversation has no assistant turn" in result.output


@pytest.mark.parametrize(
    ("start", "extra", "message"),
    [
        ([USER, USER], [], "start.json: message 2 is a second user turn in a row"),
        (CONVERSATION[:2], ["--system", "Be long."], "has a system message: leave --system out"),
    ],
)
def test_cli_chat_checks_its_messages_file_before_connecting(
    model_dir: Path, tmp_path: Path, start: list[dict[str, str]], extra: list[str], message: str
) -> None:
    config = tmp_path / "client.toml"
    config.write_text(
        '[backbone]\naddress = "backbone.invalid:7450"\n'
        f'[training]\ndata = "train.jsonl"\nmodel_path = "{model_dir}"\n'
    )
    path = tmp_path / "start.json"
    path.write_text(json.dumps(start))
    args = ["chat", "--config", str(config), "--messages", str(path), *extra]
    result = CliRunner().invoke(cli, args, input="/exit\n")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
