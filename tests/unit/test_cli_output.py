"""What the model commands print: only splitfed's own output and logs (the libraries'
progress bars, advisory logs and deprecation warnings hidden, and put back afterwards),
no file overwritten without ``--force``, and ``--system`` kept without a chat template."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from splitfed.cli.options import library_output_hidden, refuse_overwrite


def test_the_libraries_are_quiet_and_splitfed_is_not(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with library_output_hidden(), caplog.at_level(logging.INFO):
            warnings.warn("`old_arg` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("going away", DeprecationWarning, stacklevel=1)
            hf_logging.get_logger("transformers.modeling_utils").warning("advice")
            list(hf_logging.tqdm(range(3), desc="Loading weights"))
            assert hf_logging.get_logger("transformers").getEffectiveLevel() == logging.ERROR
            logging.getLogger("splitfed.clients.evaluation").info("[eval] model on d.jsonl")
            warnings.warn("ours", UserWarning, stacklevel=1)
        warnings.warn("after", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["ours", "after"]
    assert "[eval] model on d.jsonl" in caplog.text
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert "advice" not in captured.err + captured.out
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before


def test_nothing_is_overwritten_without_force(tmp_path: Path) -> None:
    refuse_overwrite(tmp_path / "new.json", "--output", False)
    refuse_overwrite(None, "--merged", False)
    empty = tmp_path / "empty"
    empty.mkdir()
    refuse_overwrite(empty, "--output", False)  # made ahead, nothing to lose
    (empty / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "eval.json").write_text("{}")
    for path in (empty, tmp_path / "eval.json"):
        with pytest.raises(ValueError, match=r"--output .* already exists: .* --force"):
            refuse_overwrite(path, "--output", False)
        refuse_overwrite(path, "--output", True)


def test_without_a_chat_template_the_system_text_is_the_first_line() -> None:
    from splitfed.clients.data import conversation_tokens, prompt_tokens
    from splitfed.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(["Be brief. Add 1 and 2. 3 And 2 and 2?"])
    got = conversation_tokens(tokenizer, [("Add 1 and 2.", "3")], "And 2?", system="Be brief.")
    # bos, the system line and the first turn as one prompt; the reply as training ends it
    # (eos); the next turn on a line of its own.
    first = prompt_tokens(tokenizer, "Be brief.\nAdd 1 and 2.", chat_template=False)
    reply = [*tokenizer.encode("3", add_special_tokens=False), tokenizer.eos_token_id]
    assert got == [*first, *reply, *tokenizer.encode("And 2?\n", add_special_tokens=False)]
