"""``splitfed federation token``: a join token for a federation's config."""

from __future__ import annotations

import secrets

import click


@click.group()
def federation() -> None:
    """Helpers for an aggregator's federations (docs/federated.md, "Membership")."""


@federation.command("token")
def federation_token() -> None:
    """Make a federation join token: give the token to the members (their [federated]
    join_token_file or $SPLITFED_JOIN_TOKEN) and put only its SHA-256 in the federation's
    config (join_token_sha256). The aggregator never stores the token itself."""
    # The aggregator's modules import torch and transformers (see splitfed/cli/__init__.py).
    from splitfed.services.aggregator.federation import token_digest

    token = secrets.token_urlsafe(32)
    click.echo(f"token: {token}")
    click.echo(f'join_token_sha256 = "{token_digest(token)}"')
