"""The key manager's logic: a deployment CA on disk plus the :class:`KeyStore`.

``init_authority`` creates a state directory (``splitfed keys init``); ``KeyAuthority``
opens one and implements enrollment, renewal, tokens, revocation and session data keys as
plain methods that raise :mod:`splitfed.errors` exceptions. No gRPC in here.

The CA key and the stored session keys are encrypted under keys stretched from the KEK
with scrypt (:mod:`.kek`); opening an older state directory migrates it.

One module of some 550 lines: enrollment, renewal, revocation and session keys share the
CA, the store and the same checks; the stretching of the KEK lives in :mod:`.kek`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
from splitfed.protocol.keys import SessionKeyGrant
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
from splitfed.services.keymanager.kek import (
    KDF_FILE,
    ScryptParams,
    StateKeys,
    derive_keys,
    legacy_keys,
    read_kdf,
    write_kdf,
)
from splitfed.services.keymanager.metrics import (
    CERTIFICATE_SOURCES,
    CERTIFICATES_ISSUED,
    CERTIFICATES_REVOKED,
)
from splitfed.services.keymanager.store import (
    CertificateRefusedError,
    CertificateRevokedError,
    CertificateRow,
    KeyStore,
    SessionRow,
    TokenRefusedError,
)
from splitfed.tls import CLOCK_SKEW, PrivateKey

logger = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
DATABASE = "keymanager.db"
SERVER_DIR = "server"
KEYMANAGER_IDENTITY = "keymanager"
# Roles a bootstrap token may grant (the key manager's own certificate comes from init).
ENROLLABLE_ROLES = ("client", "backbone", "aggregator", "admin")


def certificate_row(
    pem: bytes, identity: str, role: str, enrolled_at: float | None = None
) -> CertificateRow:
    cert = x509.load_pem_x509_certificate(pem)
    return CertificateRow(
        serial=serial_hex(cert),
        identity=identity,
        role=role,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        revoked_at=None,
        reason="",
        enrolled_at=enrolled_at,
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
    kdf: ScryptParams | None = None,
    allow_weak_kdf: bool = False,
) -> CertificateAuthority:
    """Create a key manager state directory: the scrypt salt and parameters (``kdf``,
    default :class:`ScryptParams`; weaker than the floor only with the test-only
    ``allow_weak_kdf``), the CA (new, or ``ca`` imported) with its key encrypted under the
    stretched ``kek``, the database, the key manager's own server certificate in
    ``server/``, and (with ``admin_dir``) an admin certificate whose key is written there."""
    kdf = kdf or ScryptParams()
    kdf.check("init", allow_weak=allow_weak_kdf)
    if any((state_dir / name).exists() for name in (CA_KEY, DATABASE, KDF_FILE)):
        raise FileExistsError(f"{state_dir} already holds a key manager state")
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    keys = derive_keys(kek, write_kdf(state_dir, kdf))
    authority = ca or CertificateAuthority.create(trust_domain=trust_domain)
    write_pem(state_dir / CA_CERT, authority.cert_pem, private=False)
    write_pem(state_dir / CA_KEY, authority.key_pem(keys.ca_password), private=True)
    store = KeyStore(state_dir / DATABASE, keys.sealing_key)
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
        max_certificate_lifetime: dt.timedelta = dt.timedelta(days=30),
        kdf: ScryptParams | None = None,
        allow_weak_kdf: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open ``state_dir`` with the key-encryption key ``kek``. A directory made before
        ``kdf.json`` existed is migrated (``kdf``: its new parameters, default
        :class:`ScryptParams`); ``allow_weak_kdf`` (tests only) admits parameters below
        the floor. Certificates are renewed for ``max_certificate_lifetime`` after their
        lineage's enrollment, then a new token is needed; ``clock`` gives the time."""
        if max_certificate_lifetime < certificate_validity:
            raise ValueError(
                f"the maximum certificate lifetime ({max_certificate_lifetime}) is shorter "
                f"than one certificate's validity ({certificate_validity})"
            )
        for name in (CA_CERT, CA_KEY, DATABASE):
            if not (state_dir / name).is_file():
                raise ValueError(
                    f"{state_dir} is not a key manager state directory (no {name}); "
                    "create one with `splitfed keys init`"
                )
        self.ca, keys = _open_ca(state_dir, kek, trust_domain, kdf, allow_weak_kdf)
        self.store = KeyStore(state_dir / DATABASE, keys.sealing_key)
        try:
            resealed = self.store.reseal(legacy_keys(kek).sealing_key)
        except ValueError:
            self.store.close()
            raise ValueError(
                f"cannot migrate the session keys in {state_dir / DATABASE}: they do not "
                "decrypt under this key-encryption key"
            ) from None
        if resealed:
            logger.warning(
                "[KeyAuthority] migrated %s to the scrypt-stretched key-encryption key: "
                "re-sealed %d session key(s)",
                state_dir,
                resealed,
            )
        CERTIFICATE_SOURCES.add(self.store)
        self.certificate_validity = certificate_validity
        self.token_ttl = token_ttl
        self.max_token_ttl = max_token_ttl
        self.max_certificate_lifetime = max_certificate_lifetime
        self.clock = clock

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
        now = self.clock()
        pem = self._sign(
            csr_pem,
            grant.identity,
            grant.role,
            grant.dns_names,
            grant.ip_addresses,
            not_before=now - CLOCK_SKEW.total_seconds(),
        )
        row = certificate_row(pem, grant.identity, grant.role, enrolled_at=now)
        try:
            self.store.consume_token(token, row, pem)
        except TokenRefusedError as exc:
            raise UnauthenticatedError(str(exc)) from None
        CERTIFICATES_ISSUED.labels(grant.role, "enroll").inc()
        logger.info("[KeyAuthority] enrolled %s/%s", grant.role, grant.identity)
        return Grant(pem, self.ca.cert_pem)

    def renew(self, caller: Identity, caller_cert_pem: bytes, csr_pem: bytes) -> Grant:
        """A new certificate for the caller, in the lineage of the one it called with:
        refused if that one is revoked (checked again in the transaction that records the
        new one), unknown to this key manager, or its lineage began more than
        ``max_certificate_lifetime`` ago; never valid beyond that lifetime."""
        subject = _csr_subject(csr_pem)
        if subject != caller.name:
            raise PermissionDeniedError(
                f"the CSR names {subject!r}; a renewal is for the caller's own identity "
                f"{caller.name!r}"
            )
        current = x509.load_pem_x509_certificate(caller_cert_pem)
        serial = serial_hex(current)
        record = self.store.certificate(serial)
        if record is None or (record.identity, record.role) != (caller.name, caller.role):
            raise PermissionDeniedError(
                f"the key manager has no record of certificate {serial} of {caller}; "
                "enroll with a new enrollment token"
            )
        if record.revoked_at is not None:
            raise UnauthenticatedError("certificate revoked")
        assert record.enrolled_at is not None  # always set on stored rows
        now = self.clock()
        lineage_end = record.enrolled_at + self.max_certificate_lifetime.total_seconds()
        if now >= lineage_end:
            raise PermissionDeniedError(
                f"{caller} enrolled at {_utc(record.enrolled_at)}; certificates are renewed "
                f"for {self.max_certificate_lifetime} after enrollment (until "
                f"{_utc(lineage_end)}): enroll again with a new enrollment token"
            )
        not_before = now - CLOCK_SKEW.total_seconds()
        dns_names, ips = server_names(current)
        pem = self._sign(
            csr_pem,
            caller.name,
            caller.role,
            dns_names,
            ips,
            not_before=not_before,
            not_after=lineage_end,
        )
        try:
            self.store.record_renewal(
                serial, certificate_row(pem, caller.name, caller.role), pem, actor=str(caller)
            )
        except CertificateRevokedError:
            # Revoked while the new certificate was being signed: it is never handed out.
            logger.warning("[KeyAuthority] renewal of %s refused: revoked meanwhile", caller)
            raise UnauthenticatedError("certificate revoked") from None
        except CertificateRefusedError as exc:
            raise PermissionDeniedError(str(exc)) from None
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
        *,
        not_before: float | None = None,
        not_after: float | None = None,
    ) -> bytes:
        """Sign for ``certificate_validity`` from ``not_before`` (default: now less the
        clock skew allowance), ending at ``not_after`` at the latest."""
        start = None if not_before is None else dt.datetime.fromtimestamp(not_before, dt.UTC)
        validity = self.certificate_validity
        if not_after is not None:
            assert not_before is not None
            validity = min(validity, dt.timedelta(seconds=not_after - not_before))
        try:
            return self.ca.sign_csr(
                csr_pem,
                identity,
                role,
                dns_names=dns_names,
                ip_addresses=ip_addresses,
                validity=validity,
                not_before=start,
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
        row = certificate_row(pem, KEYMANAGER_IDENTITY, "keymanager")
        self._keep_local(
            tls_dir, key, pem, row, actor="keymanager", action="certificate.renew", kind="renew"
        )
        logger.info("[KeyAuthority] renewed the key manager's own certificate in %s", tls_dir)
        return True

    def _keep_local(
        self,
        directory: Path,
        key: PrivateKey,
        pem: bytes,
        row: CertificateRow,
        *,
        actor: str,
        action: str,
        kind: Literal["enroll", "renew"],
    ) -> None:
        """Record a certificate signed here for a ``key`` generated here (audited as
        ``actor`` doing ``action``), count it as ``kind``, and write both with this CA's
        ca.pem to ``directory``: key.pem (private) first, so that a reader that sees the
        new key with the old certificate refuses the pair and keeps the old material until
        cert.pem follows."""
        self.store.record_certificate(row, pem, actor=actor, action=action)
        CERTIFICATES_ISSUED.labels(row.role, kind).inc()
        write_pem(directory / "key.pem", private_key_pem(key), private=True)
        write_pem(directory / "cert.pem", pem, private=False)
        write_pem(directory / "ca.pem", self.ca.cert_pem, private=False)

    def issue_admin(self, identity: str, out_dir: Path) -> x509.Certificate:
        """An admin certificate for ``identity``, key generated here, written to ``out_dir``
        (a new lineage). Local, with the KEK: for when no admin certificate can renew."""
        try:
            validate_identity(identity)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        key = generate_private_key()
        now = self.clock()
        pem = self._sign(
            make_csr(key, identity),
            identity,
            "admin",
            (),
            (),
            not_before=now - CLOCK_SKEW.total_seconds(),
        )
        row = certificate_row(pem, identity, "admin", enrolled_at=now)
        self._keep_local(
            out_dir, key, pem, row, actor="local", action="certificate.issue", kind="enroll"
        )
        logger.warning("[KeyAuthority] issued an admin certificate for %s locally", identity)
        return x509.load_pem_x509_certificate(pem)

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

    def register_session(self, backbone: Identity, session_id: str, owner: str) -> SessionKeyGrant:
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

    def session_key(self, caller: Identity, session_id: str, key_id: int = 0) -> SessionKeyGrant:
        self._session_for(caller, session_id, owner_only=False)
        try:
            return self.store.issue_key(session_id, key_id)
        except KeyError as exc:
            raise NotFoundError(str(exc.args[0])) from None
        except OverflowError as exc:
            raise FailedPreconditionError(f"{exc}; rotate the session key") from None

    def rotate(self, caller: Identity, session_id: str) -> SessionKeyGrant:
        self._session_for(caller, session_id, owner_only=True)
        key_id = self.store.rotate_key(session_id, str(caller))
        logger.info("[KeyAuthority] session %s rotated to key %d", redact(session_id), key_id)
        return self.store.issue_key(session_id, key_id)

    def end_session(self, caller: Identity, session_id: str) -> None:
        self._session_for(caller, session_id, owner_only=False)
        self.store.end_session(session_id, str(caller))


def _utc(timestamp: float) -> str:
    return f"{dt.datetime.fromtimestamp(timestamp, dt.UTC):%Y-%m-%d %H:%M:%S} UTC"


def _open_ca(
    state_dir: Path,
    kek: bytes,
    trust_domain: str,
    kdf: ScryptParams | None,
    allow_weak_kdf: bool,
) -> tuple[CertificateAuthority, StateKeys]:
    """The CA and the state's keys, stretched from ``kek``. An older state directory (no
    kdf.json, the CA key encrypted under the KEK itself) gets a kdf.json and its CA key
    re-encrypted; each step is safe to repeat after a crash."""
    cert_pem, key_path = (state_dir / CA_CERT).read_bytes(), state_dir / CA_KEY

    def load(password: bytes) -> CertificateAuthority | None:
        try:
            return CertificateAuthority.load(
                cert_pem, key_path.read_bytes(), password=password, trust_domain=trust_domain
            )
        except (ValueError, TypeError):
            return None

    record = read_kdf(state_dir)
    if record is None:
        # Written only once the KEK is known to open the older layout.
        if load(legacy_keys(kek).ca_password) is None:
            raise ValueError(
                f"cannot decrypt {key_path}: wrong key-encryption key (or {KDF_FILE} is "
                f"missing from {state_dir}: restore it from the backup)"
            )
        params = kdf or ScryptParams()
        params.check(state_dir / KDF_FILE, allow_weak=allow_weak_kdf)
        record = write_kdf(state_dir, params)
        logger.warning(
            "[KeyAuthority] %s predates the scrypt-stretched key-encryption key: "
            "migrating it (%s written)",
            state_dir,
            KDF_FILE,
        )
    record.params.check(state_dir / KDF_FILE, allow_weak=allow_weak_kdf)
    keys = derive_keys(kek, record)
    ca = load(keys.ca_password)
    if ca is None:
        ca = load(legacy_keys(kek).ca_password)
        if ca is None:
            raise ValueError(f"cannot decrypt {key_path}: wrong key-encryption key")
        write_pem(key_path, ca.key_pem(keys.ca_password), private=True)
        logger.warning("[KeyAuthority] migrated %s: re-encrypted under the stretched key", key_path)
    return ca, keys


def _csr_subject(csr_pem: bytes) -> str:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise InvalidArgumentError("csr_pem is not a PEM certificate signing request") from None
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise InvalidArgumentError("the CSR subject must have exactly one common name")
    return str(names[0].value)
