"""``splitfed demo`` / ``make demo``: the whole deployment on loopback
(splitfed/cli/walkthrough.py)."""

from __future__ import annotations

from pathlib import Path

import click

from splitfed.cli.options import dir_option, fail, file_option, quiet_libraries


@click.command()
@click.option(
    "--size-mib", type=int, default=64, show_default=True, help="Size of the tensor sent."
)
@click.option(
    "--steps",
    type=int,
    default=90,
    show_default=True,
    help="Local training steps per client, over all rounds (16 questions each).",
)
@click.option("--rounds", type=int, default=3, show_default=True, help="Federated rounds.")
@dir_option(
    "--workdir", help="Keep certificates, state and logs here (default: a temporary directory)."
)
@dir_option(
    "--write-configs",
    help=(
        "Do not run the demo: write a tiny model, its data and the config of every party "
        "of the README's session into this new directory, and exit."
    ),
)
@file_option(
    "--plot",
    default=Path("splitfed-demo-loss.png"),
    show_default=True,
    help="Write the clients' loss curves here (PNG).",
)
@click.pass_context
@quiet_libraries
def demo(
    ctx: click.Context,
    size_mib: int,
    steps: int,
    rounds: int,
    workdir: Path | None,
    write_configs: Path | None,
    plot: Path,
) -> None:
    """Run the whole deployment on loopback (key manager, backbone, aggregator, two
    clients), federated split fine-tuning and generation, and report."""
    # The walkthrough imports torch, the clients and the models.
    from splitfed.cli.deployment import DemoError
    from splitfed.cli.walkthrough import run_demo

    if write_configs is not None:
        _write_configs(ctx, write_configs)
        return
    if size_mib < 1:
        fail(ctx, ValueError("--size-mib must be at least 1"), usage=True)
    if rounds < 1 or steps < 2 * rounds:
        fail(ctx, ValueError("--rounds must be >= 1 and --steps >= 2 x rounds"), usage=True)
    try:
        run_demo(size_mib=size_mib, workdir=workdir, steps=steps, rounds=rounds, plot=plot)
    except DemoError as exc:
        fail(ctx, exc, usage=False)
    except KeyboardInterrupt:
        click.echo("interrupted: every service was stopped", err=True)
        ctx.exit(130)


def _write_configs(ctx: click.Context, root: Path) -> None:
    from splitfed.cli.session import write_session

    try:
        written = write_session(root)
    except FileExistsError as exc:
        fail(ctx, exc, usage=True)
    names = ", ".join(sorted(path.name for path in written.values()))
    click.echo(f"wrote {names} to {root}; next: the README's session, from that directory")
