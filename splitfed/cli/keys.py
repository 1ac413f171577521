"""``splitfed keys ...``: the deployment CA, enrollment, renewal and revocation.

The key manager's modules and its client import torch (through the wire codec): the
commands import them inside (see splitfed/cli/__init__.py).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import grpc

from splitfed.cli.options import dir_option, fail, file_option, keymanager_options
from splitfed.errors import InvalidArgumentError, SplitfedError
from splitfed.security.ca import CertificateAuthority, write_pem

if TYPE_CHECKING:
    from splitfed.clients.keys import KeyManagerClient


def _client(keymanager: str, tls_dir: Path, server_name: str | None) -> KeyManagerClient:
    from splitfed.clients.keys import KeyManagerClient
    from splitfed.tls import TLSConfig

    return KeyManagerClient.connect(
        keymanager, TLSConfig.from_dir(tls_dir), server_name=server_name
    )


def _run(ctx: click.Context, action: Any) -> Any:
    """Run ``action``; splitfed and configuration errors become one-line failures."""
    try:
        return action()
    except (InvalidArgumentError, ValueError, FileExistsError) as exc:
        fail(ctx, exc, usage=True)
    except (SplitfedError, OSError) as exc:
        fail(ctx, exc, usage=False)
    except Exception as exc:  # grpc.RpcError without a splitfed mapping (UNAVAILABLE)
        if isinstance(exc, grpc.RpcError):
            fail(ctx, RuntimeError(f"key manager unreachable: {exc.details()}"), usage=False)
        raise
    return None


# Where a party's new TLS material goes (keys admin, keys enroll).
out_dir_option = dir_option(
    "--out", "out_dir", required=True, help="Where to write key.pem (0600), cert.pem and ca.pem."
)


@click.group()
def keys() -> None:
    """Deployment CA: initialise, enroll parties, renew, revoke, list."""


@keys.command("init")
@dir_option(
    "--state-dir",
    required=True,
    help="New directory for the CA, its database and the key manager's own certificate.",
)
@file_option(
    "--kek-file",
    help="Key-encryption key file; created (0600, random) if missing. "
    "Without it the key comes from $SPLITFED_KEK.",
)
@dir_option(
    "--admin-dir", help="Also issue an admin certificate (key generated here) into this directory."
)
@click.option("--admin-identity", default="admin", show_default=True)
@click.option("--dns", "dns_names", multiple=True, help="DNS name of the key manager (repeat).")
@click.option("--ip", "ips", multiple=True, help="IP address of the key manager (repeat).")
@click.option("--trust-domain", default="splitfed", show_default=True)
@file_option(
    "--import-ca-cert", exists=True, help="Use an existing CA certificate instead of creating one."
)
@file_option(
    "--import-ca-key",
    exists=True,
    help="Its private key (PEM; password from $SPLITFED_IMPORT_CA_PASSWORD if encrypted).",
)
@click.option(
    "--cert-validity-hours",
    type=float,
    default=24.0,
    show_default=True,
    help="Validity of the certificates made here.",
)
@click.pass_context
def keys_init(
    ctx: click.Context,
    state_dir: Path,
    kek_file: Path | None,
    admin_dir: Path | None,
    admin_identity: str,
    dns_names: tuple[str, ...],
    ips: tuple[str, ...],
    trust_domain: str,
    import_ca_cert: Path | None,
    import_ca_key: Path | None,
    cert_validity_hours: float,
) -> None:
    """Create the deployment CA and the key manager's state directory."""
    from splitfed.services.keymanager.authority import init_authority
    from splitfed.services.keymanager.settings import load_kek

    def action() -> None:
        if kek_file is not None and not kek_file.exists():
            write_pem(kek_file, secrets.token_urlsafe(32).encode() + b"\n", private=True)
            click.echo(f"created key-encryption key {kek_file} (keep it secret, back it up)")
        kek = load_kek(kek_file)
        ca = None
        if import_ca_cert or import_ca_key:
            if not (import_ca_cert and import_ca_key):
                raise ValueError("--import-ca-cert and --import-ca-key go together")
            password = os.environ.get("SPLITFED_IMPORT_CA_PASSWORD")
            ca = CertificateAuthority.load(
                import_ca_cert.read_bytes(),
                import_ca_key.read_bytes(),
                password.encode() if password else None,
                trust_domain=trust_domain,
            )
        init_authority(
            state_dir,
            kek,
            trust_domain=trust_domain,
            ca=ca,
            server_dns=dns_names or ("localhost",),
            server_ips=ips or ("127.0.0.1",),
            admin_identity=admin_identity,
            admin_dir=admin_dir,
            validity=dt.timedelta(hours=cert_validity_hours),
        )
        click.echo(f"initialised key manager state in {state_dir}")
        if admin_dir is not None:
            click.echo(f"admin certificate for {admin_identity!r} in {admin_dir}")

    _run(ctx, action)


@keys.command("admin")
@dir_option(
    "--state-dir",
    required=True,
    exists=True,
    help="The key manager's state directory (made by `keys init`).",
)
@file_option(
    "--kek-file", help="Key-encryption key file. Without it the key comes from $SPLITFED_KEK."
)
@click.option("--identity", default="admin", show_default=True, help="The admin's identity.")
@out_dir_option
@click.pass_context
def keys_admin(
    ctx: click.Context, state_dir: Path, kek_file: Path | None, identity: str, out_dir: Path
) -> None:
    """Issue an admin certificate straight from the state directory (needs the KEK).

    The way back in once no admin certificate can be renewed (renewals stop
    max_certificate_lifetime_s after enrollment). Runs beside a running key manager."""
    from splitfed.services.keymanager.authority import KeyAuthority
    from splitfed.services.keymanager.settings import load_kek

    def action() -> None:
        authority = KeyAuthority(state_dir, load_kek(kek_file))
        try:
            cert = authority.issue_admin(identity, out_dir)
        finally:
            authority.close()
        click.echo(
            f"admin certificate for {identity!r} until "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC in {out_dir}"
        )

    _run(ctx, action)


@keys.group("token")
def keys_token() -> None:
    """Bootstrap tokens for enrollment."""


@keys_token.command("create")
@click.argument("identity")
@click.option(
    "--role",
    required=True,
    type=click.Choice(["client", "backbone", "aggregator", "admin"]),
)
@click.option("--ttl", "ttl_s", type=int, default=0, help="Seconds until it expires.")
@click.option("--dns", "dns_names", multiple=True, help="DNS name (server roles; repeat).")
@click.option("--ip", "ips", multiple=True, help="IP address (server roles; repeat).")
@keymanager_options
@click.pass_context
def keys_token_create(
    ctx: click.Context,
    identity: str,
    role: str,
    ttl_s: int,
    dns_names: tuple[str, ...],
    ips: tuple[str, ...],
    keymanager: str,
    tls_dir: Path,
    server_name: str | None,
) -> None:
    """Create a one-time token that lets IDENTITY enroll in ROLE (admin only)."""

    def action() -> None:
        client = _client(keymanager, tls_dir, server_name)
        try:
            token, expires = client.create_token(
                identity, role, ttl_s=ttl_s, dns_names=dns_names, ip_addresses=ips
            )
        finally:
            client.close()
        when = dt.datetime.fromtimestamp(expires, dt.UTC)
        click.echo(token)
        click.echo(f"expires {when:%Y-%m-%d %H:%M:%S} UTC", err=True)

    _run(ctx, action)


@keys.command("enroll")
@click.option(
    "--keymanager",
    envvar="SPLITFED_KEYMANAGER_ENROLL",
    required=True,
    help="The key manager's enrollment host:port. Env: SPLITFED_KEYMANAGER_ENROLL.",
)
@file_option(
    "--ca",
    "ca_path",
    required=True,
    exists=True,
    help="The deployment CA certificate (obtained out of band).",
)
@click.option("--token", envvar="SPLITFED_TOKEN", required=True, help="Env: SPLITFED_TOKEN.")
@click.option("--identity", required=True, help="The identity the token was made for.")
@out_dir_option
@click.option("--server-name", default=None)
@click.pass_context
def keys_enroll(
    ctx: click.Context,
    keymanager: str,
    ca_path: Path,
    token: str,
    identity: str,
    out_dir: Path,
    server_name: str | None,
) -> None:
    """Generate a private key here and trade a CSR and token for a certificate."""
    from splitfed.clients.keys import enroll

    def action() -> None:
        cert = enroll(
            keymanager, ca_path.read_bytes(), token, identity, out_dir, server_name=server_name
        )
        click.echo(
            f"enrolled {cert.subject.rfc4514_string()} until "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC into {out_dir}"
        )

    _run(ctx, action)


@keys.command("renew")
@keymanager_options
@click.pass_context
def keys_renew(ctx: click.Context, keymanager: str, tls_dir: Path, server_name: str | None) -> None:
    """Renew the certificate in --tls-dir now (services and the SDK renew on their own)."""
    from splitfed.clients.keys import CertificateRenewer

    def action() -> None:
        cert = CertificateRenewer(tls_dir, keymanager, server_name=server_name).renew_now()
        click.echo(f"renewed until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")

    _run(ctx, action)


@keys.command("revoke")
@click.argument("identity", required=False, default="")
@click.option("--serial", default="", help="Revoke only this certificate (hex serial).")
@click.option("--reason", default="", help="Recorded in the audit log.")
@keymanager_options
@click.pass_context
def keys_revoke(
    ctx: click.Context,
    identity: str,
    serial: str,
    reason: str,
    keymanager: str,
    tls_dir: Path,
    server_name: str | None,
) -> None:
    """Revoke every certificate of IDENTITY (or one by --serial). Admin only."""

    def action() -> None:
        if bool(identity) == bool(serial):
            raise ValueError("give an IDENTITY or --serial, not both")
        client = _client(keymanager, tls_dir, server_name)
        try:
            count = client.revoke(identity=identity, serial=serial, reason=reason)
        finally:
            client.close()
        click.echo(f"revoked {count} certificate(s)")

    _run(ctx, action)


@keys.command("list")
@click.option("--identity", default="", help="Only this identity.")
@keymanager_options
@click.pass_context
def keys_list(
    ctx: click.Context, identity: str, keymanager: str, tls_dir: Path, server_name: str | None
) -> None:
    """List issued certificates and their state. Admin only."""

    def action() -> None:
        client = _client(keymanager, tls_dir, server_name)
        try:
            records = client.list_certificates(identity)
        finally:
            client.close()
        click.echo(f"{'identity':<20} {'role':<11} {'state':<8} {'expires (UTC)':<20} serial")
        now = dt.datetime.now(dt.UTC).timestamp()
        for r in records:
            state = "revoked" if r.revoked else ("expired" if r.not_after < now else "valid")
            expires = dt.datetime.fromtimestamp(r.not_after, dt.UTC)
            click.echo(
                f"{r.identity:<20} {r.role:<11} {state:<8} {expires:%Y-%m-%d %H:%M:%S}  {r.serial}"
            )

    _run(ctx, action)
