"""The [server] section every splitfed service shares: where it listens and its TLS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitfed.files import StrPath
from splitfed.tls import TLSConfig
from splitfed.transport import Server, TransportOptions, parse_address
from splitfed.wire import DEFAULT_CHUNK_BYTES

# The file a server keeps its last revocation list in, by default in its TLS directory.
REVOCATION_CACHE = "revocations.json"


@dataclass(frozen=True, kw_only=True)
class EndpointSettings:
    """What either end of a connection sets: its TLS material and the chunk size."""

    # ca.pem, cert.pem and key.pem of this party; or the three paths separately.
    tls_dir: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    # Plaintext without authentication: local debugging only.
    insecure: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # HTTP/2 keepalive: a ping after this long without traffic; the connection is given up
    # when its answer takes longer than keepalive_timeout_s (docs/deploy.md "Over a WAN").
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0

    def tls(self) -> TLSConfig:
        return tls_config(self.tls_dir, self.ca, self.cert, self.key, self.insecure)


@dataclass(frozen=True)
class ServerSettings(EndpointSettings):
    listen: str = "127.0.0.1:0"
    grace_s: float = 5.0
    max_workers: int = 16
    # Prometheus metrics over HTTP on this port of the listen host; unset: none, 0: any.
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        parse_address(self.listen)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0-65535, got {self.metrics_port}")
        self.options()
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")

    def options(self) -> TransportOptions:
        return TransportOptions(
            chunk_bytes=self.chunk_bytes,
            max_workers=self.max_workers,
            keepalive_time_s=self.keepalive_time_s,
            keepalive_timeout_s=self.keepalive_timeout_s,
        )

    def metrics_endpoint(self, listen: str | None = None) -> tuple[str, int] | None:
        """(host, port) of the metrics endpoint: ``metrics_port`` on the host of
        ``listen`` (default: this section's); None without a metrics port."""
        if self.metrics_port is None:
            return None
        return (listen or self.listen).rsplit(":", 1)[0], self.metrics_port


def tls_config(
    tls_dir: StrPath | None,
    ca: StrPath | None,
    cert: StrPath | None,
    key: StrPath | None,
    insecure: bool,
) -> TLSConfig:
    """TLS material from a directory and/or explicit files, or plaintext if asked."""
    tls_dir = None if tls_dir is None else Path(tls_dir)
    ca = None if ca is None else Path(ca)
    cert = None if cert is None else Path(cert)
    key = None if key is None else Path(key)
    if insecure:
        if tls_dir or ca or cert or key:
            raise ValueError("insecure mode cannot be combined with tls_dir/ca/cert/key")
        return TLSConfig.plaintext()
    if tls_dir is None and not (ca and cert and key):
        raise ValueError("give tls_dir, or all of ca, cert and key (or insecure)")
    if tls_dir is not None and not (ca or cert or key):
        return TLSConfig.from_dir(tls_dir)  # renewed certificates are picked up
    base = tls_dir or Path()
    return TLSConfig.from_files(
        ca or base / "ca.pem", cert or base / "cert.pem", key or base / "key.pem"
    )


@dataclass(frozen=True)
class ConnectSettings(EndpointSettings):
    """Where a client finds a service, and its own TLS material."""

    address: str
    # The name the server's certificate must carry (default: the host in address).
    server_name: str | None = None
    # Deadlines: control calls (open a session, join a round, ...), and calls that move
    # adapters or updates, which take bytes / bandwidth (a 7B LoRA adapter of ~70 MB
    # needs ~30 s at 20 Mbit/s). Training and generation streams have none: a dead peer
    # is found by the keepalive instead (docs/deploy.md "Over a WAN").
    timeout_s: float = 60.0
    transfer_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        parse_address(self.address)
        self.options()
        if self.timeout_s <= 0 or self.transfer_timeout_s <= 0:
            raise ValueError("timeout_s and transfer_timeout_s must be positive")

    def options(self) -> TransportOptions:
        return TransportOptions(
            chunk_bytes=self.chunk_bytes,
            keepalive_time_s=self.keepalive_time_s,
            keepalive_timeout_s=self.keepalive_timeout_s,
        )


@dataclass(frozen=True)
class SecuritySettings:
    """The [security] section: where a party finds the key manager, and how often it
    renews its certificate and (servers) fetches the revocation list."""

    # Key manager mTLS host:port; empty: no renewal, no revocation list, no encryption.
    keymanager: str = ""
    keymanager_server_name: str | None = None
    revocation_poll_s: float = 10.0
    # Servers: where the last revocation list fetched is kept (0600), to enforce it from
    # the first call after a restart. Default: revocations.json in the server's TLS
    # directory ([server] tls_dir); without one, not kept.
    revocation_cache: Path | None = None
    renew: bool = True
    renew_fraction: float = 2 / 3
    renew_check_s: float = 60.0

    def __post_init__(self) -> None:
        if self.revocation_cache is not None:
            object.__setattr__(self, "revocation_cache", Path(self.revocation_cache))
        if self.keymanager:
            parse_address(self.keymanager)
        if not 0 < self.revocation_poll_s <= 30:
            raise ValueError(
                "revocation_poll_s must be in (0, 30] so that revoked certificates lose "
                f"their streams within 30 s, got {self.revocation_poll_s}"
            )
        if not 0 < self.renew_fraction < 1:
            raise ValueError(f"renew_fraction must be in (0, 1), got {self.renew_fraction}")
        if self.renew_check_s <= 0:
            raise ValueError(f"renew_check_s must be positive, got {self.renew_check_s}")

    def revocation_cache_for(self, tls: TLSConfig) -> Path | None:
        """Where a server with ``tls`` keeps its revocation list (see revocation_cache)."""
        if self.revocation_cache is not None:
            return self.revocation_cache
        if tls.source_dir is not None:
            return tls.source_dir / REVOCATION_CACHE
        return None


class ServedBy:
    """A service process's parts around ``server``, the gRPC server its clients call:
    the process's port and address are that server's."""

    server: Server

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address
