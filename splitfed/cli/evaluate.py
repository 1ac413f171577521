"""``splitfed eval``: the base model and the trained adapter, scored side by side.

The evaluation and client modules import torch and transformers: the command imports
them inside (see splitfed/cli/__init__.py).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import click
from rich.console import Console

from splitfed.cli.options import (
    config_option,
    config_overrides,
    dir_option,
    fail,
    file_option,
    force_option,
    quiet_libraries,
    refuse_overwrite,
)
from splitfed.errors import SplitfedError

# evaluation.TASKS, then tasks.TASK_NAMES (the papers' tasks); written out here, since the
# command imports those modules only when it runs (a unit test checks they agree).
TASK_CHOICES = (
    *("auto", "lm", "classification", "summarization"),
    *("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc", "coqa", "xsum"),
)


@click.command("eval")
@config_option(
    "The client config used for training: evaluate split, through its backbone.",
    required=False,
)
@dir_option(
    "--model",
    "model_path",
    help="Instead of --config: a full local checkpoint, evaluated in this process.",
)
@dir_option(
    "--trained-model",
    help="With --model: a second full checkpoint (e.g. adapter merged) to compare.",
)
@click.option(
    "--data",
    "data_paths",
    multiple=True,
    type=click.Path(path_type=Path),
    help="JSONL, JSON, CSV or Parquet file; repeat for several (default: [training] eval_data).",
)
@click.option(
    "--task",
    type=click.Choice(TASK_CHOICES),
    default="auto",
    show_default=True,
    help="What to score; auto: from each file's fields; a paper's task (boolq ... xsum): "
    "its official file format and metrics (docs/evaluation.md).",
)
@file_option(
    "--output", default=Path("eval.json"), show_default=True, help="Write the scores here as JSON."
)
@force_option("--output")
@click.option("--no-base", is_flag=True, help="Skip the base model (with --model: that model).")
@click.option("--no-adapter", is_flag=True, help="Skip the trained adapter.")
@click.option("--max-examples", type=int, default=None, help="Evaluate the first N of each file.")
@click.option("--batch-size", type=int, default=None, help="Default: [training] batch_size, or 8.")
@click.option("--max-new-tokens", type=int, default=None, help="Summary length limit.")
@click.option("--no-chat-template", is_flag=True, help="Never apply the tokenizer's template.")
@config_overrides
@click.pass_context
@quiet_libraries
def eval_command(
    ctx: click.Context,
    config_path: Path | None,
    model_path: Path | None,
    trained_model: Path | None,
    data_paths: tuple[Path, ...],
    task: str,
    output: Path,
    force: bool,
    no_base: bool,
    no_adapter: bool,
    max_examples: int | None,
    batch_size: int | None,
    max_new_tokens: int | None,
    no_chat_template: bool,
) -> None:
    """Score the base model and the trained adapter side by side: loss and perplexity,
    accuracy (classification prompts) and ROUGE (summaries), or a paper's task and its
    metrics (SuperGLUE, CoQA, XSum). With --model: that local checkpoint (and
    --trained-model beside it)."""
    from splitfed.clients import evaluation as ev
    from splitfed.clients.app import ClientConfig, backbone_client, keymanager_for
    from splitfed.clients.app import sampling_options as config_sampling
    from splitfed.clients.tasks import load_task_set
    from splitfed.models.generation import SamplingOptions

    try:
        if trained_model is not None and model_path is None:
            raise ValueError("--trained-model needs --model")
        if (config_path is None) == (model_path is None):
            raise ValueError("give either --config (split) or --model (local)")
        if max_examples is not None and max_examples < 1:
            raise ValueError("--max-examples must be at least 1")
        refuse_overwrite(output, "--output", force)
        overrides = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        config = None if config_path is None else ClientConfig.load(config_path)
        if config is not None:
            train = config.training
            tokenizer = ev.load_tokenizer(train.model_path)
            paths = data_paths or ((train.eval_data,) if train.eval_data else ())
            settings = ev.EvalSettings(
                batch_size=batch_size or train.batch_size,
                max_length=train.max_length,
                chat_template=train.chat_template and not no_chat_template,
                sampling=config_sampling(config, tokenizer, **overrides),
            )
            adapter = not no_adapter and ev.trained_checkpoint(config) is not None
            if not no_adapter and not adapter:
                click.echo("no training checkpoint with an adapter yet: evaluating the base model")
        else:
            assert model_path is not None
            tokenizer = ev.load_tokenizer(model_path)
            paths = data_paths
            settings = ev.EvalSettings(
                batch_size=batch_size or 8,
                chat_template=not no_chat_template,
                sampling=SamplingOptions(
                    max_new_tokens=(
                        SamplingOptions.max_new_tokens if max_new_tokens is None else max_new_tokens
                    ),
                    stop_token_ids=(int(tokenizer.eos_token_id),),
                    pad_token_id=int(tokenizer.pad_token_id),
                ),
            )
            adapter = not no_adapter and trained_model is not None
        if not paths:
            raise ValueError("give --data (or set [training] eval_data)")
        if no_base and not adapter:
            raise ValueError("nothing to evaluate: --no-base and no trained adapter")
        sets = [load_task_set(p, task, max_examples) for p in paths]
    except (ValueError, OSError) as exc:
        fail(ctx, exc, usage=True)
        return
    try:
        with ExitStack() as stack:
            if config is not None:
                client = stack.enter_context(backbone_client(config.backbone))
                keys = stack.enter_context(keymanager_for(config))
                models = ev.split_models(client, config, keys, base=not no_base, adapter=adapter)
            else:
                models = ev.local_models(
                    None if no_base else model_path, trained_model if adapter else None
                )
            report = ev.evaluate_models(models, sets, tokenizer, settings)
        output.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    except (ValueError, RuntimeError, OSError, SplitfedError) as exc:
        fail(ctx, exc, usage=False)
        return
    Console(soft_wrap=True).print(ev.results_table(report))
    click.echo(f"scores written to {output}")
