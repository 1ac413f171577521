"""Persistent state of the key manager, in one SQLite database.

Tables: bootstrap tokens (only their SHA-256 digests), issued certificates with their
revocation state, sessions with their data keys (sealed with AES-256-GCM under the sealing
key stretched from the key-encryption key, see :mod:`.kek`), counters, and an append-only
audit log of every issuance and revocation. Every change is one transaction, so a crash
leaves either the old or the new state; ``path=None`` keeps everything in memory (tests).

The store never sees a party's private key; session data keys exist in the clear only in
memory while they are handed out.

One module of some 600 lines: every table shares one connection, one lock and one
transaction helper, and the schema belongs with its migrations (:data:`MIGRATIONS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from splitfed.protocol.keys import SessionKeyGrant

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    digest TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    role TEXT NOT NULL,
    dns_names TEXT NOT NULL,
    ip_addresses TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    role TEXT NOT NULL,
    not_before REAL NOT NULL,
    not_after REAL NOT NULL,
    pem BLOB NOT NULL,
    revoked_at REAL,
    reason TEXT NOT NULL DEFAULT '',
    -- when the lineage (an enrollment and the renewals that follow it) began
    enrolled_at REAL NOT NULL,
    -- the certificate this one was renewed from (NULL: enrolled)
    renewed_from TEXT
);
CREATE INDEX IF NOT EXISTS certificates_identity ON certificates (identity);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    backbone TEXT NOT NULL,
    created_at REAL NOT NULL,
    current_key INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS session_keys (
    session_id TEXT NOT NULL,
    key_id INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    created_at REAL NOT NULL,
    next_prefix INTEGER NOT NULL,
    -- 2: sealed under the scrypt-stretched key; 1: under HKDF(KEK) (older state)
    sealing INTEGER NOT NULL DEFAULT 2,
    PRIMARY KEY (session_id, key_id)
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""

# Columns added since the first schema: (table, column, definition, then how to fill the
# rows an older database already has). Added when such a database is opened.
MIGRATIONS = (
    ("session_keys", "sealing", "INTEGER NOT NULL DEFAULT 1", ""),
    # Lineages were not recorded: each older certificate starts its own.
    (
        "certificates",
        "enrolled_at",
        "REAL",
        "UPDATE certificates SET enrolled_at = not_before WHERE enrolled_at IS NULL",
    ),
    ("certificates", "renewed_from", "TEXT", ""),
)
CERTIFICATE_COLUMNS = (
    "serial, identity, role, not_before, not_after, revoked_at, reason, enrolled_at"
)

# Nonce prefixes are 4 bytes: each key hands out at most this many.
MAX_PREFIXES = 1 << 32
SEALING = 2


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    identity: str
    role: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    expires_at: float
    used_at: float | None


@dataclass(frozen=True)
class CertificateRow:
    serial: str
    identity: str
    role: str
    not_before: float
    not_after: float
    revoked_at: float | None
    reason: str
    # Start of the certificate's lineage (its enrollment); None when recording a new
    # certificate: its not_before. Renewals copy it from their predecessor.
    enrolled_at: float | None = None


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    owner: str
    backbone: str
    current_key: int


@dataclass(frozen=True)
class AuditEntry:
    at: float
    actor: str
    action: str
    subject: str
    detail: str


class TokenRefusedError(Exception):
    """An enrollment token is unknown, used or expired (the message says which)."""


class CertificateRefusedError(Exception):
    """A certificate cannot be renewed: unknown, or not the caller's (the message says)."""


class CertificateRevokedError(CertificateRefusedError):
    """The certificate to renew was revoked."""


class KeyStore:
    """All durable state of a key manager. Thread-safe; one writer at a time."""

    def __init__(self, path: Path | None, sealing_key: bytes) -> None:
        if len(sealing_key) != 32:
            raise ValueError("the sealing key must be 32 bytes (see keymanager.kek)")
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                # Created 0600 before SQLite opens it.
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(
            ":memory:" if path is None else str(path), check_same_thread=False, isolation_level=None
        )
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        self._lock = threading.Lock()
        self._migrate()
        self._aead = AESGCM(sealing_key)

    def _migrate(self) -> None:
        """Create the tables, and add the columns an older database lacks."""
        self._db.executescript(SCHEMA)
        with self._tx() as db:
            for table, column, definition, fill in MIGRATIONS:
                columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                    if fill:
                        db.execute(fill)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _audit(
        self, db: sqlite3.Connection, actor: str, action: str, subject: str, **detail: object
    ) -> None:
        db.execute(
            "INSERT INTO audit (at, actor, action, subject, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), actor, action, subject, json.dumps(detail, sort_keys=True)),
        )

    # --- tokens -----------------------------------------------------------------------

    def create_token(
        self,
        identity: str,
        role: str,
        ttl_s: float,
        *,
        actor: str,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> tuple[str, float]:
        """A fresh one-time token and its expiry; only its digest is stored."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        expires = now + ttl_s
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    token_digest(token),
                    identity,
                    role,
                    json.dumps(list(dns_names)),
                    json.dumps(list(ip_addresses)),
                    now,
                    expires,
                ),
            )
            self._audit(db, actor, "token.create", identity, role=role, expires_at=expires)
        return token, expires

    def peek_token(self, token: str) -> TokenRecord:
        """The token's grant; raises :class:`TokenRefusedError` if it cannot be used now."""
        with self._lock:
            row = self._db.execute(
                "SELECT identity, role, dns_names, ip_addresses, expires_at, used_at "
                "FROM tokens WHERE digest = ?",
                (token_digest(token),),
            ).fetchone()
        if row is None:
            raise TokenRefusedError("unknown enrollment token")
        record = TokenRecord(
            row[0], row[1], tuple(json.loads(row[2])), tuple(json.loads(row[3])), row[4], row[5]
        )
        if record.used_at is not None:
            raise TokenRefusedError("enrollment token was already used")
        if record.expires_at <= time.time():
            raise TokenRefusedError("enrollment token has expired; ask the operator for a new one")
        return record

    def consume_token(self, token: str, certificate: CertificateRow, pem: bytes) -> None:
        """Mark the token used and record the certificate it bought, atomically: of two
        concurrent enrollments with one token, exactly one succeeds."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE tokens SET used_at = ? WHERE digest = ? AND used_at IS NULL "
                "AND expires_at > ?",
                (time.time(), token_digest(token), time.time()),
            )
            if cursor.rowcount != 1:
                raise TokenRefusedError("enrollment token was already used or has expired")
            self._insert_certificate(db, certificate, pem)
            self._audit(
                db,
                f"token/{certificate.identity}",
                "certificate.enroll",
                certificate.identity,
                role=certificate.role,
                serial=certificate.serial,
                not_after=certificate.not_after,
            )

    # --- certificates -----------------------------------------------------------------

    def _insert_certificate(
        self,
        db: sqlite3.Connection,
        certificate: CertificateRow,
        pem: bytes,
        renewed_from: str | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO certificates (serial, identity, role, not_before, not_after, pem, "
            "enrolled_at, renewed_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                certificate.serial,
                certificate.identity,
                certificate.role,
                certificate.not_before,
                certificate.not_after,
                pem,
                certificate.not_before
                if certificate.enrolled_at is None
                else certificate.enrolled_at,
                renewed_from,
            ),
        )

    def record_certificate(
        self, certificate: CertificateRow, pem: bytes, *, actor: str, action: str
    ) -> None:
        with self._tx() as db:
            self._insert_certificate(db, certificate, pem)
            self._audit(
                db,
                actor,
                action,
                certificate.identity,
                role=certificate.role,
                serial=certificate.serial,
                not_after=certificate.not_after,
            )

    def record_renewal(
        self, predecessor: str, certificate: CertificateRow, pem: bytes, *, actor: str
    ) -> CertificateRow:
        """Record ``certificate``, renewed from the one with serial ``predecessor``, in the
        lineage of its predecessor (whose ``enrolled_at`` it keeps). The predecessor's
        revocation is checked in the same transaction, so a revocation that lands while
        the new certificate is being signed either comes first (and nothing is recorded:
        :class:`CertificateRevokedError`) or revokes the new certificate too."""
        with self._tx() as db:
            row = db.execute(
                f"SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE serial = ?",
                (predecessor,),
            ).fetchone()
            if row is None:
                raise CertificateRefusedError(f"no record of certificate {predecessor}")
            previous = CertificateRow(*row)
            if (previous.identity, previous.role) != (certificate.identity, certificate.role):
                raise CertificateRefusedError(
                    f"certificate {predecessor} belongs to {previous.role}/{previous.identity}, "
                    f"not {certificate.role}/{certificate.identity}"
                )
            if previous.revoked_at is not None:
                raise CertificateRevokedError("certificate revoked")
            renewed = dataclasses.replace(certificate, enrolled_at=previous.enrolled_at)
            self._insert_certificate(db, renewed, pem, renewed_from=predecessor)
            self._audit(
                db,
                actor,
                "certificate.renew",
                renewed.identity,
                role=renewed.role,
                serial=renewed.serial,
                not_after=renewed.not_after,
                renewed_from=predecessor,
                enrolled_at=renewed.enrolled_at,
            )
        return renewed

    def certificates(self, identity: str = "") -> list[CertificateRow]:
        query = f"SELECT {CERTIFICATE_COLUMNS} FROM certificates"
        args: tuple[str, ...] = ()
        if identity:
            query += " WHERE identity = ?"
            args = (identity,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY not_before, serial", args).fetchall()
        return [CertificateRow(*row) for row in rows]

    def certificate(self, serial: str) -> CertificateRow | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE serial = ?",
                (serial,),
            ).fetchone()
        return None if row is None else CertificateRow(*row)

    def revoke(self, *, identity: str = "", serial: str = "", reason: str, actor: str) -> int:
        """Revoke all certificates of ``identity`` (and delete its unused tokens) or the
        one with ``serial`` and every certificate renewed from it, directly or not; returns
        how many certificates were newly revoked."""
        if bool(identity) == bool(serial):
            raise ValueError("revoke needs exactly one of identity or serial")
        now = time.time()
        with self._tx() as db:
            if identity:
                cursor = db.execute(
                    "UPDATE certificates SET revoked_at = ?, reason = ? "
                    "WHERE identity = ? AND revoked_at IS NULL",
                    (now, reason, identity),
                )
                db.execute("DELETE FROM tokens WHERE identity = ? AND used_at IS NULL", (identity,))
            else:
                cursor = db.execute(
                    "UPDATE certificates SET revoked_at = ?, reason = ? "
                    "WHERE revoked_at IS NULL AND serial IN ("
                    "  WITH RECURSIVE descendants(serial) AS ("
                    "    VALUES (?) UNION SELECT c.serial FROM certificates c"
                    "    JOIN descendants d ON c.renewed_from = d.serial)"
                    "  SELECT serial FROM descendants)",
                    (now, reason, serial),
                )
            count = cursor.rowcount
            if count:
                db.execute(
                    "INSERT INTO counters VALUES ('revocations', 1) "
                    "ON CONFLICT(name) DO UPDATE SET value = value + 1"
                )
            self._audit(
                db, actor, "certificate.revoke", identity or serial, reason=reason, count=count
            )
        return count

    def revocations(self) -> tuple[int, list[CertificateRow]]:
        """The revocation version and the revoked certificates not yet expired."""
        with self._lock:
            version_row = self._db.execute(
                "SELECT value FROM counters WHERE name = 'revocations'"
            ).fetchone()
            rows = self._db.execute(
                f"SELECT {CERTIFICATE_COLUMNS} FROM certificates "
                "WHERE revoked_at IS NOT NULL AND not_after > ?",
                (time.time(),),
            ).fetchall()
        return (version_row[0] if version_row else 0), [CertificateRow(*r) for r in rows]

    def is_revoked(self, serial: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT revoked_at FROM certificates WHERE serial = ?", (serial,)
            ).fetchone()
        return row is not None and row[0] is not None

    # --- session data keys ------------------------------------------------------------

    def _seal(self, session_id: str, key_id: int, secret: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, secret, f"{session_id}/{key_id}".encode())

    def _unseal(
        self, session_id: str, key_id: int, sealed: bytes, aead: AESGCM | None = None
    ) -> bytes:
        try:
            return (aead or self._aead).decrypt(
                sealed[:12], sealed[12:], f"{session_id}/{key_id}".encode()
            )
        except InvalidTag:
            raise ValueError(
                "a stored session key does not decrypt: wrong key-encryption key?"
            ) from None

    def reseal(self, legacy_key: bytes) -> int:
        """Seal the session keys still sealed under ``legacy_key`` (a state directory from
        before the stretched KEK) under this store's key, all in one transaction; returns
        how many. Raises ``ValueError`` (and changes nothing) if one does not decrypt."""
        legacy = AESGCM(legacy_key)
        with self._tx() as db:
            rows = db.execute(
                "SELECT session_id, key_id, sealed FROM session_keys WHERE sealing != ?",
                (SEALING,),
            ).fetchall()
            for session_id, key_id, sealed in rows:
                secret = self._unseal(session_id, key_id, sealed, legacy)
                db.execute(
                    "UPDATE session_keys SET sealed = ?, sealing = ? "
                    "WHERE session_id = ? AND key_id = ?",
                    (self._seal(session_id, key_id, secret), SEALING, session_id, key_id),
                )
            if rows:
                self._audit(db, "keymanager", "session.reseal", "*", count=len(rows))
        return len(rows)

    def session(self, session_id: str) -> SessionRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT session_id, owner, backbone, current_key FROM sessions "
                "WHERE session_id = ?",
                (session_id,),
            ).fetchone()
        return None if row is None else SessionRow(*row)

    def register_session(self, session_id: str, owner: str, backbone: str) -> SessionRow:
        """Record a session (idempotent for the same owner and backbone) with key 1."""
        with self._tx() as db:
            row = db.execute(
                "SELECT session_id, owner, backbone, current_key FROM sessions "
                "WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            if row is not None:
                return SessionRow(*row)
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, 1)",
                (session_id, owner, backbone, time.time()),
            )
            self._insert_key(db, session_id, 1)
            self._audit(db, backbone, "session.register", session_id, owner=owner)
        return SessionRow(session_id, owner, backbone, 1)

    def _insert_key(self, db: sqlite3.Connection, session_id: str, key_id: int) -> None:
        db.execute(
            "INSERT INTO session_keys (session_id, key_id, sealed, created_at, next_prefix, "
            "sealing) VALUES (?, ?, ?, ?, 0, ?)",
            (
                session_id,
                key_id,
                self._seal(session_id, key_id, secrets.token_bytes(32)),
                time.time(),
                SEALING,
            ),
        )

    @staticmethod
    def _current_key(db: sqlite3.Connection, session_id: str) -> int:
        """The id of the session's current key; KeyError for an unknown session."""
        row = db.execute(
            "SELECT current_key FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None:
            raise KeyError(f"no session {session_id!r}")
        return int(row[0])

    def issue_key(self, session_id: str, key_id: int = 0) -> SessionKeyGrant:
        """Key ``key_id`` of a session (0: the current one) with a nonce prefix never
        handed out before for that key, also across restarts."""
        with self._tx() as db:
            wanted = key_id or self._current_key(db, session_id)
            row = db.execute(
                "SELECT sealed, next_prefix FROM session_keys WHERE session_id = ? AND key_id = ?",
                (session_id, wanted),
            ).fetchone()
            if row is None:
                raise KeyError(f"session {session_id!r} has no key {wanted} (retired or unknown)")
            if row[1] >= MAX_PREFIXES:
                raise OverflowError(f"key {wanted} of {session_id!r} has no nonce prefixes left")
            db.execute(
                "UPDATE session_keys SET next_prefix = next_prefix + 1 "
                "WHERE session_id = ? AND key_id = ?",
                (session_id, wanted),
            )
        secret = self._unseal(session_id, wanted, row[0])
        return SessionKeyGrant(session_id, wanted, secret, int(row[1]).to_bytes(4, "big"))

    def rotate_key(self, session_id: str, actor: str) -> int:
        """Make a new current key; keep the previous one (frames in flight), destroy older."""
        with self._tx() as db:
            new = self._current_key(db, session_id) + 1
            self._insert_key(db, session_id, new)
            db.execute(
                "UPDATE sessions SET current_key = ? WHERE session_id = ?", (new, session_id)
            )
            db.execute(
                "DELETE FROM session_keys WHERE session_id = ? AND key_id < ?",
                (session_id, new - 1),
            )
            self._audit(db, actor, "session.rotate", session_id, key_id=new)
        return new

    def end_session(self, session_id: str, actor: str) -> bool:
        with self._tx() as db:
            db.execute("DELETE FROM session_keys WHERE session_id = ?", (session_id,))
            count = db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount
            if count:
                self._audit(db, actor, "session.end", session_id)
        return bool(count)

    def key_ids(self, session_id: str) -> list[int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id FROM session_keys WHERE session_id = ? ORDER BY key_id",
                (session_id,),
            ).fetchall()
        return [r[0] for r in rows]

    # --- audit --------------------------------------------------------------------------

    def audit_log(self) -> list[AuditEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT at, actor, action, subject, detail FROM audit ORDER BY id"
            ).fetchall()
        return [AuditEntry(*row) for row in rows]
