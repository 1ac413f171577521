"""Config overrides: file < SPLITFED__ environment < --set, with errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitfed.cli.configs import detect_kind, load
from splitfed.config import apply_overrides, read_config


def test_precedence_and_value_types() -> None:
    data = {"training": {"max_steps": 3, "perturbation": {"sigma": 0.5}}}
    env = {
        "SPLITFED__TRAINING__MAX_STEPS": "5",
        "SPLITFED__TRAINING__PERTURBATION__SIGMA": "1e-1",
        "SPLITFED__ADAPTER__TARGET_MODULES": "[q_proj, v_proj]",
        "SPLITFED_LOG_FORMAT": "json",  # a CLI option's variable, not a config field
        "HOME": "/root",
    }
    out = apply_overrides(data, ["training.max_steps=7", "adapter.kind=lora"], env)
    assert out["training"]["max_steps"] == 7  # --set beats the environment
    assert out["training"]["perturbation"]["sigma"] == pytest.approx(0.1)
    assert out["adapter"] == {"target_modules": ["q_proj", "v_proj"], "kind": "lora"}


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        (["max_steps=3"], {}, "expected SECTION.FIELD=VALUE"),
        (["training.max_steps"], {}, "expected SECTION.FIELD=VALUE"),
        (["training.max_steps.x=1"], {}, "training.max_steps is a value, not a section"),
        ([], {"SPLITFED__TRAINING": "1"}, "expected SPLITFED__SECTION__FIELD=value"),
    ],
)
def test_bad_overrides_are_named(overrides: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides({"training": {"max_steps": 3}}, overrides, env)


def test_read_config_applies_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: 3\n")
    monkeypatch.setenv("SPLITFED__TRAINING__MAX_STEPS", "9")
    assert read_config(path, ())["training"]["max_steps"] == 9
    assert read_config(path, ["training.max_steps=4"])["training"]["max_steps"] == 4


@pytest.mark.parametrize(
    ("sections", "kind"),
    [
        ({"keymanager": {}}, "keymanager"),
        ({"aggregator": {}}, "aggregator"),
        ({"training": {}, "backbone": {"address": "x:1"}}, "client"),
        ({"backbone": {"model_path": "m"}, "server": {}}, "backbone"),
    ],
)
def test_kinds_are_told_by_their_sections(sections: dict[str, object], kind: str) -> None:
    assert detect_kind(sections) == kind


def test_unknown_sections_and_kinds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot tell what this config is for"):
        detect_kind({"server": {}})
    path = tmp_path / "a.toml"
    path.write_text('[aggregator]\nstate_dir = "s"\n[trainig]\nx = 1\n')
    with pytest.raises(ValueError, match=r"an? aggregator config has no \[trainig\] section"):
        load(path)
    with pytest.raises(ValueError, match="unknown config kind 'robot'"):
        load(path, "robot")
