"""The ``splitfed`` command line.

Exit codes: 0 success, 2 usage or configuration error, 1 runtime failure. Errors print
one line; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click

from splitfed import __version__

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger(__name__)


class _Context:
    def __init__(self, debug: bool) -> None:
        self.debug = debug


def _setup_logging(level: str, fmt: str = "text") -> None:
    from splitfed.logs import setup_logging

    setup_logging(level, fmt)


def _fail(ctx: click.Context, exc: BaseException, *, usage: bool) -> None:
    obj: _Context = ctx.find_root().obj
    if obj is not None and obj.debug:
        raise exc
    click.echo(f"error: {exc}", err=True)
    ctx.exit(2 if usage else 1)


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
    _setup_logging(log_level, log_format)
    ctx.obj = _Context(debug)


def _store_overrides(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    from splitfed.config import OVERRIDES, apply_overrides

    try:
        apply_overrides({}, value, environ={})  # the syntax, checked now
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("--set ")) from None
    OVERRIDES.set(value)


def config_overrides(func: F) -> F:
    """``--set SECTION.FIELD=VALUE`` (repeatable) for a command that reads ``--config``;
    ``SPLITFED__SECTION__FIELD`` environment variables apply too (splitfed/config.py)."""
    option = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="SECTION.FIELD=VALUE",
        expose_value=False,
        is_eager=True,
        callback=_store_overrides,
        help="Override a field of the config file (repeatable); "
        "or set SPLITFED__SECTION__FIELD in the environment.",
    )
    return option(func)


def tls_options(func: F) -> F:
    options = [
        click.option(
            "--tls-dir",
            type=click.Path(path_type=Path, file_okay=False),
            help="Directory with ca.pem, cert.pem and key.pem.",
        ),
        click.option(
            "--ca",
            "ca_path",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Deployment CA certificate (overrides --tls-dir).",
        ),
        click.option(
            "--cert",
            "cert_path",
            type=click.Path(path_type=Path, dir_okay=False),
            help="This party's certificate chain (overrides --tls-dir).",
        ),
        click.option(
            "--key",
            "key_path",
            type=click.Path(path_type=Path, dir_okay=False),
            help="This party's private key (overrides --tls-dir).",
        ),
        click.option(
            "--insecure",
            is_flag=True,
            help="Plaintext without authentication. Local debugging only.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _tls_from_options(
    tls_dir: Path | None,
    ca_path: Path | None,
    cert_path: Path | None,
    key_path: Path | None,
    insecure: bool,
) -> Any:
    from splitfed.serving import tls_config

    return tls_config(tls_dir, ca_path, cert_path, key_path, insecure)


@cli.group()
def serve() -> None:
    """Run a splitfed service."""


@serve.command("diagnostics")
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    help="host:port to bind; port 0 picks a free one.",
)
@tls_options
@click.option("--chunk-bytes", type=int, default=None, help="Chunk size of responses.")
@click.option(
    "--max-tensor-bytes", type=int, default=None, help="Largest tensor accepted (default 2 GiB)."
)
@click.option(
    "--max-buffered-bytes",
    type=int,
    default=None,
    help="Bytes the receive buffers of all streams may hold together (default: 2 x largest).",
)
@click.option(
    "--port-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the bound port here once serving.",
)
@click.option(
    "--stop-on-stdin-eof",
    is_flag=True,
    help="Also stop when standard input closes (for supervisors that run splitfed as a child).",
)
@click.option(
    "--grace",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds running calls get to finish on shutdown.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics over HTTP on this port of the --listen host (0: a free one).",
)
@click.pass_context
def serve_diagnostics(
    ctx: click.Context,
    listen: str,
    tls_dir: Path | None,
    ca_path: Path | None,
    cert_path: Path | None,
    key_path: Path | None,
    insecure: bool,
    chunk_bytes: int | None,
    max_tensor_bytes: int | None,
    max_buffered_bytes: int | None,
    port_file: Path | None,
    stop_on_stdin_eof: bool,
    grace: float,
    metrics_port: int | None,
) -> None:
    """Serve splitfed.v1.Diagnostics (tensor echo, WhoAmI) with health and reflection."""
    from splitfed.protocol.diagnostics import SERVICE_NAME
    from splitfed.services.diagnostics import binding
    from splitfed.services.diagnostics.servicer import POLICY
    from splitfed.services.security import server_security
    from splitfed.serving import SecuritySettings
    from splitfed.transport import TransportOptions, create_server
    from splitfed.wire import DEFAULT_CHUNK_BYTES, ReceiveBudget, TensorLimits

    try:
        tls = _tls_from_options(tls_dir, ca_path, cert_path, key_path, insecure)
        options = TransportOptions(
            chunk_bytes=DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        )
        limits = TensorLimits() if max_tensor_bytes is None else TensorLimits(max_tensor_bytes)
        budget = None if max_buffered_bytes is None else ReceiveBudget(max_buffered_bytes)
        service = binding(limits, options.chunk_bytes, budget)
        security = server_security({SERVICE_NAME: POLICY}, tls, SecuritySettings())
        server = create_server(
            [service], tls, address=listen, options=options, interceptors=[security.interceptor]
        )
    except ValueError as exc:
        _fail(ctx, exc, usage=True)
        return
    except OSError as exc:
        _fail(ctx, exc, usage=False)
        return
    run_until_signalled(
        server,
        port_file=port_file,
        grace_s=grace,
        stop_on_stdin_eof=stop_on_stdin_eof,
        metrics=None if metrics_port is None else (listen.rsplit(":", 1)[0], metrics_port),
    )


@serve.command("backbone")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML or TOML file with [backbone] and [server] sections.",
)
@click.option("--listen", default=None, help="host:port to bind (overrides [server] listen).")
@click.option(
    "--port-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the bound port here once serving.",
)
@click.option(
    "--stop-on-stdin-eof",
    is_flag=True,
    help="Also stop when standard input closes (for supervisors that run splitfed as a child).",
)
@config_overrides
@click.pass_context
def serve_backbone(
    ctx: click.Context,
    config_path: Path,
    listen: str | None,
    port_file: Path | None,
    stop_on_stdin_eof: bool,
) -> None:
    """Serve splitfed.v1.Backbone: the shared body of a model, for many clients' sessions."""
    from dataclasses import replace

    from splitfed.configs import load_as
    from splitfed.protocol.backbone import SERVICE
    from splitfed.protocol.diagnostics import SERVICE_NAME as DIAGNOSTICS
    from splitfed.services.backbone.crypto import BackboneKeys
    from splitfed.services.backbone.servicer import POLICY, binding
    from splitfed.services.backbone.settings import server_workers
    from splitfed.services.backbone.state import BackboneState
    from splitfed.services.diagnostics import binding as diagnostics
    from splitfed.services.diagnostics.servicer import POLICY as DIAGNOSTICS_POLICY
    from splitfed.services.security import server_security
    from splitfed.transport import create_server

    try:
        config = load_as(config_path, "backbone")
        settings, server_settings = config.backbone, config.server
        security_settings = config.security
        if listen is not None:
            server_settings = replace(server_settings, listen=listen)
        tls = server_settings.tls()
        # Every stream the backbone and its diagnostics may hold, and threads to spare.
        options = replace(server_settings.options(), max_workers=server_workers(config))
        security = server_security(
            {SERVICE.full_name: POLICY, DIAGNOSTICS: DIAGNOSTICS_POLICY}, tls, security_settings
        )
        state = BackboneState(settings)
    except ValueError as exc:
        _fail(ctx, exc, usage=True)
        return
    try:
        keys = BackboneKeys(security.keymanager)
        services = [
            binding(state, options, keys),
            diagnostics(chunk_bytes=options.chunk_bytes, settings=config.diagnostics),
        ]
        server = create_server(
            services,
            tls,
            address=server_settings.listen,
            options=options,
            interceptors=[security.interceptor],
        )
    except (OSError, ValueError) as exc:
        state.close()
        security.stop()
        _fail(ctx, exc, usage=isinstance(exc, ValueError))
        return
    security.start()
    try:
        run_until_signalled(
            server,
            port_file=port_file,
            grace_s=server_settings.grace_s,
            stop_on_stdin_eof=stop_on_stdin_eof,
            metrics=server_settings.metrics_endpoint(),
        )
    finally:
        security.stop()
        state.close()


def _serve_metrics(host: str, port: int) -> Any:
    from splitfed.metrics import serve_metrics

    try:
        return serve_metrics(host, port)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


def run_until_signalled(
    server: Any,
    *,
    port_file: Path | None,
    grace_s: float,
    stop_on_stdin_eof: bool = False,
    port_text: str | None = None,
    metrics: tuple[str, int] | None = None,
) -> None:
    """Start ``server``, announce its address, and stop it gracefully on SIGTERM/SIGINT
    (or, with ``stop_on_stdin_eof``, when standard input closes: its parent is gone).
    With ``metrics`` (host, port), also serve Prometheus metrics there and announce it."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("[serve] received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    def on_stdin_eof() -> None:
        # Raw reads: a daemon thread blocked in a buffered read would abort the
        # interpreter at exit (the buffer's lock is held).
        while os.read(sys.stdin.fileno(), 4096):
            pass
        logger.info("[serve] standard input closed, shutting down")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if stop_on_stdin_eof:
        threading.Thread(target=on_stdin_eof, name="stdin-watch", daemon=True).start()
    metrics_server = None
    if metrics is not None:
        metrics_server = _serve_metrics(*metrics)
        click.echo(f"metrics on {metrics_server.address}")
    server.start()
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(f"{port_text or server.port}\n")
        tmp.replace(port_file)
    click.echo(f"listening on {server.address}")
    sys.stdout.flush()
    stop.wait()
    server.stop(grace_s)
    if metrics_server is not None:
        metrics_server.close()


@cli.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML or TOML with [backbone], [training], [adapter] and [optimizer] sections.",
)
@click.option("--max-steps", type=int, default=None, help="Override [training] max_steps.")
@config_overrides
@click.pass_context
def train(ctx: click.Context, config_path: Path, max_steps: int | None) -> None:
    """Fine-tune split: head and tail here, the body on the backbone; tokens stay here."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from splitfed.clients.app import ClientConfig, backbone_client, keymanager_for, make_trainer
    from splitfed.clients.trainer import StepReport
    from splitfed.errors import SplitfedError

    try:
        config = ClientConfig.load(config_path, max_steps=max_steps)
    except ValueError as exc:
        _fail(ctx, exc, usage=True)
        return
    try:
        if config.metrics.port is not None:  # served until the process ends
            _serve_metrics(config.metrics.host, config.metrics.port)
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
        _fail(ctx, exc, usage=False)
        return
    if reports:
        first, last = reports[0], reports[-1]
        line = f"trained to step {last.step}: loss {first.loss:.4f} -> {last.loss:.4f}"
        if last.epsilon is not None:
            line += f", privacy spent epsilon {last.epsilon:.4g} at delta {last.delta}"
        click.echo(line)


def run_federated(config: Any) -> None:
    """``splitfed train`` with a [federated] section: the federation's rounds."""
    from splitfed.clients.app import backbone_client, federated_trainer, keymanager_for
    from splitfed.clients.federated import RoundReport

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


@cli.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The client config used for training (its checkpoint holds the adapters).",
)
@click.option(
    "--prompt", "prompts", multiple=True, required=True, help="A prompt; repeat for a batch."
)
@click.option("--max-new-tokens", type=int, default=None)
@config_overrides
@click.pass_context
def generate(
    ctx: click.Context, config_path: Path, prompts: tuple[str, ...], max_new_tokens: int | None
) -> None:
    """Generate with the split model: the body runs on the backbone with a KV cache."""
    from splitfed.clients.app import ClientConfig, backbone_client, keymanager_for
    from splitfed.clients.app import generate as run_generate
    from splitfed.errors import SplitfedError

    try:
        config = ClientConfig.load(config_path)
    except ValueError as exc:
        _fail(ctx, exc, usage=True)
        return
    options = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    try:
        with backbone_client(config.backbone) as client, keymanager_for(config) as keys:
            outputs = run_generate(client, config, list(prompts), keys, **options)
    except (ValueError, RuntimeError, SplitfedError) as exc:
        _fail(ctx, exc, usage=False)
        return
    for prompt, output in zip(prompts, outputs, strict=True):
        click.echo(f"> {prompt}\n{output}")


@cli.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The client config used for training (its checkpoint holds the adapters).",
)
@click.option("--system", default="", help="A system turn (with a chat template).")
@click.option("--max-new-tokens", type=int, default=None, help="Reply length limit.")
@click.option("--base", is_flag=True, help="Talk to the base model, not the trained adapter.")
@config_overrides
@click.pass_context
def chat(
    ctx: click.Context,
    config_path: Path,
    system: str,
    max_new_tokens: int | None,
    base: bool,
) -> None:
    """Talk to the split model: the body runs on the backbone, the conversation stays
    here. /reset forgets it, /exit (or end of input) leaves."""
    from transformers import AutoTokenizer

    from splitfed.clients.app import (
        Chat,
        ClientConfig,
        backbone_client,
        keymanager_for,
        sampling_options,
        split_session,
    )
    from splitfed.errors import SplitfedError
    from splitfed.models.loading import load_config

    try:
        config = ClientConfig.load(config_path)
        options = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        train = config.training
        tokenizer = AutoTokenizer.from_pretrained(str(train.model_path), local_files_only=True)
        positions = int(getattr(load_config(train.model_path), "max_position_embeddings", 2048))
        sampling = sampling_options(config, tokenizer, **options)
    except (ValueError, OSError) as exc:
        _fail(ctx, exc, usage=True)
        return
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
                chat_template=train.chat_template,
                max_positions=positions,
            )
            what = "the trained adapter" if split.trained else "the base model"
            click.echo(f"chatting with {what} (session {split.session_id}); /exit to leave")
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
                    click.echo(f"model> {conversation.say(text)}")
    except (ValueError, RuntimeError, SplitfedError) as exc:
        _fail(ctx, exc, usage=False)
        return


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A client config: its backbone, [federated] aggregator, [security] key manager, "
    "TLS material and checkpoint.",
)
@click.option("--backbone", "backbones", multiple=True, help="[NAME@]HOST:PORT; repeatable.")
@click.option("--aggregator", "aggregators", multiple=True, help="[NAME@]HOST:PORT.")
@click.option("--keymanager", "keymanagers", multiple=True, help="[NAME@]HOST:PORT.")
@click.option("--federation", default="", help="The federation whose round to show.")
@click.option("--metrics", "metrics", multiple=True, help="A Prometheus endpoint URL; repeatable.")
@tls_options
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="Also as JSON."
)
@config_overrides
@click.pass_context
def status(
    ctx: click.Context,
    config_path: Path | None,
    backbones: tuple[str, ...],
    aggregators: tuple[str, ...],
    keymanagers: tuple[str, ...],
    federation: str,
    metrics: tuple[str, ...],
    tls_dir: Path | None,
    ca_path: Path | None,
    cert_path: Path | None,
    key_path: Path | None,
    insecure: bool,
    json_path: Path | None,
) -> None:
    """Health, model, rounds, certificates and privacy across a deployment's services.
    Exit 0 when everything answers SERVING, 1 when something does not."""
    from rich.console import Console
    from rich.table import Table

    from splitfed.status import collect, target

    try:
        found = {
            "backbone": [target(v) for v in backbones],
            "aggregator": [target(v) for v in aggregators],
            "keymanager": [target(v) for v in keymanagers],
        }
        checkpoint = perturbation = None
        tls = None
        if tls_dir or ca_path or cert_path or key_path or insecure:
            tls = _tls_from_options(tls_dir, ca_path, cert_path, key_path, insecure)
        if config_path is not None:
            from splitfed.clients.app import ClientConfig

            config = ClientConfig.load(config_path)
            tls = tls or config.backbone.tls()
            found["backbone"].append((config.backbone.address, config.backbone.server_name))
            if config.federated is not None:
                found["aggregator"].append(
                    (config.federated.aggregator, config.federated.server_name)
                )
                federation = federation or config.federated.federation
            if config.security.keymanager:
                found["keymanager"].append(
                    (config.security.keymanager, config.security.keymanager_server_name)
                )
            checkpoint = config.training.checkpoint_dir
            perturbation = config.training.perturbation
        if tls is None:
            raise ValueError("give --config, or the TLS material (--tls-dir or --ca/--cert/--key)")
        if not any(found.values()) and not metrics:
            raise ValueError("nothing to look at: give --config or a service address")
    except ValueError as exc:
        _fail(ctx, exc, usage=True)
        return
    report = collect(
        tls,
        backbones=found["backbone"],
        aggregators=found["aggregator"],
        keymanagers=found["keymanager"],
        federation=federation,
        metrics=list(metrics),
        checkpoint=checkpoint,
        perturbation=perturbation,
    )
    console = Console()
    table = Table("service", "address", "health", "details")
    for service in report.services:
        colour = "green" if service.ok else "red"
        details = ", ".join(f"{k} {v}" for k, v in service.details.items())
        table.add_row(service.service, service.address, f"[{colour}]{service.health}[/]", details)
    console.print(table)
    cert = report.certificate
    if cert:
        console.print(
            "this party: "
            + ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in cert.items() if k != "expires_in_s"
            )
        )
    if report.privacy:
        p = report.privacy
        console.print(
            f"privacy spent: epsilon {p['epsilon']:.4g} at delta {p['delta']} "
            f"over {p['steps']} releases"
        )
    for url, figures in report.metrics.items():
        console.print(
            f"{url}: "
            + ", ".join(
                f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
            )
        )
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if not report.ok:
        ctx.exit(1)


@cli.command()
@click.argument("address")
@click.option(
    "--tls-dir",
    envvar="SPLITFED_TLS_DIR",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="This party's ca.pem, cert.pem and key.pem. Env: SPLITFED_TLS_DIR.",
)
@click.option(
    "--server-name",
    envvar="SPLITFED_HEALTH_SERVER_NAME",
    default=None,
    help="Name the server's certificate carries (default: the host of ADDRESS). "
    "Env: SPLITFED_HEALTH_SERVER_NAME.",
)
@click.option("--service", default="", help="Ask about this service (default: the server).")
@click.option("--timeout", "timeout_s", type=float, default=5.0, show_default=True)
@click.pass_context
def health(
    ctx: click.Context,
    address: str,
    tls_dir: Path,
    server_name: str | None,
    service: str,
    timeout_s: float,
) -> None:
    """Exit 0 if ADDRESS answers its gRPC health check SERVING over mutual TLS, else 1.

    A probe for Kubernetes (an exec probe: the pod checks itself with its own
    certificate, which the kubelet's grpc probe cannot present). It imports neither
    torch nor the transport module, so it costs a fraction of a second."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from splitfed.tls import TLSConfig

    try:
        tls = TLSConfig.from_dir(tls_dir)
        tls.verify_own_certificate()
    except (OSError, ValueError) as exc:
        _fail(ctx, exc, usage=False)
        return
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    with grpc.secure_channel(address, tls.channel_credentials(), options=options) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            _fail(ctx, RuntimeError(f"{address}: {exc.code().name}: {exc.details()}"), usage=False)
            return
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    click.echo(f"{address}: {state}")
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        ctx.exit(1)


@cli.command("eval")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The client config used for training: evaluate split, through its backbone.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path, file_okay=False),
    help="Instead of --config: a full local checkpoint, evaluated in this process.",
)
@click.option(
    "--trained-model",
    type=click.Path(path_type=Path, file_okay=False),
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
    type=click.Choice(["auto", "lm", "classification", "summarization"]),
    default="auto",
    show_default=True,
    help="What to score; auto: from each file's fields.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("eval.json"),
    show_default=True,
    help="Write the scores here as JSON.",
)
@click.option("--no-base", is_flag=True, help="Skip the base model.")
@click.option("--no-adapter", is_flag=True, help="Skip the trained adapter.")
@click.option("--max-examples", type=int, default=None, help="Evaluate the first N of each file.")
@click.option("--batch-size", type=int, default=None, help="Default: [training] batch_size, or 8.")
@click.option("--max-new-tokens", type=int, default=None, help="Summary length limit.")
@click.option("--no-chat-template", is_flag=True, help="Never apply the tokenizer's template.")
@config_overrides
@click.pass_context
def eval_command(
    ctx: click.Context,
    config_path: Path | None,
    model_path: Path | None,
    trained_model: Path | None,
    data_paths: tuple[Path, ...],
    task: str,
    output: Path,
    no_base: bool,
    no_adapter: bool,
    max_examples: int | None,
    batch_size: int | None,
    max_new_tokens: int | None,
    no_chat_template: bool,
) -> None:
    """Score the base model and the trained adapter side by side: loss and perplexity,
    accuracy (classification prompts) and ROUGE (summaries)."""
    import json
    from contextlib import ExitStack

    from rich.console import Console

    from splitfed.clients import evaluation as ev
    from splitfed.clients.app import ClientConfig, backbone_client, keymanager_for
    from splitfed.clients.app import sampling_options as config_sampling
    from splitfed.errors import SplitfedError
    from splitfed.models.generation import SamplingOptions

    try:
        if trained_model is not None and model_path is None:
            raise ValueError("--trained-model needs --model")
        if (config_path is None) == (model_path is None):
            raise ValueError("give either --config (split) or --model (local)")
        if max_examples is not None and max_examples < 1:
            raise ValueError("--max-examples must be at least 1")
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
        sets = [ev.load_eval_set(p, task, max_examples) for p in paths]
    except (ValueError, OSError) as exc:
        _fail(ctx, exc, usage=True)
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
        _fail(ctx, exc, usage=False)
        return
    Console(soft_wrap=True).print(ev.results_table(report))
    click.echo(f"scores written to {output}")


@cli.command()
@click.option(
    "--size-mib", type=int, default=64, show_default=True, help="Size of the tensor sent."
)
@click.option(
    "--steps",
    type=int,
    default=60,
    show_default=True,
    help="Local training steps per client, over all rounds.",
)
@click.option("--rounds", type=int, default=3, show_default=True, help="Federated rounds.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Keep certificates, state and logs here (default: a temporary directory).",
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("splitfed-demo-loss.png"),
    show_default=True,
    help="Write the clients' loss curves here (PNG).",
)
@click.pass_context
def demo(
    ctx: click.Context, size_mib: int, steps: int, rounds: int, workdir: Path | None, plot: Path
) -> None:
    """Run the whole deployment on loopback (key manager, backbone, aggregator, two
    clients), federated split fine-tuning and generation, and report."""
    from splitfed.demo import DemoError, run_demo

    if size_mib < 1:
        _fail(ctx, ValueError("--size-mib must be at least 1"), usage=True)
    if rounds < 1 or steps < 2 * rounds:
        _fail(ctx, ValueError("--rounds must be >= 1 and --steps >= 2 x rounds"), usage=True)
    try:
        run_demo(size_mib=size_mib, workdir=workdir, steps=steps, rounds=rounds, plot=plot)
    except DemoError as exc:
        _fail(ctx, exc, usage=False)
    except KeyboardInterrupt:
        click.echo("interrupted: every service was stopped", err=True)
        ctx.exit(130)


@cli.group("config")
def config_group() -> None:
    """Check config files."""


@config_group.command("validate")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The YAML or TOML file to check.",
)
@click.option(
    "--kind",
    type=click.Choice(["client", "backbone", "keymanager", "aggregator"]),
    default=None,
    help="What the file configures (default: told by its sections).",
)
@click.option("--no-files", is_flag=True, help="Check the fields only, not the files they name.")
@config_overrides
@click.pass_context
def config_validate(
    ctx: click.Context, config_path: Path, kind: str | None, no_files: bool
) -> None:
    """Load a config as the command that uses it would, with --set and SPLITFED__...
    overrides applied, check the files it reads (TLS material, model, data), and report
    the first problem (exit 2) or what it configures."""
    from splitfed.configs import check_files, load

    try:
        found, config = load(config_path, kind)
        if not no_files:
            check_files(found, config)
    except ValueError as exc:
        _fail(ctx, exc, usage=True)
        return
    click.echo(f"{config_path}: a valid {found} config")
    for name, value in vars(config).items():
        if value is not None:
            click.echo(f"  [{name}] {type(value).__name__}")


def main() -> None:
    cli(prog_name="splitfed")


# Command groups kept in their own modules register themselves on the groups above.
import splitfed.cli_adapters  # noqa: E402
import splitfed.cli_federation  # noqa: E402
import splitfed.cli_keys  # noqa: E402, F401
