"""Every TOML and YAML example in the README and docs/ parses: a reader who copies one
gets a file the config loader can read, not a syntax error."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

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
