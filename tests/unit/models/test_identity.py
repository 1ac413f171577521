"""What an adapter was trained against (models/identity.py): the metadata it is recorded
under, read back from each place splitfed writes it, and the warnings when it differs."""

from __future__ import annotations

import json

import pytest

from splitfed.models.identity import (
    BODY_KEY,
    PARTS_KEY,
    TrainedAgainst,
    body_mismatch,
    merge_warning,
    mismatches,
    parts_mismatch,
    stated,
)


def test_an_old_backbone_states_an_unquantized_body() -> None:
    assert stated("") == "none"
    assert stated("nf4") == "nf4"
    assert TrainedAgainst("", "int8") == TrainedAgainst("none", "int8")


def test_the_metadata_round_trips() -> None:
    trained = TrainedAgainst("nf4", "int8")
    assert trained.metadata() == {BODY_KEY: "nf4", PARTS_KEY: "int8"}
    assert TrainedAgainst.from_metadata(trained.metadata()) == trained
    # ``adapters export --format safetensors`` keeps it in its JSON too.
    nested = {"splitfed": json.dumps({"step": 3, **trained.metadata()})}
    assert TrainedAgainst.from_metadata(nested) == trained


@pytest.mark.parametrize(
    "metadata",
    [{}, {"format": "pt"}, {"splitfed": "{not json"}, {"splitfed": "[1]"}, {PARTS_KEY: "nf4"}],
)
def test_an_adapter_from_before_quantization_says_nothing(metadata: dict[str, str]) -> None:
    assert TrainedAgainst.from_metadata(metadata) is None


def test_the_client_parts_quantization_is_checked() -> None:
    with pytest.raises(ValueError, match="quantization must be one of none, int8, nf4"):
        TrainedAgainst("none", "int4")


def test_a_different_body_is_warned_about_naming_both() -> None:
    assert body_mismatch("nf4", "nf4") == ""
    assert body_mismatch("", "none") == ""  # an old backbone's "" is an unquantized body
    assert body_mismatch("nf4", "int8") == (
        "the adapter was trained against an nf4 body but this backbone serves int8: "
        "its outputs will differ"
    )
    assert "trained against an int8 body" in body_mismatch("int8", "")
    assert "serves a full-precision (none) one" in body_mismatch("int8", "")
    assert "but --against names nf4" in body_mismatch("none", "nf4", where="--against names")


def test_different_client_parts_are_warned_about() -> None:
    assert parts_mismatch("int8", "int8") == ""
    assert "quantized nf4 but [training] quantization is none" in parts_mismatch("nf4", "none")
    assert mismatches(None, "int8", "nf4") == []
    assert mismatches(TrainedAgainst("int8", "nf4"), "int8", "nf4") == []
    found = mismatches(TrainedAgainst("int8", "nf4"), "", "none")
    assert len(found) == 2 and "int8 body" in found[0] and "client parts" in found[1]


def test_merging_an_adapter_of_a_quantized_body_is_warned_about() -> None:
    assert merge_warning("none") == "" and merge_warning("") == ""
    assert "evaluate after merging" in merge_warning("int8")
