"""The ``splitfed`` command line: the root group and the registry of its commands.

Exit codes: 0 success, 2 usage or configuration error, 1 runtime failure. Errors print
one line; ``--debug`` adds the traceback.

Each command group has its module in this package; its options come from
:mod:`splitfed.cli.options`. Importing this package must stay light: ``splitfed health``
runs as a Kubernetes exec probe every few seconds and ``--help`` answers at once, so no
command module imports torch at its top. What imports torch (the services, the clients,
the models, the transport and wire codec, the configs that name them) is imported inside
the command that needs it; every such module says so once.
"""

from __future__ import annotations

import os
import sys

# gRPC's C core logs to stderr itself: at INFO every TLS handshake a peer fails (the
# demo's strangers, on purpose), at ERROR a handshake this side refuses ("E1207 ...
# ssl_transport_security.cc ... No match found for server name"), around the commands'
# own one-line errors, which name the cause and the fix (splitfed/failures.py). It reads
# GRPC_VERBOSITY once, when grpc is imported, so it is set here, before any command
# module imports grpc: NONE for the client commands, ERROR for services (`serve`, their
# logs); --debug, or a GRPC_VERBOSITY the caller sets, keeps gRPC's default. Child
# processes inherit it.
if "--debug" not in sys.argv[1:] and "grpc" not in sys.modules:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if "serve" in sys.argv[1:] else "NONE")

import click

from splitfed import __version__
from splitfed.cli import (
    adapters,
    config,
    demo,
    evaluate,
    federation,
    generate,
    keys,
    privacy,
    serve,
    status,
    train,
)
from splitfed.cli.options import Context
from splitfed.logs import setup_logging


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "SPLITFED"}
)
@click.version_option(__version__, prog_name="splitfed")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    envvar="SPLITFED_LOG_FORMAT",
    type=click.Choice(["text", "json"]),
    help="json: one JSON object per line, for log collectors (env SPLITFED_LOG_FORMAT).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, log_level: str, log_format: str, debug: bool) -> None:
    """splitfed: split federated fine-tuning and inference of LLMs."""
    setup_logging(log_level, log_format)
    ctx.obj = Context(debug)


for command in (
    serve.serve,
    keys.keys,
    train.train,
    generate.generate,
    generate.chat,
    evaluate.eval_command,
    status.status_command,
    status.health,
    demo.demo,
    config.config_group,
    adapters.adapters,
    federation.federation,
    privacy.privacy,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="splitfed")
