"""``splitfed serve ...``: run one service until SIGTERM, SIGINT or (with
``--stop-on-stdin-eof``) the end of standard input.

Each command loads its config and calls its service's ``build_server``
(``services/<name>/server.py``). A service's modules import torch, and the aggregator's
transformers: each command imports only its own service, inside the command (see
splitfed/cli/__init__.py).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol, TypeAlias, TypeVar

import click

from splitfed.cli.options import (
    config_option,
    config_overrides,
    fail,
    file_option,
    quiet_libraries,
    serve_options,
    tls_from_options,
    tls_options,
)
from splitfed.errors import SplitfedError
from splitfed.metrics import MetricsServer, serve_metrics

if TYPE_CHECKING:
    from splitfed.serving import ServerSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Service(Protocol):
    """What :func:`run_until_signalled` runs: a server, or servers started together."""

    @property
    def port(self) -> int: ...

    @property
    def address(self) -> str: ...

    def start(self) -> object: ...

    def stop(self, grace_s: float | None) -> object: ...


@click.group()
def serve() -> None:
    """Run a splitfed service."""


@serve.command("diagnostics")
@serve_options(
    "host:port to bind; port 0 picks a free one.",
    listen_default="127.0.0.1:0",
    between=[
        tls_options,
        click.option("--chunk-bytes", type=int, default=None, help="Chunk size of responses."),
        click.option(
            "--max-tensor-bytes",
            type=int,
            default=None,
            help="Largest tensor accepted (default 2 GiB).",
        ),
        click.option(
            "--max-buffered-bytes",
            type=int,
            default=None,
            help="Bytes the receive buffers of all streams may hold together "
            "(default: 2 x largest).",
        ),
    ],
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
    from splitfed.services.diagnostics.server import build_server

    server = built(
        ctx,
        lambda: build_server(
            tls_from_options(tls_dir, ca_path, cert_path, key_path, insecure),
            listen=listen,
            chunk_bytes=chunk_bytes,
            max_tensor_bytes=max_tensor_bytes,
            max_buffered_bytes=max_buffered_bytes,
        ),
    )
    run_until_signalled(
        server,
        port_file=port_file,
        grace_s=grace,
        stop_on_stdin_eof=stop_on_stdin_eof,
        metrics=None if metrics_port is None else (listen.rsplit(":", 1)[0], metrics_port),
    )


# A service's build from its config file and --listen (see config_service).
ConfigBuild: TypeAlias = "Callable[[Path, str | None], tuple[ServerSettings, Service]]"


def config_service(
    name: str, config_help: str, listen_help: str
) -> Callable[[ConfigBuild], click.Command]:
    """``splitfed serve <name> --config FILE``: runs the service that the decorated
    ``build(config_path, listen)`` makes from the config file (its docstring is the
    command's help; ``listen``: the --listen that overrides [server] listen)."""

    def register(build: ConfigBuild) -> click.Command:
        @serve.command(name, help=build.__doc__)
        @config_option(config_help)
        @serve_options(listen_help)
        @config_overrides
        @click.pass_context
        def command(
            ctx: click.Context,
            config_path: Path,
            listen: str | None,
            port_file: Path | None,
            stop_on_stdin_eof: bool,
        ) -> None:
            serve_config(
                ctx,
                lambda: build(config_path, listen),
                listen=listen,
                port_file=port_file,
                stop_on_eof=stop_on_stdin_eof,
            )

        return command

    return register


@config_service(
    "backbone",
    "YAML or TOML file with [backbone] and [server] sections.",
    "host:port to bind (overrides [server] listen).",
)
def serve_backbone(config_path: Path, listen: str | None) -> tuple[ServerSettings, Service]:
    """Serve splitfed.v1.Backbone: the shared body of a model, for many clients' sessions."""
    from splitfed.cli.configs import BackboneConfig, load_as
    from splitfed.services.backbone.server import build_server
    from splitfed.services.backbone.settings import server_workers

    config = load_as(config_path, BackboneConfig)
    # Every stream the backbone and its diagnostics may hold, and threads to spare.
    workers = server_workers(config)
    return config.server, build_server(
        config.backbone,
        config.server,
        config.security,
        config.diagnostics,
        max_workers=workers,
        listen=listen,
    )


@serve.command("keymanager")
@config_option("YAML or TOML file with [keymanager] and (optional) [server] sections.")
@serve_options(
    "mTLS host:port (overrides [server] listen).",
    between=[
        click.option(
            "--enroll-listen", default=None, help="Enrollment host:port (overrides config)."
        )
    ],
    port_file_help="Write '<mTLS port> <enrollment port>' here once serving.",
)
@config_overrides
@click.pass_context
def serve_keymanager(
    ctx: click.Context,
    config_path: Path,
    listen: str | None,
    enroll_listen: str | None,
    port_file: Path | None,
    stop_on_stdin_eof: bool,
) -> None:
    """Serve splitfed.v1.KeyManager: an mTLS port and an enrollment port."""
    from splitfed.cli.configs import KeyManagerConfig, load_as
    from splitfed.services.keymanager.server import build_servers

    ports = ""

    def build() -> tuple[ServerSettings, Service]:
        nonlocal ports
        config = load_as(config_path, KeyManagerConfig)
        servers = build_servers(
            config.keymanager, config.server, listen=listen, enroll_listen=enroll_listen
        )
        ports = f"{servers.main.port} {servers.enroll.port}"
        click.echo(f"enrollment on {servers.enroll.address}")
        return config.server, servers

    serve_config(
        ctx,
        build,
        listen=listen,
        port_file=port_file,
        stop_on_eof=stop_on_stdin_eof,
        port_text=lambda: ports,
    )


@config_service(
    "aggregator",
    "YAML or TOML file with [aggregator], [server] and [security] sections.",
    "host:port (overrides [server] listen).",
)
def serve_aggregator(config_path: Path, listen: str | None) -> tuple[ServerSettings, Service]:
    """Serve splitfed.v1.Aggregator: federated rounds over clients' adapters."""
    from splitfed.cli.configs import AggregatorConfig, load_as
    from splitfed.services.aggregator.server import build_server

    config = load_as(config_path, AggregatorConfig)
    return config.server, build_server(
        config.aggregator,
        config.server,
        config.security,
        listen=listen,
        diagnostics_settings=config.diagnostics,
    )


def built(ctx: click.Context, build: Callable[[], T]) -> T:
    """``build()``; a ValueError (a config) is a usage failure, an OSError (a port, a
    file) a runtime one."""
    try:
        return build()
    except ValueError as exc:
        fail(ctx, exc, usage=True)
        raise  # not reached: fail exits
    except OSError as exc:
        fail(ctx, exc, usage=False)
        raise


def serve_config(
    ctx: click.Context,
    build: Callable[[], tuple[ServerSettings, Service]],
    *,
    listen: str | None,
    port_file: Path | None,
    stop_on_eof: bool,
    port_text: Callable[[], str] | None = None,
) -> None:
    """Run the service ``build`` makes from a config file, as its [server] section says
    (``listen``: the --listen that overrides it)."""
    server, service = built(ctx, build)
    run_until_signalled(
        service,
        port_file=port_file,
        grace_s=server.grace_s,
        stop_on_stdin_eof=stop_on_eof,
        port_text=None if port_text is None else port_text(),
        metrics=server.metrics_endpoint(listen),
    )


def start_metrics(host: str, port: int) -> MetricsServer:
    """Prometheus metrics on ``host:port``; a port in use is a one-line failure."""
    try:
        return serve_metrics(host, port)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


def run_until_signalled(
    server: Service,
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
        metrics_server = start_metrics(*metrics)
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


@serve.command("openai")
@config_option("The client config used for training (its checkpoint holds the adapters).")
@serve_options(
    "host:port to bind (port 0: a free one); anything but loopback needs an API key.",
    listen_default="127.0.0.1:8000",
    between=[
        file_option(
            "--api-key-file",
            exists=True,
            help="A file holding the API key clients send as 'Authorization: Bearer <key>' "
            "(or env SPLITFED_OPENAI_API_KEY).",
        ),
        file_option(
            "--tls-cert",
            exists=True,
            help="Serve HTTPS with this certificate (PEM, the chain after it); with --tls-key.",
        ),
        file_option("--tls-key", exists=True, help="The private key of --tls-cert (PEM)."),
        click.option(
            "--model-name",
            default=None,
            help="The model name of /v1/models, which requests must name "
            "(default: the checkpoint directory's name, or the model directory's).",
        ),
        click.option(
            "--concurrency",
            type=click.IntRange(1, 256),
            default=4,
            show_default=True,
            help="Backbone sessions: requests generating at once (their steps batch on "
            "the backbone).",
        ),
        click.option(
            "--max-queued",
            type=click.IntRange(0, 4096),
            default=16,
            show_default=True,
            help="Requests waiting for a session; more are answered 429.",
        ),
        click.option(
            "--max-request-bytes",
            type=click.IntRange(1),
            default=1 << 20,
            show_default=True,
            help="Larger request bodies are answered 413.",
        ),
        click.option(
            "--max-tokens",
            type=click.IntRange(1),
            default=4096,
            show_default=True,
            help="The most tokens a request may ask for (max_tokens).",
        ),
        click.option(
            "--max-batch",
            type=click.IntRange(1, 256),
            default=8,
            show_default=True,
            help="The most completions one request generates (prompts x n).",
        ),
    ],
)
@click.option(
    "--grace",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds running requests get to finish on shutdown.",
)
@config_overrides
@click.pass_context
@quiet_libraries
def serve_openai(
    ctx: click.Context,
    config_path: Path,
    listen: str,
    api_key_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    model_name: str | None,
    concurrency: int,
    max_queued: int,
    max_request_bytes: int,
    max_tokens: int,
    max_batch: int,
    port_file: Path | None,
    stop_on_stdin_eof: bool,
    grace: float,
) -> None:
    """Serve the split model through an OpenAI-compatible HTTP API (/v1/models,
    /v1/completions, /v1/chat/completions, streaming; /health, /metrics): head and tail
    here, the body on the backbone, the adapters of the training checkpoint
    (docs/openai.md)."""
    from splitfed.clients.app import ClientConfig
    from splitfed.clients.engine import Engine
    from splitfed.clients.openai_api import ApiSettings, HttpServer, build_app

    try:
        config = ClientConfig.load(config_path)
        host, port = openai_listen(listen)
        key = api_key(api_key_file)
        if not key and not is_loopback(host):
            raise ValueError(
                f"--listen {listen} is not a loopback address: give --api-key-file (or "
                f"{API_KEY_ENV}) so that only clients with the key are served"
            )
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("give --tls-cert and --tls-key together (or neither: plain HTTP)")
        train = config.training
        name = model_name or (train.checkpoint_dir or train.model_path).name
        settings = ApiSettings(
            name,
            api_key=key,
            max_request_bytes=max_request_bytes,
            max_tokens=max_tokens,
            max_batch=max_batch,
        )
    except ValueError as exc:
        fail(ctx, exc, usage=True)
        return
    try:
        with Engine.from_config(config, concurrency=concurrency, max_queued=max_queued) as engine:
            server = built(
                ctx,
                lambda: HttpServer(
                    build_app(engine, settings),
                    host,
                    port,
                    grace_s=grace,
                    tls_cert=tls_cert,
                    tls_key=tls_key,
                ),
            )
            run_until_signalled(
                server, port_file=port_file, grace_s=grace, stop_on_stdin_eof=stop_on_stdin_eof
            )
    except (ValueError, RuntimeError, SplitfedError) as exc:
        fail(ctx, exc, usage=False)


API_KEY_ENV = "SPLITFED_OPENAI_API_KEY"


def openai_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--listen {listen!r}: give host:port, e.g. 127.0.0.1:8000")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(path: Path | None) -> str:
    """The API key from ``path`` or $SPLITFED_OPENAI_API_KEY ("" if neither)."""
    if path is None:
        return os.environ.get(API_KEY_ENV, "").strip()
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read --api-key-file {path}: {exc}") from None
    if not key:
        raise ValueError(f"--api-key-file {path} is empty")
    return key
