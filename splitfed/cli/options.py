"""What the commands share: the one-line failure, the option blocks (``--config``,
``--set``, TLS material, the key manager, the options of every ``serve`` command),
``--force`` against overwriting, and quiet model libraries."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from splitfed.config import OVERRIDES, apply_overrides

if TYPE_CHECKING:
    from splitfed.tls import TLSConfig

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What the root group hands every command (``ctx.obj``)."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug


def fail(ctx: click.Context, exc: BaseException, *, usage: bool) -> None:
    """Print ``exc`` on one line and exit 2 (``usage``) or 1; with ``--debug``, raise it."""
    obj: Context = ctx.find_root().obj
    if obj is not None and obj.debug:
        raise exc
    click.echo(f"error: {exc}", err=True)
    ctx.exit(2 if usage else 1)


def stack(options: Sequence[Callable[[Any], Any]]) -> Callable[[F], F]:
    """One decorator applying ``options`` in the order listed (the order of --help)."""

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def dir_option(*decls: str, exists: bool = False, **attrs: Any) -> Callable[[F], F]:
    """``click.option(*decls, **attrs)`` whose value is the :class:`~pathlib.Path` of a
    directory (``exists``: one that exists)."""
    return click.option(
        *decls, type=click.Path(path_type=Path, file_okay=False, exists=exists), **attrs
    )


def file_option(*decls: str, exists: bool = False, **attrs: Any) -> Callable[[F], F]:
    """``click.option(*decls, **attrs)`` whose value is the :class:`~pathlib.Path` of a
    file (``exists``: one that exists)."""
    return click.option(
        *decls, type=click.Path(path_type=Path, dir_okay=False, exists=exists), **attrs
    )


def config_option(text: str, *, required: bool = True) -> Callable[[F], F]:
    """``--config PATH``: the YAML or TOML file a command reads."""
    return file_option("--config", "config_path", required=required, help=text)


def _store_overrides(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
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


# --ca, --cert and --key: (option, parameter, what the file holds).
_TLS_FILES = [
    ("--ca", "ca_path", "Deployment CA certificate"),
    ("--cert", "cert_path", "This party's certificate chain"),
    ("--key", "key_path", "This party's private key"),
]

tls_options = stack(
    [
        dir_option("--tls-dir", help="Directory with ca.pem, cert.pem and key.pem."),
        *(
            file_option(name, parameter, help=f"{what} (overrides --tls-dir).")
            for name, parameter, what in _TLS_FILES
        ),
        click.option(
            "--insecure",
            is_flag=True,
            help="Plaintext without authentication. Local debugging only.",
        ),
    ]
)


def tls_from_options(
    tls_dir: Path | None,
    ca_path: Path | None,
    cert_path: Path | None,
    key_path: Path | None,
    insecure: bool,
) -> TLSConfig:
    """The TLS material :data:`tls_options` names."""
    # splitfed.serving imports torch (through the wire codec): see splitfed/cli/__init__.py.
    from splitfed.serving import tls_config

    return tls_config(tls_dir, ca_path, cert_path, key_path, insecure)


def tls_dir_option(func: F) -> F:
    """``--tls-dir`` (required, env SPLITFED_TLS_DIR): a party's own TLS material."""
    return dir_option(
        "--tls-dir",
        envvar="SPLITFED_TLS_DIR",
        required=True,
        help="This party's ca.pem, cert.pem and key.pem. Env: SPLITFED_TLS_DIR.",
    )(func)


keymanager_options = stack(
    [
        click.option(
            "--keymanager",
            envvar="SPLITFED_KEYMANAGER",
            required=True,
            help="Key manager host:port (mTLS port). Env: SPLITFED_KEYMANAGER.",
        ),
        tls_dir_option,
        click.option(
            "--server-name",
            default=None,
            help="Name the key manager's certificate carries (default: the host).",
        ),
    ]
)


def serve_options(
    listen_help: str,
    *,
    listen_default: str | None = None,
    port_file_help: str = "Write the bound port here once serving.",
    between: Sequence[Callable[[Any], Any]] = (),
) -> Callable[[F], F]:
    """``--listen``, ``--port-file`` and ``--stop-on-stdin-eof``, the options of every
    ``serve`` command (``between``: a command's own options, listed after --listen)."""
    return stack(
        [
            click.option(
                "--listen",
                default=listen_default,
                show_default=listen_default is not None,
                help=listen_help,
            ),
            *between,
            file_option("--port-file", help=port_file_help),
            click.option(
                "--stop-on-stdin-eof",
                is_flag=True,
                help="Also stop when standard input closes "
                "(for supervisors that run splitfed as a child).",
            ),
        ]
    )


def force_option(what: str) -> Callable[[F], F]:
    """``--force``: overwrite ``what`` (an option's file or directory) if it exists."""
    return click.option("--force", is_flag=True, help=f"Overwrite {what} if it exists.")


def refuse_overwrite(path: Path | None, option: str, force: bool) -> None:
    """Raise ``ValueError`` if ``path`` (what ``option`` names) already holds something and
    ``force`` is not given: a file, or a directory that is not empty."""
    if path is None or force or not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise ValueError(f"{option} {path} already exists: give another path, or --force to overwrite")


# Python warnings a person at a terminal cannot act on: deprecations inside the libraries.
_QUIET_CATEGORIES = (DeprecationWarning, FutureWarning, PendingDeprecationWarning)
_QUIET_MODULES = r"(transformers|peft|huggingface_hub|accelerate|torch|tokenizers)(\.|$)"


@contextmanager
def library_output_hidden() -> Iterator[None]:
    """Hide what transformers and its kin print on their own while a command runs:
    progress bars ("Loading weights", "Writing model shards"), their advisory logs and
    deprecation warnings. splitfed's own logs and output are untouched; afterwards all is
    as it was. Imports transformers: only for the commands that load models."""
    with warnings.catch_warnings():
        for category in _QUIET_CATEGORIES:
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", module=_QUIET_MODULES)
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def quiet_libraries(func: F) -> F:
    """Run a command with :func:`library_output_hidden` (``--debug`` shows it all)."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        obj: Context | None = click.get_current_context().find_root().obj
        if obj is not None and obj.debug:
            return func(*args, **kwargs)
        with library_output_hidden():
            return func(*args, **kwargs)

    return cast(F, run)
