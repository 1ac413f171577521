"""The key manager's key-encryption key: stretched with scrypt (salt and parameters in the
state directory), old state directories migrated, and a KEK file only its owner may read
(issue 15, item 12)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from security_kit import TEST_KDF

from splitfed.security.ca import CertificateAuthority, write_pem
from splitfed.services.keymanager.authority import KeyAuthority, init_authority
from splitfed.services.keymanager.kek import KDF_FILE, MIN_SCRYPT_N, ScryptParams
from splitfed.services.keymanager.settings import load_kek
from splitfed.tls import load_private_key

KEK = b"correct horse battery staple"  # a weak passphrase, as an operator might pick


@pytest.fixture
def authority(tmp_path: Path) -> KeyAuthority:
    init_authority(tmp_path / "km", KEK, kdf=TEST_KDF, allow_weak_kdf=True)
    return KeyAuthority(tmp_path / "km", KEK, allow_weak_kdf=True)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_a_kek_file_others_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    kek_file = tmp_path / "kek"
    kek_file.write_bytes(KEK)
    kek_file.chmod(mode)
    with pytest.raises(ValueError, match=rf"{kek_file}.*chmod 600 {kek_file}"):
        load_kek(kek_file)
    kek_file.chmod(0o600)
    assert load_kek(kek_file) == KEK
    kek_file.chmod(0o400)
    assert load_kek(kek_file) == KEK


def _stretched(kek: bytes, record: dict[str, object]) -> tuple[bytes, bytes]:
    """What a guess at the KEK costs to check: one scrypt with the stored salt and
    parameters (re-derived here from the documented construction)."""
    master = Scrypt(
        salt=bytes.fromhex(str(record["salt"])),
        length=32,
        n=int(str(record["n"])),
        r=int(str(record["r"])),
        p=int(str(record["p"])),
    ).derive(kek)

    def expand(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)

    return expand(b"splitfed ca key v2").hex().encode(), expand(b"splitfed session keys v2")


def _unsealable(db: Path, key: bytes) -> bool:
    with sqlite3.connect(db) as conn:
        session_id, key_id, sealed = conn.execute(
            "SELECT session_id, key_id, sealed FROM session_keys"
        ).fetchone()
    try:
        AESGCM(key).decrypt(sealed[:12], sealed[12:], f"{session_id}/{key_id}".encode())
    except Exception:
        return False
    return True


def _legacy_sealing_key(kek: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"splitfed session keys v1"
    ).derive(kek)


def test_stored_secrets_need_the_scrypt_stretched_kek(authority: KeyAuthority) -> None:
    db = authority.store.path
    assert db is not None
    authority.store.register_session("s-1", "client/alice", "backbone/bb")
    authority.close()
    record = json.loads((db.parent / KDF_FILE).read_text())
    assert record["kdf"] == "scrypt" and len(bytes.fromhex(record["salt"])) >= 16
    assert (record["n"], record["r"], record["p"]) == (TEST_KDF.n, TEST_KDF.r, TEST_KDF.p)
    ca_key = (db.parent / "ca-key.pem").read_bytes()
    # Neither the passphrase itself nor a plain hash of it opens anything ...
    for guess in (KEK, _legacy_sealing_key(KEK)):
        with pytest.raises((ValueError, TypeError)):
            load_private_key(ca_key, guess)
    assert not _unsealable(db, _legacy_sealing_key(KEK))
    # ... only scrypt(passphrase, stored salt, stored n/r/p) does; another salt does not.
    ca_password, sealing_key = _stretched(KEK, record)
    load_private_key(ca_key, ca_password)
    assert _unsealable(db, sealing_key)
    other_salt = dict(record, salt=os.urandom(16).hex())
    assert not _unsealable(db, _stretched(KEK, other_salt)[1])


def test_weak_scrypt_parameters_need_the_test_knob(tmp_path: Path) -> None:
    assert ScryptParams().n >= MIN_SCRYPT_N and not ScryptParams().weak
    with pytest.raises(ValueError, match="below"):
        init_authority(tmp_path / "a", KEK, kdf=TEST_KDF)
    init_authority(tmp_path / "b", KEK, kdf=TEST_KDF, allow_weak_kdf=True)
    with pytest.raises(ValueError, match="below"):
        KeyAuthority(tmp_path / "b", KEK)
    with pytest.raises(ValueError, match="power of 2"):
        ScryptParams(n=1000)


def test_a_wrong_kek_is_refused(tmp_path: Path) -> None:
    init_authority(tmp_path / "km", KEK, kdf=TEST_KDF, allow_weak_kdf=True)
    with pytest.raises(ValueError, match="wrong key-encryption key"):
        KeyAuthority(tmp_path / "km", b"not the right passphrase", allow_weak_kdf=True)


# The state directory as splitfed wrote it before kdf.json: the CA key's PKCS#8 password was
# the KEK itself and session keys were sealed under HKDF-SHA256(KEK).
LEGACY_SCHEMA = """
CREATE TABLE tokens (digest TEXT PRIMARY KEY, identity TEXT NOT NULL, role TEXT NOT NULL,
    dns_names TEXT NOT NULL, ip_addresses TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, used_at REAL);
CREATE TABLE certificates (serial TEXT PRIMARY KEY, identity TEXT NOT NULL, role TEXT NOT NULL,
    not_before REAL NOT NULL, not_after REAL NOT NULL, pem BLOB NOT NULL, revoked_at REAL,
    reason TEXT NOT NULL DEFAULT '');
CREATE TABLE sessions (session_id TEXT PRIMARY KEY, owner TEXT NOT NULL, backbone TEXT NOT NULL,
    created_at REAL NOT NULL, current_key INTEGER NOT NULL);
CREATE TABLE session_keys (session_id TEXT NOT NULL, key_id INTEGER NOT NULL, sealed BLOB NOT NULL,
    created_at REAL NOT NULL, next_prefix INTEGER NOT NULL, PRIMARY KEY (session_id, key_id));
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, subject TEXT NOT NULL, detail TEXT NOT NULL);
"""


def legacy_state(state: Path, kek: bytes, secret: bytes) -> CertificateAuthority:
    state.mkdir(mode=0o700)
    ca = CertificateAuthority.create("legacy CA")
    write_pem(state / "ca.pem", ca.cert_pem, private=False)
    write_pem(state / "ca-key.pem", ca.key_pem(kek), private=True)
    issued = ca.issue("alice", "client")
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(_legacy_sealing_key(kek)).encrypt(nonce, secret, b"s-1/1")
    with sqlite3.connect(state / "keymanager.db") as db:
        db.executescript(LEGACY_SCHEMA)
        db.execute(
            "INSERT INTO certificates VALUES (?, 'alice', 'client', ?, ?, ?, NULL, '')",
            (
                format(cert.serial_number, "x"),
                cert.not_valid_before_utc.timestamp(),
                cert.not_valid_after_utc.timestamp(),
                issued.cert_pem,
            ),
        )
        db.execute("INSERT INTO sessions VALUES ('s-1', 'client/alice', 'backbone/bb', 0, 1)")
        db.execute("INSERT INTO session_keys VALUES ('s-1', 1, ?, 0, 3)", (sealed,))
    return ca


def test_a_legacy_state_directory_migrates_once_and_keeps_its_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state, secret = tmp_path / "km", os.urandom(32)
    ca = legacy_state(state, KEK, secret)
    caplog.set_level(logging.INFO)
    authority = KeyAuthority(state, KEK, kdf=TEST_KDF, allow_weak_kdf=True)
    assert authority.ca.certificate == ca.certificate
    key = authority.store.issue_key("s-1")
    assert key.secret == secret and key.nonce_prefix == (3).to_bytes(4, "big")
    authority.close()
    assert "migrated" in caplog.text and "re-sealed 1 session key" in caplog.text
    # Now under the stretched key only.
    record = json.loads((state / KDF_FILE).read_text())
    ca_password, sealing_key = _stretched(KEK, record)
    with pytest.raises((ValueError, TypeError)):
        load_private_key((state / "ca-key.pem").read_bytes(), KEK)
    load_private_key((state / "ca-key.pem").read_bytes(), ca_password)
    assert _unsealable(state / "keymanager.db", sealing_key)
    assert not _unsealable(state / "keymanager.db", _legacy_sealing_key(KEK))
    caplog.clear()
    again = KeyAuthority(state, KEK, allow_weak_kdf=True)
    assert again.store.issue_key("s-1").secret == secret
    again.close()
    assert "migrated" not in caplog.text
