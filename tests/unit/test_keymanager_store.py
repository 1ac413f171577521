"""The key manager's store: one suite for the in-memory and the on-disk database."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from splitfed.services.keymanager.store import CertificateRow, KeyStore, TokenRefusedError

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
