"""docs/security.md's threat model names, line by line, the test that proves it: every
test it names must exist, so the table cannot drift from the suite."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# "unit/test_x.py::test_y" starts a module; a following "::test_z" stays in it.
REFERENCE = re.compile(
    r"(?:(?P<module>(?:unit|integration|models)(?:/\w+)?/test_\w+\.py))?::(?P<test>test_\w+)"
)


def _threat_model() -> str:
    text = (ROOT / "docs" / "security.md").read_text()
    start = text.index("## Threat model")
    return text[start : text.index("\n## ", start + 1)]


def _tests_in(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_every_test_the_threat_model_names_exists() -> None:
    named: list[tuple[str, str]] = []
    for line in _threat_model().splitlines():
        module = None
        for match in REFERENCE.finditer(line):
            module = match["module"] or module
            assert module is not None, f"a test without its module in: {line}"
            named.append((module, match["test"]))
    assert len(named) > 40
    missing = [
        f"{module}::{test}"
        for module, test in named
        if not (ROOT / "tests" / module).is_file() or test not in _tests_in(ROOT / "tests" / module)
    ]
    assert not missing, missing
