"""The key manager's authority without gRPC: certificate lineages, whose renewals stop at
a maximum lifetime after enrollment, and renewal against revocation (issue 15, item 8)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from security_kit import TEST_KDF

from splitfed.errors import PermissionDeniedError, UnauthenticatedError
from splitfed.security.ca import generate_private_key, make_csr
from splitfed.security.identity import Identity
from splitfed.services.keymanager.authority import KeyAuthority, init_authority
from splitfed.services.keymanager.settings import KeyManagerSettings

KEK = b"test-key-encryption-key"
ADMIN = Identity("admin", "admin", "splitfed")
DAY = 24 * 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def authority(tmp_path: Path, clock: Clock) -> KeyAuthority:
    init_authority(tmp_path / "km", KEK, kdf=TEST_KDF, allow_weak_kdf=True)
    return KeyAuthority(
        tmp_path / "km",
        KEK,
        allow_weak_kdf=True,
        certificate_validity=dt.timedelta(days=1),
        max_certificate_lifetime=dt.timedelta(days=30),
        clock=clock,
    )


def enroll(authority: KeyAuthority, name: str = "alice") -> tuple[Identity, bytes]:
    token, _ = authority.create_token(name, "client", ADMIN)
    grant = authority.enroll(token, make_csr(generate_private_key(), name))
    return Identity(name, "client", "splitfed"), grant.certificate_pem


def not_after(pem: bytes) -> float:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def test_renewal_chains_stop_at_the_maximum_lifetime(authority: KeyAuthority, clock: Clock) -> None:
    enrolled = clock.now
    alice, pem = enroll(authority)
    # Renew daily: every certificate of the lineage keeps its enrollment time, and none
    # outlives enrollment + 30 days (the last ones are cut short).
    for day in range(1, 30):
        clock.now = enrolled + day * DAY + 3600
        pem = authority.renew(alice, pem, make_csr(generate_private_key(), "alice")).certificate_pem
        assert not_after(pem) <= enrolled + 30 * DAY
    assert not_after(pem) > enrolled + 30 * DAY - 60  # cut at the cap, not before
    rows = authority.store.certificates("alice")
    assert len(rows) == 30 and {r.enrolled_at for r in rows} == {rows[0].enrolled_at}
    assert abs(rows[0].enrolled_at - enrolled) < 1
    clock.now = enrolled + 30 * DAY + 1
    with pytest.raises(PermissionDeniedError, match="new enrollment token"):
        authority.renew(alice, pem, make_csr(generate_private_key(), "alice"))
    assert len(authority.store.certificates("alice")) == 30
    # A new token starts a new lineage.
    _, fresh = enroll(authority)
    assert authority.renew(alice, fresh, make_csr(generate_private_key(), "alice"))


def test_renewal_of_a_revoked_certificate_records_nothing(authority: KeyAuthority) -> None:
    alice, pem = enroll(authority)
    authority.revoke(ADMIN, identity="alice", reason="stolen")
    with pytest.raises(UnauthenticatedError, match="revoked"):
        authority.renew(alice, pem, make_csr(generate_private_key(), "alice"))
    assert len(authority.store.certificates("alice")) == 1


def test_renewal_of_a_certificate_the_key_manager_never_issued_is_refused(
    authority: KeyAuthority,
) -> None:
    # Same CA, same identity, but minted outside the key manager: no lineage, no revocation
    # record, so no renewal.
    outsider = authority.ca.issue("alice", "client")
    alice = Identity("alice", "client", "splitfed")
    with pytest.raises(PermissionDeniedError, match="no record"):
        authority.renew(alice, outsider.cert_pem, make_csr(generate_private_key(), "alice"))
    assert authority.store.certificates("alice") == []


def test_maximum_lifetime_setting_is_validated(tmp_path: Path) -> None:
    assert KeyManagerSettings(state_dir=tmp_path).max_certificate_lifetime_s == 30 * DAY
    with pytest.raises(ValueError, match="max_certificate_lifetime_s"):
        KeyManagerSettings(
            state_dir=tmp_path, certificate_validity_s=DAY, max_certificate_lifetime_s=3600
        )
