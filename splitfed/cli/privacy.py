"""``splitfed privacy records | attack``: measure what a curious backbone could recover.

The privacy harness imports torch and transformers: the commands import them inside (see
splitfed/cli/__init__.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from splitfed.cli.options import config_option, config_overrides, fail
from splitfed.errors import SplitfedError

ATTACKS = ("learned_inversion", "nearest_embedding", "label_leakage")


@click.group()
def privacy() -> None:
    """Measure what the backbone could learn of your data (docs/privacy.md)."""


@privacy.command("records")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory to write public.jsonl, train.jsonl and eval.jsonl to.",
)
@click.option("--public", "public_count", type=int, default=800, show_default=True)
@click.option("--train", "train_count", type=int, default=256, show_default=True)
@click.option("--eval", "eval_count", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def records(
    ctx: click.Context, out: Path, public_count: int, train_count: int, eval_count: int, seed: int
) -> None:
    """Write synthetic patient notes with marked sensitive fields: a public corpus (the
    attacker's) and a private training and eval split, no note in two of them."""
    from splitfed.privacy.records import make_corpora, write_records

    if min(public_count, train_count, eval_count) < 1:
        fail(ctx, ValueError("--public, --train and --eval must be at least 1"), usage=True)
        return
    corpora = make_corpora(public_count, train_count, eval_count, seed)
    try:
        for name in ("public", "train", "eval"):
            path = write_records(out / f"{name}.jsonl", getattr(corpora, name))
            click.echo(f"wrote {len(getattr(corpora, name))} records to {path}")
    except OSError as exc:
        fail(ctx, exc, usage=False)


@privacy.command("attack")
@config_option("The client config: [training] model_path, data, k, m and perturbation.")
@click.option(
    "--public",
    "public_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Text the attacker owns, like yours but not yours (a data file of records).",
)
@click.option(
    "--adapter",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Your trained head/tail adapter (checkpoint_dir/adapter.safetensors): measures "
    "the releases after fine-tuning, against the attacker's stale copy of the head.",
)
@click.option(
    "--attack",
    "attacks",
    type=click.Choice(ATTACKS),
    multiple=True,
    help="Attacks to run (default: all).",
)
@click.option(
    "--records",
    "limit",
    type=int,
    default=256,
    show_default=True,
    help="Attack at most this many of your records (0: all).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the scores here as JSON.",
)
@config_overrides
@click.pass_context
def attack(
    ctx: click.Context,
    config_path: Path,
    public_path: Path,
    adapter: Path | None,
    attacks: tuple[str, ...],
    limit: int,
    json_path: Path | None,
) -> None:
    """Attack your own releases as the backbone would: record what one epoch of training
    and one generation of each prompt send it, with your perturbation settings, and try to
    recover your tokens, sensitive fields and labels. Runs here; contacts no service."""
    from transformers import AutoTokenizer

    from splitfed.clients.app import ClientConfig
    from splitfed.clients.data import read_records
    from splitfed.models.adapters import load_adapter
    from splitfed.privacy.harness import measure
    from splitfed.privacy.observe import SplitSetup
    from splitfed.privacy.records import record_of

    try:
        config = ClientConfig.load(config_path)
        t = config.training
        private = [record_of(r.fields, r.where) for r in read_records(t.data)]
        public = [record_of(r.fields, r.where) for r in read_records(public_path)]
        if limit < 0:
            raise ValueError(f"--records must be >= 0, got {limit}")
        private = private[:limit] if limit else private
        tensors = load_adapter(adapter) if adapter is not None else None
    except (ValueError, OSError) as exc:
        fail(ctx, exc, usage=True)
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(t.model_path), local_files_only=True)
        setup = SplitSetup(
            t.model_path,
            t.k,
            t.m,
            config.adapter,
            config.optimizer,
            t.perturbation,
            t.max_grad_norm,
        )
        result = measure(
            setup,
            private,
            public,
            tokenizer,
            adapter=tensors,
            batch_size=t.batch_size,
            max_length=t.max_length,
            chat_template=t.chat_template,
            perturb_generation=t.perturbation.generation,
            attacks=attacks or ATTACKS,
        )
    except (ValueError, OSError, RuntimeError, SplitfedError) as exc:
        fail(ctx, exc, usage=False)
        return
    click.echo(
        f"{result.records} records, k={t.k}; perturbed: "
        + ", ".join(f"{kind} {'yes' if on else 'no'}" for kind, on in result.perturbed.items())
    )
    for name, stages in result.results.items():
        for stage, score in stages.items():
            fields = score["field_exact_match"]
            click.echo(
                f"{name:25} {stage:10} tokens {score['token_accuracy']:6.1%}  sensitive fields "
                + (f"{fields:6.1%}" if fields is not None else "   n/a")
                + f"  ROUGE-L {score['rouge_l']:.3f}"
            )
    chance = result.chance_fields
    click.echo(
        f"chance: tokens {result.chance_tokens:.1%}, sensitive fields "
        + (f"{chance:.1%}" if chance is not None else "n/a (no marked fields)")
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
