"""The layer contract (.importlinter) holds, covers every core module, and breaks when a
module imports across it."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / ".importlinter"
# The installed layout: pyproject.toml's package-dir maps these folders into splitfed/.
MAPPED = ("services", "clients", "security", "models")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def link_tree(root: Path, extra: dict[str, str] | None = None) -> Path:
    """A tree of links that shows the installed layout of splitfed under ``root``, with
    ``extra`` modules (path inside the package -> source) added as real files."""
    package = root / "splitfed"
    package.mkdir(parents=True)
    for entry in (ROOT / "splitfed").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for part in MAPPED:
        (package / part).symlink_to(ROOT / part)
    for name, source in (extra or {}).items():
        path = package / name
        # Copy the folder it lands in, so the fixture never writes into the checkout.
        top = package / Path(name).parts[0]
        if top.is_symlink():
            target = top.resolve()
            top.unlink()
            shutil.copytree(target, top, ignore=shutil.ignore_patterns("__pycache__"))
        path.write_text(source)
    return root


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), str(CONTRACT), "--no-cache"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_contract_holds(tmp_path: Path) -> None:
    result = lint(link_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        (
            "clients/_forbidden.py",
            "import splitfed.services.backbone.state\n",
            "splitfed.clients is not allowed to import splitfed.services",
        ),
        (
            "models/_forbidden.py",
            "import splitfed.transport\n",
            "splitfed.models is not allowed to import splitfed.transport",
        ),
        (
            "security/_forbidden.py",
            "import splitfed.models.parts\n",
            "splitfed.security is not allowed to import splitfed.models",
        ),
    ],
)
def test_a_forbidden_import_breaks_it(
    tmp_path: Path, module: str, source: str, broken: str
) -> None:
    result = lint(link_tree(tmp_path, {module: source}))
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout


def test_every_core_module_is_in_a_layer() -> None:
    """A module added to splitfed/ is core only once the contract names it."""
    parser = configparser.ConfigParser()
    parser.read(CONTRACT)
    layers = parser["importlinter:contract:layers"]["layers"]
    named = {
        name.strip().strip("()")
        for line in layers.splitlines()
        for name in line.replace("|", ":").split(":")
        if name.strip()
    }
    modules = {
        f"splitfed.{p.stem if p.is_file() else p.name}"
        for p in (ROOT / "splitfed").iterdir()
        if (p.suffix == ".py" and p.stem not in {"__init__", "__main__"})
        or (p.is_dir() and (p / "__init__.py").is_file())
    }
    assert modules <= named, f"not in a layer of .importlinter: {sorted(modules - named)}"
