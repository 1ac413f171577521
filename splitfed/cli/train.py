"""``splitfed train``: split fine-tuning, alone or in a federation's rounds.

The client modules import torch and transformers: the command imports them inside (see
splitfed/cli/__init__.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from splitfed.cli.options import config_option, config_overrides, fail, quiet_libraries
from splitfed.cli.serve import start_metrics
from splitfed.config import read_config
from splitfed.errors import SplitfedError

# In a federation the aggregator's round plan decides how long a member trains.
FEDERATED_STEPS = (
    "{what} does not apply with [federated]: the aggregator's plan decides "
    "(rounds x local_steps; docs/federated.md)"
)

if TYPE_CHECKING:
    from splitfed.clients.app import ClientConfig
    from splitfed.clients.federated import RoundReport
    from splitfed.clients.trainer import StepReport


@click.command()
@config_option("YAML or TOML with [backbone], [training], [adapter] and [optimizer] sections.")
@click.option(
    "--max-steps",
    type=int,
    default=None,
    help="Override [training] max_steps (not with [federated]: the aggregator's plan decides).",
)
@config_overrides
@click.pass_context
@quiet_libraries
def train(ctx: click.Context, config_path: Path, max_steps: int | None) -> None:
    """Fine-tune split: head and tail here, the body on the backbone; tokens stay here."""
    from splitfed.clients.app import ClientConfig, backbone_client, keymanager_for, make_trainer

    try:
        mapping = read_config(config_path)
        config = ClientConfig.from_mapping(mapping, max_steps=max_steps)
        if config.federated is not None and max_steps is not None:
            raise ValueError(FEDERATED_STEPS.format(what="--max-steps"))
    except ValueError as exc:
        fail(ctx, exc, usage=True)
        return
    if config.federated is not None and "max_steps" in mapping.get("training", {}):
        click.echo("warning: " + FEDERATED_STEPS.format(what="[training] max_steps"), err=True)
    try:
        if config.metrics.port is not None:  # served until the process ends
            start_metrics(config.metrics.host, config.metrics.port)
        if config.federated is not None:
            run_federated(config)
            return
        with backbone_client(config.backbone) as client, keymanager_for(config) as keys:
            trainer = make_trainer(client, config, keys)
            session = trainer.start()
            click.echo(
                f"session {session.session_id} on {config.backbone.address}, step {trainer.step}"
            )
            columns = (
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeRemainingColumn(),
            )
            with Progress(*columns) as progress:
                task = progress.add_task(
                    "train", total=config.training.max_steps, completed=trainer.step, loss="-"
                )

                def on_step(report: StepReport) -> None:
                    progress.update(task, completed=report.step, loss=f"{report.loss:.4f}")
                    if report.eval_loss is not None:
                        progress.console.print(
                            f"step {report.step}: eval loss {report.eval_loss:.4f}"
                        )

                reports = trainer.run(on_step)
            trainer.close()
    except (ValueError, RuntimeError, SplitfedError) as exc:
        fail(ctx, exc, usage=False)
        return
    if reports:
        first, last = reports[0], reports[-1]
        line = f"trained to step {last.step}: loss {first.loss:.4f} -> {last.loss:.4f}"
        if last.epsilon is not None:
            line += f", privacy spent epsilon {last.epsilon:.4g} at delta {last.delta}"
        click.echo(line)


def run_federated(config: ClientConfig) -> None:
    """``splitfed train`` with a [federated] section: the federation's rounds."""
    from splitfed.clients.app import backbone_client, federated_trainer, keymanager_for

    assert config.federated is not None
    with (
        backbone_client(config.backbone) as client,
        keymanager_for(config) as keys,
        federated_trainer(client, config, keys) as federated,
    ):
        click.echo(
            f"federation {config.federated.federation} on {config.federated.aggregator} "
            f"as {federated.identity or 'anonymous'}"
        )

        def on_round(report: RoundReport) -> None:
            click.echo(
                f"round {report.round}: trained from version {report.version}, "
                f"loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}, uploaded"
            )

        reports = federated.run(on_round=on_round, max_wait_s=config.federated.max_wait_s)
        federated.trainer.close()
    click.echo(f"federation finished at version {federated.version} after {len(reports)} round(s)")
