"""What the commands share: the one-line failure, and the option blocks (``--config``,
``--set``, TLS material, the key manager, the options of every ``serve`` command)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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
