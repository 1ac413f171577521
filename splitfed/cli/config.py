"""``splitfed config validate``: a config file checked as the command that reads it would
(splitfed/cli/configs.py)."""

from __future__ import annotations

from pathlib import Path

import click

from splitfed.cli.options import config_option, config_overrides, fail, file_option


@click.group("config")
def config_group() -> None:
    """Check config files."""


@config_group.command("validate")
@config_option("The YAML or TOML file to check.")
@click.option(
    "--kind",
    type=click.Choice(["client", "backbone", "keymanager", "aggregator"]),
    default=None,
    help="What the file configures (default: told by its sections).",
)
@click.option("--no-files", is_flag=True, help="Check the fields only, not the files they name.")
@file_option(
    "--server-cert",
    "server_certs",
    multiple=True,
    exists=True,
    help="A server's cert.pem (repeatable): warn where the client config's server_name "
    "for that server's role is not among the certificate's names.",
)
@config_overrides
@click.pass_context
def config_validate(
    ctx: click.Context,
    config_path: Path,
    kind: str | None,
    no_files: bool,
    server_certs: tuple[Path, ...],
) -> None:
    """Load a config as the command that uses it would, with --set and SPLITFED__...
    overrides applied, check the files it reads (TLS material, model, data), and report
    the first problem (exit 2) or what it configures. A client config also gets warnings
    where its server names cannot match the servers' certificates (an IP address without
    server_name; the names of a --server-cert)."""
    # The configs of the services and the client import torch and transformers.
    from splitfed.cli.configs import check_files, load, name_warnings

    try:
        found, config = load(config_path, kind)
        if not no_files:
            check_files(config)
        warnings = name_warnings(config, server_certs)
    except ValueError as exc:
        fail(ctx, exc, usage=True)
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{config_path}: a valid {found} config")
    for name, value in vars(config).items():
        if value is not None:
            click.echo(f"  [{name}] {type(value).__name__}")
