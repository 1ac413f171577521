"""Every TOML and YAML example in the README and docs/ parses and is valid against the
config schema: a reader who copies one gets a file splitfed accepts, not a syntax error
or an unknown field."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from splitfed.cli.configs import KINDS, detect_kind

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```(toml|yaml)\n(.*?)```", re.S)


def _examples() -> list[tuple[str, str, str]]:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match[1], match[2]))
    return found


EXAMPLES = _examples()


def test_the_docs_have_config_examples() -> None:
    assert len(EXAMPLES) >= 10  # the regex finds them (10 when this test was written)


@pytest.mark.parametrize(("where", "kind", "body"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_each_config_example_parses(where: str, kind: str, body: str) -> None:
    if kind == "toml":
        tomllib.loads(body)
    else:
        yaml.safe_load(body)


# A snippet shows some sections of a config; it is checked inside the smallest complete
# config of its kind, so that every field it sets is checked against the schema (names,
# types, ranges) exactly as `splitfed config validate` and `serve` check them.
BASES: dict[str, dict[str, Any]] = {
    "keymanager": {"keymanager": {"state_dir": "km"}},
    "aggregator": {"aggregator": {"state_dir": "aggregator-state"}},
    "backbone": {"backbone": {"model_path": "model"}},
    "client": {
        "backbone": {"address": "backbone:7450"},
        "training": {"data": "train.jsonl", "model_path": "model"},
    },
}


# What the docs show that is not a splitfed config, and how to tell it.
def _buf_config(data: Mapping[str, Any]) -> bool:
    return "plugins" in data and "version" in data


NOT_SPLITFED: dict[str, Callable[[Mapping[str, Any]], bool]] = {"buf.gen.yaml": _buf_config}


def _merged(base: Mapping[str, Any], snippet: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in snippet.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            merged[key] = _merged(old, value)
        else:
            merged[key] = value
    return merged


def _kind(data: Mapping[str, Any]) -> str:
    try:
        return detect_kind(data)
    except ValueError:
        return "client"  # [federated], [adapter], [security]...: sections of a client


@pytest.mark.parametrize(("where", "kind", "body"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_each_config_example_is_valid(where: str, kind: str, body: str) -> None:
    data = tomllib.loads(body) if kind == "toml" else yaml.safe_load(body)
    assert isinstance(data, dict), f"{where}: not a mapping"
    if any(matches(data) for matches in NOT_SPLITFED.values()):
        return
    config_kind = _kind(data)
    KINDS[config_kind](_merged(BASES[config_kind], data))


def test_the_schema_check_catches_a_wrong_field() -> None:
    with pytest.raises(ValueError, match="has no field 'max_stepz'"):
        KINDS["client"](_merged(BASES["client"], {"training": {"max_stepz": 3}}))
