"""Client side of splitfed.v1.KeyManager: enrollment, renewal, admin calls, session keys,
and the background helpers every service and SDK runs (:class:`CertificateRenewer`,
:class:`RevocationPoller`)."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TypedDict, TypeVar, Unpack

import grpc
from cryptography import x509
from google.protobuf.message import Message

from splitfed.errors import PermissionDeniedError, UnauthenticatedError, error_from_rpc
from splitfed.failures import Endpoint, call_failure
from splitfed.files import StrPath
from splitfed.metrics import REVOCATION_LISTS
from splitfed.periodic import Periodic
from splitfed.protocol.keys import SessionKeyGrant
from splitfed.retry import DEFAULT_RETRY, RetryPolicy, call_with_retry
from splitfed.security.authz import RevocationList
from splitfed.security.ca import (
    generate_private_key,
    make_csr,
    private_key_pem,
    write_pem,
)
from splitfed.serving import SecuritySettings
from splitfed.tls import TLSConfig
from splitfed.transport import DEFAULT_OPTIONS, TransportOptions, create_channel, parse_address
from splitfed.v1 import keys_pb2, keys_pb2_grpc

logger = logging.getLogger(__name__)
R = TypeVar("R", bound=Message)


def _call(
    fn: Callable[[], object], what: str, retry: RetryPolicy, endpoint: Endpoint | None = None
) -> object:
    """``fn`` under ``retry``; a failure as a splitfed error where one fits (a connection
    or TLS failure explained for ``endpoint``: :mod:`splitfed.failures`)."""
    try:
        return call_with_retry(fn, retry, what=what)
    except grpc.RpcError as err:
        mapped = call_failure(err, endpoint) or error_from_rpc(err)
        if mapped is not None:
            raise mapped from None
        raise


class TokenOptions(TypedDict, total=False):
    """What an enrollment token may carry besides its identity and role: ``ttl_s`` (0 or
    absent: the key manager's default) and the server names of a server role."""

    ttl_s: int
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]


@dataclass(frozen=True)
class Revocations:
    version: int
    serials: frozenset[str]
    records: tuple[keys_pb2.CertificateRecord, ...]


class KeyManagerClient:
    """The key manager's mTLS port, as plain Python calls (errors as splitfed errors)."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout_s: float = 30.0,
        endpoint: Endpoint | None = None,
    ) -> None:
        self.channel = channel
        self._stub = keys_pb2_grpc.KeyManagerStub(channel)
        # The other end, as the error messages name it (None: the raw gRPC details).
        self.endpoint = endpoint
        self.retry = retry
        self.timeout_s = timeout_s

    @classmethod
    def connect(
        cls,
        address: str,
        tls: TLSConfig,
        *,
        server_name: str | None = None,
        options: TransportOptions = DEFAULT_OPTIONS,
    ) -> KeyManagerClient:
        return cls(
            create_channel(address, tls, server_name=server_name, options=options),
            endpoint=Endpoint("key manager", address, server_name, tls.source_dir),
        )

    def close(self) -> None:
        self.channel.close()

    def reconnect(self, tls: TLSConfig, address: str, server_name: str | None = None) -> None:
        """Use a new channel (e.g. with a renewed certificate) from now on."""
        old = self.channel
        self.channel = create_channel(address, tls, server_name=server_name)
        self._stub = keys_pb2_grpc.KeyManagerStub(self.channel)
        self.endpoint = Endpoint("key manager", address, server_name, tls.source_dir)
        old.close()

    def _rpc(self, method: str, request: Message, response_type: type[R]) -> R:
        """``KeyManager.<method>`` with this client's retry policy and deadline."""
        r = _call(
            lambda: getattr(self._stub, method)(request, timeout=self.timeout_s),
            f"KeyManager.{method}",
            self.retry,
            self.endpoint,
        )
        assert isinstance(r, response_type)
        return r

    def renew(self, csr_pem: bytes) -> tuple[bytes, bytes]:
        request = keys_pb2.RenewRequest(csr_pem=csr_pem)
        r = self._rpc("Renew", request, keys_pb2.RenewResponse)
        return r.certificate_pem, r.ca_pem

    def create_token(
        self, identity: str, role: str, **options: Unpack[TokenOptions]
    ) -> tuple[str, int]:
        """An enrollment token for ``identity`` in ``role``, and when it expires."""
        request = keys_pb2.CreateTokenRequest(identity=identity, role=role, **options)
        r = self._rpc("CreateToken", request, keys_pb2.CreateTokenResponse)
        return r.token, r.expires_at

    def revoke(self, *, identity: str = "", serial: str = "", reason: str = "") -> int:
        request = keys_pb2.RevokeRequest(identity=identity, serial=serial, reason=reason)
        return self._rpc("Revoke", request, keys_pb2.RevokeResponse).revoked

    def list_certificates(self, identity: str = "") -> list[keys_pb2.CertificateRecord]:
        request = keys_pb2.ListCertificatesRequest(identity=identity)
        r = self._rpc("ListCertificates", request, keys_pb2.ListCertificatesResponse)
        return list(r.certificates)

    def revocations(self) -> Revocations:
        request = keys_pb2.GetRevocationsRequest()
        r = self._rpc("GetRevocations", request, keys_pb2.GetRevocationsResponse)
        return Revocations(r.version, frozenset(c.serial for c in r.revoked), tuple(r.revoked))

    def register_session(self, session_id: str, owner: str) -> SessionKeyGrant:
        request = keys_pb2.RegisterSessionRequest(session_id=session_id, owner=owner)
        r = self._rpc("RegisterSession", request, keys_pb2.RegisterSessionResponse)
        return SessionKeyGrant.from_proto(r.key)

    def session_key(self, session_id: str, key_id: int = 0) -> SessionKeyGrant:
        request = keys_pb2.GetSessionKeyRequest(session_id=session_id, key_id=key_id)
        r = self._rpc("GetSessionKey", request, keys_pb2.GetSessionKeyResponse)
        return SessionKeyGrant.from_proto(r.key)

    def rotate_session_key(self, session_id: str) -> SessionKeyGrant:
        request = keys_pb2.RotateSessionKeyRequest(session_id=session_id)
        r = self._rpc("RotateSessionKey", request, keys_pb2.RotateSessionKeyResponse)
        return SessionKeyGrant.from_proto(r.key)

    def end_session(self, session_id: str) -> None:
        request = keys_pb2.EndSessionRequest(session_id=session_id)
        self._rpc("EndSession", request, keys_pb2.EndSessionResponse)


def enroll(
    address: str,
    ca_pem: bytes,
    token: str,
    identity: str,
    out_dir: StrPath,
    *,
    server_name: str | None = None,
    timeout_s: float = 30.0,
) -> x509.Certificate:
    """Enroll this party: generate its private key here, send a CSR and the bootstrap
    token to the key manager's enrollment port (server-authenticated TLS against
    ``ca_pem``), and write ``key.pem`` (0600), ``cert.pem`` and ``ca.pem`` to ``out_dir``."""
    out_dir = Path(out_dir)
    parse_address(address)
    key = generate_private_key()
    options = [*DEFAULT_OPTIONS.channel_options()]
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = grpc.secure_channel(
        address, grpc.ssl_channel_credentials(root_certificates=ca_pem), options=options
    )
    try:
        stub = keys_pb2_grpc.KeyManagerStub(channel)
        response = _call(
            lambda: stub.Enroll(
                keys_pb2.EnrollRequest(token=token, csr_pem=make_csr(key, identity)),
                timeout=timeout_s,
            ),
            "KeyManager.Enroll",
            DEFAULT_RETRY,
            Endpoint("key manager's enrollment port", address, server_name),
        )
    finally:
        channel.close()
    assert isinstance(response, keys_pb2.EnrollResponse)
    write_pem(out_dir / "key.pem", private_key_pem(key), private=True)
    write_pem(out_dir / "cert.pem", response.certificate_pem, private=False)
    write_pem(out_dir / "ca.pem", response.ca_pem, private=False)
    return x509.load_pem_x509_certificate(response.certificate_pem)


def renew_certificate(
    client: KeyManagerClient, tls_dir: StrPath, identity: str
) -> x509.Certificate:
    """Renew the certificate in ``tls_dir`` over mTLS with a fresh local key."""
    tls_dir = Path(tls_dir)
    key = generate_private_key()
    cert_pem, ca_pem = client.renew(make_csr(key, identity))
    # The key first: a reader that sees the new key with the old certificate refuses the
    # pair (TLSConfig checks they match) and retries; cert.pem then completes the switch.
    write_pem(tls_dir / "key.pem.next", private_key_pem(key), private=True)
    write_pem(tls_dir / "cert.pem.next", cert_pem, private=False)
    (tls_dir / "key.pem.next").replace(tls_dir / "key.pem")
    (tls_dir / "cert.pem.next").replace(tls_dir / "cert.pem")
    write_pem(tls_dir / "ca.pem", ca_pem, private=False)
    return x509.load_pem_x509_certificate(cert_pem)


def _lifetime(tls_dir: Path) -> tuple[str, dt.datetime, dt.datetime]:
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate((tls_dir / "cert.pem").read_bytes())
    name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return str(name), cert.not_valid_before_utc, cert.not_valid_after_utc


@dataclass(eq=False)
class CertificateRenewer(Periodic):
    """Renews the certificate in ``tls_dir`` once ``renew_fraction`` of its lifetime has
    passed. Servers re-read the directory on new connections; channels made afterwards
    (``TLSConfig.from_dir``) present the new certificate."""

    tls_dir: Path
    keymanager: str
    _: KW_ONLY
    server_name: str | None = None
    renew_fraction: float = 2 / 3
    check_every_s: float = 60.0
    on_renew: Callable[[x509.Certificate], None] | None = None
    renewals: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.renew_fraction < 1:
            raise ValueError(f"renew_fraction must be in (0, 1), got {self.renew_fraction}")
        super().__init__("certificate-renewer", self.check_every_s)

    @classmethod
    def reconnecting(
        cls, client: KeyManagerClient, tls_dir: StrPath, settings: SecuritySettings
    ) -> CertificateRenewer:
        """The renewer of a party whose [security] section is ``settings``: once the
        certificate in ``tls_dir`` is renewed, ``client`` reconnects presenting it."""
        tls_dir = Path(tls_dir)
        address, name = settings.keymanager, settings.keymanager_server_name
        return cls(
            tls_dir,
            address,
            server_name=name,
            renew_fraction=settings.renew_fraction,
            check_every_s=settings.renew_check_s,
            on_renew=lambda _: client.reconnect(TLSConfig.from_dir(tls_dir), address, name),
        )

    def due(self, now: dt.datetime | None = None) -> bool:
        _, start, end = _lifetime(self.tls_dir)
        now = now or dt.datetime.now(dt.UTC)
        return now >= start + (end - start) * self.renew_fraction

    def tick(self) -> None:
        if self.due():
            try:
                self.renew_now()
            except (PermissionDeniedError, UnauthenticatedError) as exc:
                # Revoked, or the lineage reached its maximum lifetime: retrying will not
                # help; the party needs a new enrollment token.
                logger.error("[CertificateRenewer] cannot renew %s: %s", self.tls_dir, exc)

    def renew_now(self) -> x509.Certificate:
        identity = _lifetime(self.tls_dir)[0]
        client = KeyManagerClient.connect(
            self.keymanager, TLSConfig.from_dir(self.tls_dir), server_name=self.server_name
        )
        try:
            cert = renew_certificate(client, self.tls_dir, identity)
        finally:
            client.close()
        self.renewals += 1
        logger.info(
            "[CertificateRenewer] renewed %s, valid until %s",
            identity,
            cert.not_valid_after_utc.isoformat(),
        )
        if self.on_renew is not None:
            self.on_renew(cert)
        return cert


@dataclass(eq=False)
class RevocationPoller(Periodic):
    """Fetches the key manager's revocation list every ``period_s`` into ``revocations``
    (which ends the open streams of newly revoked certificates), and saves each list it
    fetched to ``cache``, from which :meth:`restore` loads it after a restart. Its age is
    the gauge ``splitfed_revocation_list_age_seconds``."""

    revocations: RevocationList
    keymanager: str
    tls: Callable[[], TLSConfig]
    _: KW_ONLY
    server_name: str | None = None
    period_s: float = 10.0
    cache: Path | None = None
    _cache_failing: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__("revocation-poller", self.period_s)
        REVOCATION_LISTS.add(self.revocations)

    def stop(self) -> None:
        super().stop()
        REVOCATION_LISTS.discard(self.revocations)

    def restore(self) -> bool:
        """Install the list saved in ``cache`` (before serving); False if there is none."""
        if self.cache is None or not self.revocations.restore(self.cache):
            return False
        fetched_at = self.revocations.fetched_at or 0.0
        logger.info(
            "[RevocationPoller] enforcing the revocation list saved in %s: version %d, fetched %s",
            self.cache,
            self.revocations.version,
            dt.datetime.fromtimestamp(fetched_at, dt.UTC).isoformat(timespec="seconds"),
        )
        return True

    def tick(self) -> None:
        self.fetch(DEFAULT_RETRY, timeout_s=30.0)

    def poll_now(self, timeout_s: float = 5.0) -> bool:
        """One fetch without retries (at start-up); False, with a warning, if it failed."""
        try:
            self.fetch(RetryPolicy(max_attempts=1), timeout_s=timeout_s)
        except Exception as exc:
            logger.warning(
                "[RevocationPoller] cannot fetch the revocation list from %s at start (%s); "
                "enforcing %s until a poll succeeds",
                self.keymanager,
                exc,
                f"version {self.revocations.version}"
                if self.revocations.fetched_at is not None
                else "no revocation list",
            )
            return False
        return True

    def fetch(self, retry: RetryPolicy, *, timeout_s: float) -> None:
        tls = self.tls().reload()
        client = KeyManagerClient(
            create_channel(self.keymanager, tls, server_name=self.server_name),
            retry=retry,
            timeout_s=timeout_s,
        )
        try:
            state = client.revocations()
        finally:
            client.close()
        self.revocations.update(state.version, state.serials)
        if self.cache is not None:
            try:
                self.revocations.save(self.cache)
            except OSError as exc:
                if not self._cache_failing:
                    logger.warning("[RevocationPoller] cannot save %s: %s", self.cache, exc)
                self._cache_failing = True
            else:
                self._cache_failing = False
