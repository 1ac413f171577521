"""``splitfed generate`` and ``splitfed chat``: the split model answering.

The client modules import torch and transformers: the commands import them inside (see
splitfed/cli/__init__.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from splitfed.cli.options import config_option, config_overrides, fail, quiet_libraries
from splitfed.errors import SplitfedError


@click.command()
@config_option("The client config used for training (its checkpoint holds the adapters).")
@click.option(
    "--prompt", "prompts", multiple=True, required=True, help="A prompt; repeat for a batch."
)
@click.option("--max-new-tokens", type=int, default=None)
@config_overrides
@click.pass_context
@quiet_libraries
def generate(
    ctx: click.Context, config_path: Path, prompts: tuple[str, ...], max_new_tokens: int | None
) -> None:
    """Generate with the split model: the body runs on the backbone with a KV cache.

    One prompt: its completion is printed as the tokens arrive. Several: they run as one
    batch, and each completion is printed when it ends (its prompt above it)."""
    from splitfed.clients.app import ClientConfig, backbone_client, generate_stream, keymanager_for

    try:
        config = ClientConfig.load(config_path)
    except ValueError as exc:
        fail(ctx, exc, usage=True)
        return
    options: dict[str, Any] = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    texts = [""] * len(prompts)
    started = False
    try:
        with backbone_client(config.backbone) as client, keymanager_for(config) as keys:
            for delta in generate_stream(client, config, list(prompts), keys, **options):
                if len(prompts) > 1:
                    texts[delta.index] += delta.text
                    if delta.finished:
                        click.echo(f"> {prompts[delta.index]}\n{texts[delta.index]}")
                    continue
                if not started:  # the prompt once the first token is back
                    click.echo(f"> {prompts[0]}")
                    started = True
                click.echo(delta.text, nl=delta.finished)  # click.echo flushes
    except (ValueError, RuntimeError, SplitfedError) as exc:
        fail(ctx, exc, usage=False)
        return


@click.command()
@config_option("The client config used for training (its checkpoint holds the adapters).")
@click.option(
    "--system",
    default="",
    help="A system turn; without a chat template, the conversation's first line.",
)
@click.option(
    "--messages",
    "messages_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="A JSON messages list (or a JSONL row with messages) that starts the conversation.",
)
@click.option("--max-new-tokens", type=int, default=None, help="Reply length limit.")
@click.option("--base", is_flag=True, help="Talk to the base model, not the trained adapter.")
@config_overrides
@click.pass_context
@quiet_libraries
def chat(
    ctx: click.Context,
    config_path: Path,
    system: str,
    messages_path: Path | None,
    max_new_tokens: int | None,
    base: bool,
) -> None:
    """Talk to the split model: the body runs on the backbone, the conversation stays
    here. --messages starts it from a file's turns (a last user turn there is answered
    first). /reset goes back to the start, /exit (or end of input) leaves."""
    from transformers import AutoTokenizer

    from splitfed.clients.app import (
        Chat,
        ClientConfig,
        backbone_client,
        keymanager_for,
        sampling_options,
        split_session,
    )
    from splitfed.clients.data import conversation_parts, has_chat_template, read_conversation
    from splitfed.models.loading import load_config

    try:
        config = ClientConfig.load(config_path)
        options = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        train = config.training
        tokenizer = AutoTokenizer.from_pretrained(str(train.model_path), local_files_only=True)
        positions = int(getattr(load_config(train.model_path), "max_position_embeddings", 2048))
        sampling = sampling_options(config, tokenizer, **options)
        turns: list[tuple[str, str]] = []
        pending = None
        if messages_path is not None:
            start, turns, pending = conversation_parts(read_conversation(messages_path))
            if start and system:
                raise ValueError(f"{messages_path} has a system message: leave --system out")
            system = start or system
    except (ValueError, OSError) as exc:
        fail(ctx, exc, usage=True)
        return
    if system and not (train.chat_template and has_chat_template(tokenizer)):
        click.echo(
            "note: no chat template (the tokenizer has none, or [training] chat_template "
            "is false): --system is sent as the conversation's first line",
            err=True,
        )
    try:
        with (
            backbone_client(config.backbone) as client,
            keymanager_for(config) as keys,
            split_session(client, config, keys, trained=not base) as split,
        ):
            conversation = Chat(
                split,
                tokenizer,
                sampling,
                system=system,
                turns=turns,
                chat_template=train.chat_template,
                max_positions=positions,
            )
            what = "the trained adapter" if split.trained else "the base model"
            click.echo(f"chatting with {what} (session {split.session_id}); /exit to leave")
            if turns or pending is not None:
                click.echo(f"(started from {messages_path}: {len(turns)} earlier turns)")
            if pending is not None:
                click.echo(f"you> {pending}\nmodel> ", nl=False)
                for piece in conversation.stream(pending):
                    click.echo(piece, nl=False)
                click.echo()
            while True:
                try:
                    line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
                except (click.Abort, EOFError):
                    break
                text = line.strip()
                if text in ("/exit", "/quit"):
                    break
                if text == "/reset":
                    conversation.reset()
                    click.echo("(conversation forgotten)")
                    continue
                if text:
                    click.echo("model> ", nl=False)
                    for piece in conversation.stream(text):
                        click.echo(piece, nl=False)
                    click.echo()
    except (ValueError, RuntimeError, SplitfedError) as exc:
        fail(ctx, exc, usage=False)
        return
