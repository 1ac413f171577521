"""``splitfed adapters inspect`` shows the quantization an adapter was trained against
(body and client parts), warns that merging an adapter of a quantized body into the
unquantized model shifts its outputs, and with ``--against`` that the body it is to be used
with is quantized differently; ``write_peft`` records it in the adapter file itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open

from splitfed.cli import cli
from splitfed.cli.adapters import _QUANTIZATIONS
from splitfed.models.adapters import AdapterSettings, adapter_state, save_adapter
from splitfed.models.export import write_peft
from splitfed.models.identity import TrainedAgainst
from splitfed.models.loading import load_trainable_ends
from splitfed.models.quantization import QUANTIZATIONS
from splitfed.models.tiny import make_tiny_checkpoint

LORA = AdapterSettings(r=2, alpha=4.0)
TENSORS = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 16)}


def inspect(path: Path, *args: str) -> Result:
    result = CliRunner().invoke(cli, ["adapters", "inspect", str(path), *args])
    assert result.exit_code == 0, result.output
    return result


def adapter(tmp_path: Path, body: str, parts: str = "none") -> Path:
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, TENSORS, TrainedAgainst(body, parts).metadata())
    return path


def test_the_cli_offers_the_quantizations_there_are() -> None:
    assert _QUANTIZATIONS == QUANTIZATIONS


def test_inspect_shows_the_quantization_and_warns_about_merging(tmp_path: Path) -> None:
    result = inspect(adapter(tmp_path, "nf4", "int8"))
    assert "quantization" in result.stdout
    assert "body nf4, client parts int8" in result.stdout
    assert result.stderr.startswith(
        "warning: the adapter was trained against an nf4 body: merging it into the "
        "unquantized model (--merged) shifts its outputs slightly"
    )
    assert "evaluate after merging" in result.stderr
    assert "--against" not in result.stderr


def test_inspect_against_another_body_quantization_warns(tmp_path: Path) -> None:
    path = adapter(tmp_path, "nf4")
    assert (
        "warning: the adapter was trained against an nf4 body but --against names int8: "
        "its outputs will differ"
    ) in inspect(path, "--against", "int8").stderr
    assert "--against names" not in inspect(path, "--against", "nf4").stderr


def test_an_adapter_of_an_unquantized_body_is_not_warned_about(tmp_path: Path) -> None:
    result = inspect(adapter(tmp_path, "none"), "--against", "none")
    assert "body none, client parts none" in result.stdout
    assert result.stderr == ""
    assert "a full-precision (none) body but --against names int8" in (
        inspect(adapter(tmp_path, "none"), "--against", "int8").stderr
    )


def test_an_adapter_from_before_quantization(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    save_adapter(path, TENSORS)
    result = inspect(path)
    assert "quantization" not in result.stdout and result.stderr == ""
    assert "does not record the body quantization" in inspect(path, "--against", "nf4").stderr


def test_a_wrong_against_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["adapters", "inspect", str(adapter(tmp_path, "nf4")), "--against", "int4"]
    )
    assert result.exit_code == 2 and "int4" in result.output


def test_the_json_summary_holds_it(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    inspect(adapter(tmp_path, "int8", "nf4"), "--json", str(summary))
    assert json.loads(summary.read_text())["quantization"] == {"body": "int8", "parts": "nf4"}


def test_a_checkpoint_dir_says_it_in_client_json(tmp_path: Path) -> None:
    """A checkpoint whose adapter file says nothing: its client.json does."""
    save_adapter(tmp_path / "adapter.safetensors", TENSORS)
    state = {"session_id": "s", "step": 3, **TrainedAgainst("int8").metadata()}
    (tmp_path / "client.json").write_text(json.dumps(state))
    assert "body int8, client parts none" in inspect(tmp_path).stdout


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("peft")
    return make_tiny_checkpoint(root / "model", ["Add 1 and 2."], layers=3, hidden_size=16)


def test_a_peft_export_records_it_in_its_file(model: Path, tmp_path: Path) -> None:
    head, tail, _ = load_trainable_ends(model, LORA)
    tensors = {n: t for part in (head, tail) for n, t in adapter_state(part).items()}
    metadata = {"step": 3, **TrainedAgainst("nf4", "int8").metadata()}
    write_peft(tmp_path / "peft", tensors, LORA, model, metadata=metadata)
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as handle:
        found = handle.metadata()
    assert found == {"format": "pt", "body_quantization": "nf4", "quantization": "int8"}
    assert json.loads((tmp_path / "peft" / "splitfed.json").read_text()) == metadata
    assert "body nf4, client parts int8" in inspect(tmp_path / "peft").stdout
    # An export whose adapter file says nothing: its splitfed.json does.
    write_peft(tmp_path / "older", tensors, LORA, model, metadata={"step": 3})
    (tmp_path / "older" / "splitfed.json").write_text(json.dumps(metadata))
    assert "body nf4, client parts int8" in inspect(tmp_path / "older").stdout
