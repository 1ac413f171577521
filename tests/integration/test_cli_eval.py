"""``splitfed eval`` through its entry point: split (a backbone over mTLS, after a short
``splitfed train``) and local, the table, the JSON file, and the exit codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from backbone_kit import Deployment, deployment
from click.testing import CliRunner

from splitfed.cli import cli
from splitfed.clients.evaluation import SUMMARY_PROMPT

BOOLQ = [
    {"passage": "The fish is green.", "question": "is the fish green", "label": True},
    {"passage": "The sky is red.", "question": "is the sky blue", "label": False},
    {"passage": "Add 1 and 2. The answer is 3.", "question": "is the answer 3", "label": 1},
]
SUMMARIES = [
    {"document": "Add 2 and 3. The answer is 5.", "summary": "The answer is 5."},
    {"document": "The fish is green and the sky is blue.", "summary": "The fish is green."},
]

# Training reads prompt/response: the summaries as evaluation prompts them.
TRAIN = [
    {"prompt": SUMMARY_PROMPT.format(document=r["document"]), "response": r["summary"]}
    for r in SUMMARIES
]
# And a conversation (the messages layout): training and evaluation read both in one file.
TRAIN += [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "The answer is 5."},
            {"role": "user", "content": "And 1 and 2?"},
            {"role": "assistant", "content": "The answer is 3."},
        ]
    }
]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Path]]:
    """A backbone, and a client config whose checkpoint holds two steps of training."""
    root = tmp_path_factory.mktemp("eval")
    dep = deployment(root, layers=4, hidden_size=32)
    dep.start()
    try:
        dep.ca.issue("hospital-a", "client").write(root / "client-tls")
        config = root / "client.toml"
        config.write_text(
            "[backbone]\n"
            f'address = "{dep.address}"\n'
            'server_name = "backbone.splitfed.local"\n'
            f'tls_dir = "{root / "client-tls"}"\n'
            "[training]\n"
            f'data = "{write_jsonl(root / "train.jsonl", TRAIN)}"\n'
            f'model_path = "{dep.model_path}"\n'
            "max_steps = 2\nbatch_size = 2\nmax_length = 64\n"
            f'checkpoint_dir = "{root / "ckpt"}"\n'
            "[adapter]\nr = 4\nalpha = 8\n"
            "[optimizer]\nlearning_rate = 0.01\n"
        )
        result = CliRunner().invoke(cli, ["train", "--config", str(config)])
        assert result.exit_code == 0, result.output
        yield dep, config
    finally:
        dep.stop()


def test_eval_reports_base_and_adapter_split_and_local(
    trained: tuple[Deployment, Path], tmp_path: Path
) -> None:
    dep, config = trained
    boolq = write_jsonl(tmp_path / "boolq.jsonl", BOOLQ)
    summaries = write_jsonl(tmp_path / "summaries.jsonl", SUMMARIES)
    data = ["--data", str(boolq), "--data", str(summaries), "--max-new-tokens", "4"]
    output = tmp_path / "split.json"
    result = CliRunner().invoke(
        cli, ["eval", "--config", str(config), *data, "--output", str(output)]
    )
    assert result.exit_code == 0, result.output
    for text in ("base", "adapter", "change", "boolq.jsonl", "accuracy", "rougeL"):
        assert text in result.output
    assert f"scores written to {output}" in result.output
    report = json.loads(output.read_text())
    assert list(report["models"]) == ["base", "adapter"]
    assert "adapter of" in report["models"]["adapter"]
    first, second = report["results"]
    assert (first["task"], first["layout"], first["examples"]) == ("classification", "boolq", 3)
    assert second["task"] == "summarization"
    for name in ("base", "adapter"):
        assert set(first["scores"][name]) == {"loss", "perplexity", "tokens", "accuracy"}
        assert 0 <= first["scores"][name]["accuracy"] <= 1
        assert {"rouge1", "rouge2", "rougeL"} <= set(second["scores"][name])
    # Two steps on the summaries moved the adapter's loss on them.
    base, adapter = (second["scores"][n]["loss"] for n in ("base", "adapter"))
    assert abs(adapter - base) > 1e-4
    # The base model split (body on the backbone) scores what it scores in one process.
    local = tmp_path / "local.json"
    result = CliRunner().invoke(
        cli, ["eval", "--model", str(dep.model_path), *data, "--output", str(local)]
    )
    assert result.exit_code == 0, result.output
    local_report = json.loads(local.read_text())
    # A local run's column is what it is: the --model checkpoint (its path beside it).
    assert local_report["models"] == {"model": f"{dep.model_path}, local"}
    for split_result, local_result in zip(report["results"], local_report["results"], strict=True):
        split_scores, local_scores = split_result["scores"]["base"], local_result["scores"]["model"]
        assert set(split_scores) == set(local_scores)
        for metric, value in local_scores.items():
            assert split_scores[metric] == pytest.approx(value, rel=1e-4, abs=1e-5), metric


def test_usage_errors_exit_2(trained: tuple[Deployment, Path], tmp_path: Path) -> None:
    dep, config = trained
    model = str(dep.model_path)
    good = str(write_jsonl(tmp_path / "ok.jsonl", BOOLQ))
    odd = str(write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}]))
    cases = [
        (["--data", good], "give either --config (split) or --model (local)"),
        (["--config", str(config), "--model", model, "--data", good], "give either"),
        (["--trained-model", model, "--data", good], "--trained-model needs --model"),
        (["--model", model, "--data", str(tmp_path / "gone.csv")], "gone.csv does not exist"),
        (["--model", model, "--data", odd], "unknown columns answer, question; rename"),
        (["--model", model, "--data", good, "--no-base"], "nothing to evaluate"),
        (["--model", model], "give --data (or set [training] eval_data)"),
        (["--model", model, "--data", good, "--task", "summarization"], "needs a document"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["eval", *args, "--output", str(tmp_path / "x.json")])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert not (tmp_path / "x.json").exists()


def test_a_session_the_backbone_does_not_know_exits_1(
    trained: tuple[Deployment, Path], tmp_path: Path
) -> None:
    _, config = trained
    checkpoint = tmp_path / "ckpt"
    source = Path(config.read_text().split('checkpoint_dir = "')[1].split('"')[0])
    checkpoint.mkdir()
    for name in ("adapter.safetensors", "client.json"):
        (checkpoint / name).write_bytes((source / name).read_bytes())
    state = json.loads((checkpoint / "client.json").read_text())
    (checkpoint / "client.json").write_text(json.dumps({**state, "session_id": "f" * 24}))
    other = tmp_path / "client.toml"
    other.write_text(config.read_text().replace(str(source), str(checkpoint)))
    data = write_jsonl(tmp_path / "d.jsonl", BOOLQ)
    result = CliRunner().invoke(
        cli, ["eval", "--config", str(other), "--data", str(data), "--no-base"]
    )
    assert result.exit_code == 1, result.output
    assert "error: session 'ffffffff...' does not exist" in result.output
    assert "Traceback" not in result.output


def test_an_exported_adapter_is_the_split_model_in_one_piece(
    trained: tuple[Deployment, Path], tmp_path: Path
) -> None:
    """``adapters export`` (head and tail from the checkpoint, body from the backbone) as a
    PEFT adapter, merged into a full checkpoint: it scores what the split model scores."""
    from peft import PeftConfig

    _, config = trained
    peft_dir, merged = tmp_path / "peft", tmp_path / "merged"
    export = ["adapters", "export", "--config", str(config)]
    result = CliRunner().invoke(cli, [*export, "--output", str(peft_dir), "--merged", str(merged)])
    assert result.exit_code == 0, result.output
    assert "with the body" in result.output
    # Only what splitfed says: no progress bars or deprecation warnings of the libraries.
    for noise in ("Loading weights", "Writing model shards", "it/s]", "Warning"):
        assert noise not in result.output
    # An export never overwrites one silently.
    again = CliRunner().invoke(cli, [*export, "--output", str(peft_dir), "--no-body"])
    assert again.exit_code == 2, again.output
    assert f"error: --output {peft_dir} already exists: give another path, or --force" in (
        again.output
    )
    again = CliRunner().invoke(
        cli, [*export, "--output", str(tmp_path / "p2"), "--merged", str(merged), "--no-body"]
    )
    assert again.exit_code == 2 and f"--merged {merged} already exists" in again.output
    assert not (tmp_path / "p2").exists()
    peft_config = PeftConfig.from_pretrained(str(peft_dir))
    assert peft_config.layers_to_transform == [0, 1, 2, 3]  # head, body and tail blocks
    data = ["--data", str(write_jsonl(tmp_path / "d.jsonl", TRAIN)), "--task", "lm"]
    split, whole = tmp_path / "split.json", tmp_path / "whole.json"
    result = CliRunner().invoke(
        cli, ["eval", "--config", str(config), "--no-base", *data, "--output", str(split)]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        cli, ["eval", "--model", str(merged), *data, "--output", str(whole)]
    )
    assert result.exit_code == 0, result.output
    split_loss = json.loads(split.read_text())["results"][0]["scores"]["adapter"]["loss"]
    whole_loss = json.loads(whole.read_text())["results"][0]["scores"]["model"]["loss"]
    assert whole_loss == pytest.approx(split_loss, rel=1e-4)
    # inspect reads what export wrote.
    summary = tmp_path / "summary.json"
    result = CliRunner().invoke(
        cli, ["adapters", "inspect", str(peft_dir), "--tensors", "--json", str(summary)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(summary.read_text())
    assert report["layers"] == [0, 1, 2, 3] and report["peft_config"]["r"] == 4
    assert report["tensors"] == len(report["rows"]) > 0
    # Errors: no adapter there (2), the body's session gone from the backbone (1).
    result = CliRunner().invoke(cli, ["adapters", "inspect", str(tmp_path)])
    assert result.exit_code == 2 and "no adapter here" in result.output
    elsewhere = f"training.checkpoint_dir={tmp_path / 'none'}"
    result = CliRunner().invoke(cli, [*export, "--output", str(tmp_path / "x"), "--set", elsewhere])
    assert result.exit_code == 2 and "holds no trained adapter" in result.output


def test_chat_keeps_the_conversation_until_reset(trained: tuple[Deployment, Path]) -> None:
    _, config = trained
    result = CliRunner().invoke(
        cli,
        ["chat", "--config", str(config), "--max-new-tokens", "3"],
        input="Add 1 and 2.\nAnd 2 and 2?\n/reset\nHello\n/exit\nnever read\n",
    )
    assert result.exit_code == 0, result.output
    assert "chatting with the trained adapter" in result.output
    assert result.output.count("model> ") == 3
    assert "(conversation forgotten)" in result.output
    # End of input leaves too; the base model needs no checkpoint.
    result = CliRunner().invoke(cli, ["chat", "--config", str(config), "--base"], input="")
    assert result.exit_code == 0, result.output
    assert "chatting with the base model" in result.output


def test_eval_refuses_to_overwrite_its_output_without_force(
    trained: tuple[Deployment, Path], tmp_path: Path
) -> None:
    dep, _ = trained
    output = tmp_path / "eval.json"
    output.write_text("earlier scores\n")
    data = write_jsonl(tmp_path / "d.jsonl", TRAIN)
    run = ["eval", "--model", str(dep.model_path), "--data", str(data), "--output", str(output)]
    result = CliRunner().invoke(cli, run)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"error: --output {output} already exists: give another path, or --force to overwrite"
    )
    assert output.read_text() == "earlier scores\n"
    result = CliRunner().invoke(cli, [*run, "--force"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(output.read_text())["models"]) == ["model"]


def test_chat_says_where_the_system_text_goes_without_a_template(
    trained: tuple[Deployment, Path],
) -> None:
    _, config = trained  # the tiny tokenizer has no chat template
    chat = ["chat", "--config", str(config), "--max-new-tokens", "2"]
    result = CliRunner().invoke(cli, [*chat, "--system", "Be brief."], input="Hi\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("--system is sent as the conversation's first line") == 1
    result = CliRunner().invoke(cli, chat, input="/exit\n")
    assert result.exit_code == 0 and "--system" not in result.stderr


def test_chat_starts_from_a_messages_file(trained: tuple[Deployment, Path], tmp_path: Path) -> None:
    _, config = trained
    start = tmp_path / "start.json"
    start.write_text(
        json.dumps(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Add 1 and 2."},
                {"role": "assistant", "content": "3"},
                {"role": "user", "content": "And 2 and 2?"},
            ]
        )
    )
    chat = ["chat", "--config", str(config), "--max-new-tokens", "2", "--messages", str(start)]
    result = CliRunner().invoke(cli, chat, input="Hello\n/reset\n/exit\n")
    assert result.exit_code == 0, result.output
    assert f"(started from {start}: 1 earlier turns)" in result.output
    assert "you> And 2 and 2?\nmodel> " in result.output  # the file's last question first
    assert result.output.count("model> ") == 2
    # A system message in the file and --system both: refused before connecting.
    result = CliRunner().invoke(cli, [*chat, "--system", "Be long."], input="")
    assert result.exit_code == 2
    assert "has a system message: leave --system out" in result.output
