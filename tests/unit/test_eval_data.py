"""Training and evaluation data: file formats, field layouts, errors, chat templates."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from splitfed.clients.app import prompt_ids
from splitfed.clients.data import Example, encode, prompt_tokens, read_examples, read_records
from splitfed.clients.evaluation import EvalItem, load_eval_set
from splitfed.models.tiny import train_tokenizer

LAYOUTS: dict[str, tuple[list[dict[str, Any]], list[Example]]] = {
    "prompt/response": (
        [{"prompt": "Add 1 and 2.", "response": "3"}, {"prompt": "Hi", "response": "Hello"}],
        [Example("Add 1 and 2.", "3"), Example("Hi", "Hello")],
    ),
    "instruction/input/output": (
        [
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        ],
        [Example("Translate\nchat", "cat"), Example("Say hi", "hi")],
    ),
    "text": ([{"text": "The rain, is wet."}], [Example("", "The rain, is wet.")]),
}


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` in the format that ``path``'s suffix names."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["prompt"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_format_reads_every_layout(tmp_path: Path, suffix: str, layout: str) -> None:
    rows, expected = LAYOUTS[layout]
    assert read_examples(write(tmp_path / f"data{suffix}", rows)) == expected


def test_csv_values_keep_commas_quotes_and_newlines(tmp_path: Path) -> None:
    rows = [{"prompt": 'He said "no, never"', "response": "line one\nline two"}]
    assert read_examples(write(tmp_path / "d.csv", rows)) == [
        Example('He said "no, never"', "line one\nline two")
    ]


def one_line_error(path: Path) -> str:
    with pytest.raises(ValueError, match=r".") as info:
        read_examples(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_unknown_columns_name_the_file_and_the_layouts(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"d{suffix}", [{"question": "q", "answer": "a"}])
    message = one_line_error(path)
    assert "unknown columns answer, question" in message
    assert "rename them to messages, prompt/response, instruction/input/output or text" in message


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_an_empty_file_is_an_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), str(path))
    else:
        path.write_text({".jsonl": "\n\n", ".json": "[]", ".csv": "prompt,response\n"}[suffix])
    assert "holds no examples; add at least one row" in one_line_error(path)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    message = one_line_error(tmp_path / "nope.jsonl")
    assert "does not exist; give a .jsonl, .json, .csv, .parquet file" in message


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.txt", "x", "unknown data format '.txt'; use one of .jsonl, .json, .csv, .parquet"),
        ("d.jsonl", '{"text": "a"}\n{"text": ', ":2: not JSON"),
        ("d.json", '{"text": "a"}', "expected a JSON array of objects, got dict"),
        ("d.jsonl", '["a"]', "expected an object with named fields"),
        ("d.csv", "prompt,response\na,b,c\n", "more values than the header has columns"),
        ("d.parquet", "not parquet", "not a Parquet file"),
    ],
)
def test_malformed_files_are_one_line_errors(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert message in one_line_error(path)


def test_records_keep_where_they_came_from(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", [{"text": "a"}, {"text": "b"}])
    assert [r.where for r in read_records(path)] == [f"{path}:2", f"{path}:3"]


# --- evaluation layouts --------------------------------------------------------------


def test_boolq_rows_become_yes_no_questions(tmp_path: Path) -> None:
    rows = [
        {"passage": "Sky is blue.", "question": "is the sky blue", "label": True},
        {"passage": "P", "question": "q", "label": 0},
        {"passage": "P", "question": "q", "label": "true"},
    ]
    data = load_eval_set(write(tmp_path / "boolq.jsonl", rows))
    assert (data.task, data.layout) == ("classification", "boolq")
    assert data.items[0] == EvalItem(
        "Sky is blue.\nQuestion: is the sky blue?\nAnswer yes or no.", "yes", ("no", "yes"), 1
    )
    assert [i.label for i in data.items] == [1, 0, 1]


def test_rte_labels_by_name_or_number_from_csv(tmp_path: Path) -> None:
    rows = [
        {"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": "entailment"},
        {"premise": "A dog runs.", "hypothesis": "A cat sleeps.", "label": "1"},
    ]
    data = load_eval_set(write(tmp_path / "rte.csv", rows))
    assert (data.task, data.layout) == ("classification", "rte")
    assert [(i.target, i.label) for i in data.items] == [("yes", 0), ("no", 1)]
    assert data.items[0].prompt.startswith("A dog runs.\nQuestion: does this imply that")


def test_prompt_choices_label_with_csv_choices(tmp_path: Path) -> None:
    rows = [{"prompt": "Color of grass?", "choices": "red|green|blue", "label": "green"}]
    data = load_eval_set(write(tmp_path / "mc.csv", rows))
    assert data.items[0] == EvalItem("Color of grass?", "green", ("red", "green", "blue"), 1)


def test_summarization_and_lm_layouts(tmp_path: Path) -> None:
    summaries = load_eval_set(
        write(tmp_path / "s.jsonl", [{"article": "Long text.", "highlights": "Short."}])
    )
    assert (summaries.task, summaries.layout) == ("summarization", "article/highlights")
    assert summaries.items[0].target == "Short."
    lm = load_eval_set(write(tmp_path / "lm.jsonl", LAYOUTS["prompt/response"][0]))
    assert (lm.task, lm.items[0]) == ("lm", EvalItem("Add 1 and 2.", "3"))
    # An explicit task: generate a response from the prompt and score it with ROUGE.
    forced = load_eval_set(tmp_path / "lm.jsonl", "summarization", max_examples=1)
    assert (forced.task, len(forced.items)) == ("summarization", 1)


@pytest.mark.parametrize(
    ("rows", "task", "message"),
    [
        ([{"passage": "p", "question": "q", "label": 7}], "auto", "label 7 is not one of"),
        ([{"prompt": "p", "choices": ["a"], "label": 0}], "auto", "at least two answers"),
        ([{"prompt": "p", "response": "r"}], "classification", "not a classification row"),
        (
            [{"text": "t"}],
            "summarization",
            "not a summarization row .fields text.; it needs a document",
        ),
        ([{"passage": "p", "label": 1}], "auto", "unknown columns label, passage"),
        (
            [{"passage": "p", "question": "q", "label": 1}, {"prompt": "p", "response": "r"}],
            "auto",
            "d.jsonl:2: not a classification row",
        ),
    ],
)
def test_evaluation_rows_that_do_not_fit(
    tmp_path: Path, rows: list[dict[str, Any]], task: str, message: str
) -> None:
    path = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=message) as info:
        load_eval_set(path, task)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# --- chat templates ------------------------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers() -> tuple[Any, Any]:
    plain = train_tokenizer(["Add 1 and 2. The answer is 3.", "<|user|> <|assistant|>"] * 4)
    templated = train_tokenizer(["Add 1 and 2. The answer is 3.", "<|user|> <|assistant|>"] * 4)
    templated.chat_template = TEMPLATE
    return plain, templated


def test_the_chat_template_frames_prompt_and_response(tokenizers: tuple[Any, Any]) -> None:
    _, tokenizer = tokenizers
    ids, labels = encode(Example("Add 1 and 2.", "3"), tokenizer, 512)
    prompt = tokenizer.encode("<|user|>Add 1 and 2.</s><|assistant|>", add_special_tokens=False)
    response = tokenizer.encode("3</s>", add_special_tokens=False)
    assert ids == prompt + response
    assert labels == [-100] * len(prompt) + response
    assert prompt_tokens(tokenizer, "Add 1 and 2.") == prompt
    generation_ids, _ = prompt_ids(tokenizer, ["Add 1 and 2."])
    assert generation_ids[0].tolist() == prompt


def test_without_a_template_or_turned_off_the_plain_format_is_used(
    tokenizers: tuple[Any, Any],
) -> None:
    plain, templated = tokenizers
    example = Example("Add 1 and 2.", "3")
    expected = encode(example, plain, 512)
    prompt = [1, *plain.encode("Add 1 and 2.\n", add_special_tokens=False)]
    response = [*plain.encode("3", add_special_tokens=False), 2]
    assert expected == (prompt + response, [-100] * len(prompt) + response)
    assert encode(example, templated, 512, chat_template=False) == expected
    # Plain text (no prompt) is never wrapped in a chat turn.
    assert encode(Example("", "3"), templated, 512) == encode(Example("", "3"), plain, 512)


def test_a_conversation_is_framed_turn_by_turn(tokenizers: tuple[Any, Any]) -> None:
    from splitfed.clients.data import conversation_tokens

    plain, templated = tokenizers
    turns = [("Add 1 and 2.", "3")]
    got = conversation_tokens(templated, turns, "And 2 and 2?", system="Be brief.")
    text = (
        "<|system|>Be brief.</s><|user|>Add 1 and 2.</s><|assistant|>3</s>"
        "<|user|>And 2 and 2?</s><|assistant|>"
    )
    assert got == templated.encode(text, add_special_tokens=False)
    # The first turn without a system turn is the training prompt exactly.
    assert conversation_tokens(templated, [], "Add 1 and 2.") == prompt_tokens(
        templated, "Add 1 and 2."
    )
    # Without a template: the training format, a line per user turn, eos after each reply.
    encoded = [plain.encode(t, add_special_tokens=False) for t in ("Add 1 and 2.\n", "3")]
    assert conversation_tokens(plain, turns, "And 2 and 2?") == [
        1,
        *encoded[0],
        *encoded[1],
        2,
        *plain.encode("And 2 and 2?\n", add_special_tokens=False),
    ]
