"""The key manager's store: one suite for the in-memory and the on-disk database."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from splitfed.services.keymanager.store import (
    CertificateRefusedError,
    CertificateRevokedError,
    CertificateRow,
    KeyStore,
    TokenRefusedError,
)

KEK = b"k" * 32


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> KeyStore:
    return KeyStore(None if request.param == "memory" else tmp_path / "km.db", KEK)


def row(serial: str, identity: str = "alice") -> CertificateRow:
    return CertificateRow(serial, identity, "client", 0.0, 4e9, None, "")


def test_tokens_are_one_time_and_stored_as_digests(store: KeyStore) -> None:
    token, _ = store.create_token("alice", "client", 60, actor="admin/admin")
    assert store.peek_token(token).identity == "alice"
    store.consume_token(token, row("a1"), b"pem")
    with pytest.raises(TokenRefusedError, match="already used"):
        store.peek_token(token)
    with pytest.raises(TokenRefusedError):
        store.consume_token(token, row("a2"), b"pem")
    with pytest.raises(TokenRefusedError, match="unknown"):
        store.peek_token("not-a-token")
    if store.path is not None:
        assert token.encode() not in store.path.read_bytes()


def test_expired_token_is_refused(store: KeyStore) -> None:
    token, _ = store.create_token("alice", "client", -1, actor="admin/admin")
    with pytest.raises(TokenRefusedError, match="expired"):
        store.peek_token(token)


def test_revocation_by_identity_and_serial(store: KeyStore) -> None:
    store.record_certificate(row("a1"), b"pem", actor="x", action="certificate.issue")
    store.record_certificate(row("a2"), b"pem", actor="x", action="certificate.issue")
    store.record_certificate(row("b1", "bob"), b"pem", actor="x", action="certificate.issue")
    assert store.revoke(serial="b1", reason="lost", actor="admin/admin") == 1
    assert store.revoke(identity="alice", reason="left", actor="admin/admin") == 2
    version, revoked = store.revocations()
    assert version == 2 and {r.serial for r in revoked} == {"a1", "a2", "b1"}
    assert store.is_revoked("a1") and not store.is_revoked("zz")
    actions = [e.action for e in store.audit_log()]
    assert actions.count("certificate.revoke") == 2


def test_session_keys_rotate_and_prefixes_never_repeat(store: KeyStore) -> None:
    store.register_session("s1", "client/alice", "backbone/b0")
    first = store.issue_key("s1")
    second = store.issue_key("s1", 1)
    assert first.key_id == second.key_id == 1 and first.secret == second.secret
    assert first.nonce_prefix != second.nonce_prefix
    assert store.rotate_key("s1", "client/alice") == 2
    assert store.rotate_key("s1", "client/alice") == 3
    # The previous key stays for frames in flight; older ones are destroyed.
    assert store.key_ids("s1") == [2, 3]
    with pytest.raises(KeyError, match="retired"):
        store.issue_key("s1", 1)
    assert store.end_session("s1", "client/alice")
    assert store.session("s1") is None and store.key_ids("s1") == []


def test_state_survives_reopening_and_needs_the_kek(tmp_path: Path) -> None:
    path = tmp_path / "km.db"
    store = KeyStore(path, KEK)
    store.register_session("s1", "client/alice", "backbone/b0")
    key = store.issue_key("s1")
    store.record_certificate(row("a1"), b"pem", actor="x", action="certificate.issue")
    store.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert key.secret not in path.read_bytes()
    again = KeyStore(path, KEK)
    reissued = again.issue_key("s1")
    assert reissued.secret == key.secret
    assert reissued.nonce_prefix not in (key.nonce_prefix,)
    assert [c.serial for c in again.certificates()] == ["a1"]
    again.close()
    wrong = KeyStore(path, b"w" * 32)
    with pytest.raises(ValueError, match="key-encryption key"):
        wrong.issue_key("s1")


def test_renewal_checks_revocation_in_its_own_transaction(store: KeyStore) -> None:
    store.record_certificate(
        CertificateRow("a1", "alice", "client", 10.0, 4e9, None, "", enrolled_at=5.0),
        b"pem",
        actor="x",
        action="certificate.enroll",
    )
    renewed = store.record_renewal("a1", row("a2"), b"pem2", actor="client/alice")
    assert renewed.enrolled_at == 5.0 and store.certificate("a2") == renewed
    store.revoke(identity="alice", reason="stolen", actor="admin/admin")
    with pytest.raises(CertificateRevokedError, match="revoked"):
        store.record_renewal("a2", row("a3"), b"pem3", actor="client/alice")
    with pytest.raises(CertificateRefusedError, match="no record"):
        store.record_renewal("zz", row("a4"), b"pem4", actor="client/alice")
    with pytest.raises(CertificateRefusedError, match="bob"):
        store.record_renewal("a1", row("b1", "bob"), b"pem5", actor="client/alice")
    assert sorted(c.serial for c in store.certificates()) == ["a1", "a2"]
    assert [e.action for e in store.audit_log()].count("certificate.renew") == 1


def test_an_older_database_gains_enrollment_times(tmp_path: Path) -> None:
    """Certificates recorded before lineages existed start theirs at their not_before."""
    path = tmp_path / "km.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE certificates (serial TEXT PRIMARY KEY, identity TEXT NOT NULL, "
            "role TEXT NOT NULL, not_before REAL NOT NULL, not_after REAL NOT NULL, "
            "pem BLOB NOT NULL, revoked_at REAL, reason TEXT NOT NULL DEFAULT '')"
        )
        db.execute(
            "INSERT INTO certificates VALUES ('a1', 'alice', 'client', 7, 9, x'00', NULL, '')"
        )
    store = KeyStore(path, KEK)
    certificate = store.certificate("a1")
    assert certificate is not None and certificate.enrolled_at == 7.0
    store.close()


def test_revoking_a_certificate_revokes_what_was_renewed_from_it(store: KeyStore) -> None:
    """A thief who renewed a stolen certificate before the admin revoked its serial gets
    nothing out of it: the renewals descend from the revoked certificate."""
    store.record_certificate(row("a1"), b"pem", actor="x", action="certificate.enroll")
    store.record_renewal("a1", row("a2"), b"pem", actor="client/alice")
    store.record_renewal("a2", row("a3"), b"pem", actor="client/alice")
    store.record_renewal("a2", row("a4"), b"pem", actor="client/alice")  # a fork
    store.record_certificate(row("b1", "bob"), b"pem", actor="x", action="certificate.enroll")
    assert store.revoke(serial="a2", reason="stolen", actor="admin/admin") == 3
    assert sorted(r.serial for r in store.revocations()[1]) == ["a2", "a3", "a4"]
    assert not store.is_revoked("a1") and not store.is_revoked("b1")
