"""The key manager's logic: a deployment CA on disk plus the :class:`KeyStore`.

``init_authority`` creates a state directory (``splitfed keys init``); ``KeyAuthority``
opens one and implements enrollment, renewal, tokens, revocation and session data keys as
plain methods that raise :mod:`splitfed.errors` exceptions. No gRPC in here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from splitfed.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from splitfed.logs import redact
from splitfed.metrics import CERTIFICATE_SOURCES, CERTIFICATES_ISSUED, CERTIFICATES_REVOKED
from splitfed.security.ca import (
    DEFAULT_TRUST_DOMAIN,
    CertificateAuthority,
    generate_private_key,
    make_csr,
    private_key_pem,
    validate_identity,
    validate_role,
    write_pem,
)
from splitfed.security.identity import Identity
from splitfed.services.keymanager.store import (
    CertificateRow,
    IssuedKey,
    KeyStore,
    SessionRow,
    TokenRefusedError,
)

logger = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
DATABASE = "keymanager.db"
SERVER_DIR = "server"
KEYMANAGER_IDENTITY = "keymanager"
# Roles a bootstrap token may grant (the key manager's own certificate comes from init).
ENROLLABLE_ROLES = ("client", "backbone", "aggregator", "admin")


def certificate_row(pem: bytes, identity: str, role: str) -> CertificateRow:
    cert = x509.load_pem_x509_certificate(pem)
    return CertificateRow(
        serial=serial_hex(cert),
        identity=identity,
        role=role,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        revoked_at=None,
        reason="",
    )


def server_names(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The DNS names and IP addresses a certificate carries (kept on renewal)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    dns_names = tuple(sans.get_values_for_type(x509.DNSName))
    return dns_names, tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def init_authority(
    state_dir: Path,
    kek: bytes,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ca: CertificateAuthority | None = None,
    server_dns: tuple[str, ...] = ("localhost",),
    server_ips: tuple[str, ...] = ("127.0.0.1",),
    admin_identity: str = "admin",
    admin_dir: Path | None = None,
    validity: dt.timedelta = dt.timedelta(hours=24),
) -> CertificateAuthority:
    """Create a key manager state directory: the CA (new, or ``ca`` imported) with its key
    encrypted under ``kek``, the database, the key manager's own server certificate in
    ``server/``, and (with ``admin_dir``) an admin certificate whose key is written there."""
    if (state_dir / CA_KEY).exists() or (state_dir / DATABASE).exists():
        raise FileExistsError(f"{state_dir} already holds a key manager state")
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    authority = ca or CertificateAuthority.create(trust_domain=trust_domain)
    write_pem(state_dir / CA_CERT, authority.cert_pem, private=False)
    write_pem(state_dir / CA_KEY, authority.key_pem(kek), private=True)
    store = KeyStore(state_dir / DATABASE, kek)
    try:
        issued = [
            (
                authority.issue(
                    KEYMANAGER_IDENTITY,
                    "keymanager",
                    dns_names=server_dns,
                    ip_addresses=server_ips,
                    validity=validity,
                ),
                state_dir / SERVER_DIR,
            )
        ]
        if admin_dir is not None:
            issued.append((authority.issue(admin_identity, "admin", validity=validity), admin_dir))
        for certificate, directory in issued:
            certificate.write(directory)
            store.record_certificate(
                certificate_row(certificate.cert_pem, certificate.identity, certificate.role),
                certificate.cert_pem,
                actor="init",
                action="certificate.issue",
            )
    finally:
        store.close()
    return authority


@dataclass(frozen=True)
class Grant:
    certificate_pem: bytes
    ca_pem: bytes


class KeyAuthority:
    """An opened key manager state directory."""

    def __init__(
        self,
        state_dir: Path,
        kek: bytes,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        certificate_validity: dt.timedelta = dt.timedelta(hours=24),
        token_ttl: dt.timedelta = dt.timedelta(hours=24),
        max_token_ttl: dt.timedelta = dt.timedelta(days=7),
    ) -> None:
        for name in (CA_CERT, CA_KEY, DATABASE):
            if not (state_dir / name).is_file():
                raise ValueError(
                    f"{state_dir} is not a key manager state directory (no {name}); "
                    "create one with `splitfed keys init`"
                )
        try:
            self.ca = CertificateAuthority.load(
                (state_dir / CA_CERT).read_bytes(),
                (state_dir / CA_KEY).read_bytes(),
                password=kek,
                trust_domain=trust_domain,
            )
        except (ValueError, TypeError):
            raise ValueError(
                f"cannot decrypt {state_dir / CA_KEY}: wrong key-encryption key"
            ) from None
        self.store = KeyStore(state_dir / DATABASE, kek)
        CERTIFICATE_SOURCES.add(self.store)
        self.certificate_validity = certificate_validity
        self.token_ttl = token_ttl
        self.max_token_ttl = max_token_ttl

    def close(self) -> None:
        CERTIFICATE_SOURCES.discard(self.store)
        self.store.close()

    # --- certificates -----------------------------------------------------------------

    def create_token(
        self,
        identity: str,
        role: str,
        actor: Identity,
        ttl_s: float = 0,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
    ) -> tuple[str, float]:
        try:
            validate_identity(identity)
            validate_role(role)
            for ip in ip_addresses:
                ipaddress.ip_address(ip)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        if role not in ENROLLABLE_ROLES:
            raise InvalidArgumentError(
                f"tokens grant one of the roles {', '.join(ENROLLABLE_ROLES)}, not {role!r}"
            )
        if (dns_names or ip_addresses) and role not in ("backbone", "aggregator"):
            raise InvalidArgumentError(f"only server roles get DNS names or IPs, not {role!r}")
        ttl = ttl_s or self.token_ttl.total_seconds()
        limit = self.max_token_ttl.total_seconds()
        if ttl > limit:
            raise InvalidArgumentError(f"token ttl {ttl:.0f}s exceeds the maximum {limit:.0f}s")
        token, expires = self.store.create_token(
            identity,
            role,
            ttl,
            actor=str(actor),
            dns_names=dns_names,
            ip_addresses=ip_addresses,
        )
        logger.info("[KeyAuthority] %s created a %s token for %s", actor, role, identity)
        return token, expires

    def enroll(self, token: str, csr_pem: bytes) -> Grant:
        try:
            grant = self.store.peek_token(token)
        except TokenRefusedError as exc:
            raise UnauthenticatedError(str(exc)) from None
        subject = _csr_subject(csr_pem)
        if subject != grant.identity:
            raise PermissionDeniedError(
                f"the CSR names {subject!r} but the token was issued for {grant.identity!r}"
            )
        pem = self._sign(csr_pem, grant.identity, grant.role, grant.dns_names, grant.ip_addresses)
        try:
            self.store.consume_token(token, certificate_row(pem, grant.identity, grant.role), pem)
        except TokenRefusedError as exc:
            raise UnauthenticatedError(str(exc)) from None
        CERTIFICATES_ISSUED.labels(grant.role, "enroll").inc()
        logger.info("[KeyAuthority] enrolled %s/%s", grant.role, grant.identity)
        return Grant(pem, self.ca.cert_pem)

    def renew(self, caller: Identity, caller_cert_pem: bytes, csr_pem: bytes) -> Grant:
        subject = _csr_subject(csr_pem)
        if subject != caller.name:
            raise PermissionDeniedError(
                f"the CSR names {subject!r}; a renewal is for the caller's own identity "
                f"{caller.name!r}"
            )
        current = x509.load_pem_x509_certificate(caller_cert_pem)
        dns_names, ips = server_names(current)
        pem = self._sign(csr_pem, caller.name, caller.role, dns_names, ips)
        self.store.record_certificate(
            certificate_row(pem, caller.name, caller.role),
            pem,
            actor=str(caller),
            action="certificate.renew",
        )
        CERTIFICATES_ISSUED.labels(caller.role, "renew").inc()
        logger.info("[KeyAuthority] renewed %s", caller)
        return Grant(pem, self.ca.cert_pem)

    def _sign(
        self,
        csr_pem: bytes,
        identity: str,
        role: str,
        dns_names: tuple[str, ...],
        ip_addresses: tuple[str, ...],
    ) -> bytes:
        try:
            return self.ca.sign_csr(
                csr_pem,
                identity,
                role,
                dns_names=dns_names,
                ip_addresses=ip_addresses,
                validity=self.certificate_validity,
            )
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None

    def renew_own(self, tls_dir: Path, renew_fraction: float = 2 / 3) -> bool:
        """Renew the key manager's own server certificate in ``tls_dir`` (it signs it
        itself) once ``renew_fraction`` of its lifetime has passed; True if renewed."""
        current = x509.load_pem_x509_certificate((tls_dir / "cert.pem").read_bytes())
        start, end = current.not_valid_before_utc, current.not_valid_after_utc
        if dt.datetime.now(dt.UTC) < start + (end - start) * renew_fraction:
            return False
        dns_names, ips = server_names(current)
        key = generate_private_key()
        pem = self._sign(
            make_csr(key, KEYMANAGER_IDENTITY), KEYMANAGER_IDENTITY, "keymanager", dns_names, ips
        )
        self.store.record_certificate(
            certificate_row(pem, KEYMANAGER_IDENTITY, "keymanager"),
            pem,
            actor="keymanager",
            action="certificate.renew",
        )
        # The key first: a reader that sees the new key with the old certificate refuses
        # the pair and keeps the old material until cert.pem follows.
        CERTIFICATES_ISSUED.labels("keymanager", "renew").inc()
        write_pem(tls_dir / "key.pem", private_key_pem(key), private=True)
        write_pem(tls_dir / "cert.pem", pem, private=False)
        write_pem(tls_dir / "ca.pem", self.ca.cert_pem, private=False)
        logger.info("[KeyAuthority] renewed the key manager's own certificate in %s", tls_dir)
        return True

    def revoke(self, actor: Identity, *, identity: str = "", serial: str = "", reason: str) -> int:
        if bool(identity) == bool(serial):
            raise InvalidArgumentError("revoke one identity or one serial")
        if serial and self.store.certificate(serial) is None:
            raise NotFoundError(f"no certificate with serial {serial}")
        count = self.store.revoke(
            identity=identity, serial=serial, reason=reason or "unspecified", actor=str(actor)
        )
        CERTIFICATES_REVOKED.inc(count)
        logger.warning(
            "[KeyAuthority] %s revoked %d certificate(s) of %s", actor, count, identity or serial
        )
        return count

    # --- session data keys ------------------------------------------------------------

    def register_session(self, backbone: Identity, session_id: str, owner: str) -> IssuedKey:
        if not session_id or len(session_id) > 128:
            raise InvalidArgumentError("session_id must be 1-128 characters")
        if not owner:
            raise InvalidArgumentError("owner is required")
        row = self.store.register_session(session_id, owner, str(backbone))
        if row.backbone != str(backbone) or row.owner != owner:
            raise PermissionDeniedError(f"session {session_id!r} is registered by another party")
        return self.store.issue_key(session_id)

    def _session_for(self, caller: Identity, session_id: str, *, owner_only: bool) -> SessionRow:
        row = self.store.session(session_id)
        allowed = row is not None and (
            str(caller) == row.owner or (not owner_only and str(caller) == row.backbone)
        )
        if row is None or not allowed:
            # The same answer for "no such session" and "not yours": no probing.
            raise PermissionDeniedError(f"{caller} has no access to session {session_id!r}")
        return row

    def session_key(self, caller: Identity, session_id: str, key_id: int = 0) -> IssuedKey:
        self._session_for(caller, session_id, owner_only=False)
        try:
            return self.store.issue_key(session_id, key_id)
        except KeyError as exc:
            raise NotFoundError(str(exc.args[0])) from None
        except OverflowError as exc:
            raise FailedPreconditionError(f"{exc}; rotate the session key") from None

    def rotate(self, caller: Identity, session_id: str) -> IssuedKey:
        self._session_for(caller, session_id, owner_only=True)
        key_id = self.store.rotate_key(session_id, str(caller))
        logger.info("[KeyAuthority] session %s rotated to key %d", redact(session_id), key_id)
        return self.store.issue_key(session_id, key_id)

    def end_session(self, caller: Identity, session_id: str) -> None:
        self._session_for(caller, session_id, owner_only=False)
        self.store.end_session(session_id, str(caller))


def _csr_subject(csr_pem: bytes) -> str:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise InvalidArgumentError("csr_pem is not a PEM certificate signing request") from None
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise InvalidArgumentError("the CSR subject must have exactly one common name")
    return str(names[0].value)
